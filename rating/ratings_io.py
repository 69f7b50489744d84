"""A person's ratings and picks as CSV or JSON Lines: export, validate, import."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import aliased

from rating.models import GENERATED, Comparison, Image, Rating, Source, db

FIELDS = [
    "kind",  # rating | comparison
    "image_sha256",
    "source_url",
    "stars",  # ratings: 1–5
    "other_sha256",  # comparisons: the second image
    "other_source_url",
    "pick",  # comparisons: image | other | tie — which of the two won
    "created_at",
    "updated_at",
]
OUTCOME_TO_PICK = {"a": "image", "b": "other", "tie": "tie"}
PICK_TO_OUTCOME = {v: k for k, v in OUTCOME_TO_PICK.items()}
MAX_ERRORS_SHOWN = 20


class ImportRejected(ValueError):
    """The file has errors; nothing was imported. `errors` lists them with line numbers."""

    def __init__(self, errors: list[str]):
        shown = errors[:MAX_ERRORS_SHOWN]
        more = len(errors) - len(shown)
        super().__init__("; ".join(shown) + (f"; and {more} more" if more else ""))
        self.errors = errors


@dataclass
class ImportReport:
    ratings_added: int = 0
    ratings_updated: int = 0
    ratings_kept: int = 0  # the stored rating was newer than the file's
    comparisons_added: int = 0
    comparisons_present: int = 0
    unknown_images: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Say in one sentence what the import did."""
        parts = [
            f"{self.ratings_added} ratings added",
            f"{self.ratings_updated} updated",
            f"{self.ratings_kept} kept (yours were newer)",
            f"{self.comparisons_added} picks added",
            f"{self.comparisons_present} picks already here",
        ]
        if self.unknown_images:
            parts.append(f"{len(self.unknown_images)} rows skipped: image not in this pool")
        return ", ".join(parts) + "."


def _iso(moment: datetime) -> str:
    return moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def export_rows(user_id: int) -> Iterator[dict]:
    """Yield one dict per rating, then per pick, oldest first."""
    ratings = db.session.execute(
        select(Rating, Image)
        .join(Image, Rating.image_id == Image.id)
        .where(Rating.user_id == user_id)
        .order_by(Rating.created_at, Rating.id)
    )
    for rating, image in ratings:
        yield {
            **dict.fromkeys(FIELDS, ""),
            "kind": "rating",
            "image_sha256": image.sha256,
            "source_url": image.source_url or "",
            "stars": rating.stars,
            "created_at": _iso(rating.created_at),
            "updated_at": _iso(rating.updated_at),
        }
    a, b = aliased(Image), aliased(Image)
    picks = db.session.execute(
        select(Comparison, a, b)
        .join(a, Comparison.image_a_id == a.id)
        .join(b, Comparison.image_b_id == b.id)
        .where(Comparison.user_id == user_id)
        .order_by(Comparison.created_at, Comparison.id)
    )
    for comparison, image_a, image_b in picks:
        yield {
            **dict.fromkeys(FIELDS, ""),
            "kind": "comparison",
            "image_sha256": image_a.sha256,
            "source_url": image_a.source_url or "",
            "other_sha256": image_b.sha256,
            "other_source_url": image_b.source_url or "",
            "pick": OUTCOME_TO_PICK[comparison.outcome],
            "created_at": _iso(comparison.created_at),
            "updated_at": _iso(comparison.created_at),
        }


def to_csv(rows: Iterable[dict]) -> str:
    """Write rows as CSV with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_jsonl(rows: Iterable[dict]) -> str:
    """Write rows as JSON Lines, leaving out empty fields."""
    return "".join(
        json.dumps({k: v for k, v in row.items() if v != ""}, ensure_ascii=False) + "\n"
        for row in rows
    )


def parse(text: str, filename: str) -> list[tuple[int, dict]]:
    """Read CSV or JSON Lines (by extension, else by sniffing) into (line number, row) pairs."""
    stripped = text.lstrip("\ufeff")
    is_jsonl = filename.lower().endswith((".jsonl", ".json", ".ndjson")) or (
        not filename.lower().endswith(".csv") and stripped.lstrip().startswith("{")
    )
    if is_jsonl:
        rows, errors = [], []
        for number, line in enumerate(stripped.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"line {number}: not valid JSON ({exc.msg})")
                continue
            except RecursionError:  # "[[[[…" thousands deep: Python's parser gives up
                errors.append(f"line {number}: JSON nested too deeply")
                continue
            if isinstance(row, dict):
                rows.append((number, row))
            else:
                errors.append(f"line {number}: expected a JSON object")
        if errors:
            raise ImportRejected(errors)
        return rows
    reader = csv.DictReader(io.StringIO(stripped))
    try:
        missing = {"kind", "image_sha256"} - set(reader.fieldnames or [])
        if missing:
            raise ImportRejected([f"line 1: the header lacks {', '.join(sorted(missing))}"])
        return [(reader.line_num, row) for row in reader]
    except csv.Error as error:  # a field over csv's size limit, a stray NUL, …
        line = reader.line_num + 1  # the line that failed was not counted yet
        raise ImportRejected([f"line {line}: not readable CSV ({error})"]) from None


TEXT_FIELDS = ("kind", "image_sha256", "source_url", "other_sha256", "other_source_url", "pick")


def _text_fields_ok(row: dict, number: int, errors: list[str]) -> bool:
    """JSON may put a list or an object where text belongs; say so instead of failing later."""
    bad = [k for k in TEXT_FIELDS if row.get(k) is not None and not isinstance(row[k], str)]
    for name in bad:
        errors.append(f"line {number}: {name} must be text, not {type(row[name]).__name__}")
    return not bad


def _timestamp(value, number: int, name: str, errors: list[str]) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        errors.append(f"line {number}: {name} {value!r} is not an ISO 8601 time")
        return None
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def validate(rows: list[tuple[int, dict]]) -> list[dict]:
    """Check every row and normalise it; raise ImportRejected listing all problems."""
    clean, errors = [], []
    for number, row in rows:
        if not _text_fields_ok(row, number, errors):
            continue
        kind = str(row.get("kind") or "").strip()
        item = {
            "line": number,
            "kind": kind,
            "image": (str(row.get("image_sha256") or "").strip().lower(), row.get("source_url")),
            "created_at": _timestamp(row.get("created_at"), number, "created_at", errors),
            "updated_at": _timestamp(row.get("updated_at"), number, "updated_at", errors),
        }
        if not item["image"][0] and not item["image"][1]:
            errors.append(f"line {number}: needs image_sha256 or source_url")
        if kind == "rating":
            try:
                item["stars"] = int(str(row.get("stars")).strip())
            except ValueError:
                item["stars"] = None
            if item["stars"] not in range(1, 6):
                errors.append(f"line {number}: stars must be a whole number 1–5")
        elif kind == "comparison":
            item["other"] = (
                str(row.get("other_sha256") or "").strip().lower(),
                row.get("other_source_url"),
            )
            item["outcome"] = PICK_TO_OUTCOME.get(str(row.get("pick") or "").strip())
            if not item["other"][0] and not item["other"][1]:
                errors.append(f"line {number}: a comparison needs other_sha256 or other_source_url")
            if item["outcome"] is None:
                errors.append(f"line {number}: pick must be image, other or tie")
        else:
            errors.append(f"line {number}: kind must be rating or comparison, not {kind!r}")
        clean.append(item)
    if errors:
        raise ImportRejected(errors)
    return clean


def _image_lookup(user_id: int, items: list[dict]) -> dict[tuple, int]:
    """The images rows name, by hash or address; another person's blind-check pictures are
    theirs alone, so a file naming them (someone else's export) finds nothing there."""
    keys = [item[k] for item in items for k in ("image", "other") if k in item]
    shas = {sha for sha, _ in keys if sha}
    urls = {url for _, url in keys if url}
    found = db.session.execute(
        select(Image.id, Image.sha256, Image.source_url)
        .join(Source, Image.source_id == Source.id)
        .where(or_(Image.sha256.in_(shas), Image.source_url.in_(urls)))
        .where(or_(Source.kind != GENERATED, Source.created_by_id == user_id))
    ).all()
    by_sha = {sha: image_id for image_id, sha, _ in found}
    by_url = {url: image_id for image_id, _, url in found if url}
    return {key: by_sha.get(key[0]) or by_url.get(key[1]) for key in keys}


def apply(user_id: int, items: list[dict]) -> ImportReport:
    """Write validated rows in one transaction; the newer of two ratings for an image wins."""
    report = ImportReport()
    image_ids = _image_lookup(user_id, items)
    mine = {
        r.image_id: r for r in db.session.scalars(select(Rating).where(Rating.user_id == user_id))
    }
    for item in items:
        image_id = image_ids[item["image"]]
        other_id = image_ids.get(item.get("other"))
        if image_id is None or (item["kind"] == "comparison" and other_id is None):
            report.unknown_images.append(f"line {item['line']}")
            continue
        created = item["created_at"] or item["updated_at"]
        if item["kind"] == "rating":
            _import_rating(user_id, image_id, item, created, mine, report)
        else:
            _import_comparison(user_id, image_id, other_id, item, created, report)
    db.session.commit()
    return report


def _import_rating(user_id, image_id, item, created, mine, report) -> None:
    updated = item["updated_at"] or created
    rating = mine.get(image_id)
    if rating is None:
        rating = Rating(user_id=user_id, image_id=image_id, stars=item["stars"])
        if created:
            rating.created_at = created
        rating.updated_at = updated or rating.created_at
        db.session.add(rating)
        mine[image_id] = rating
        report.ratings_added += 1
    elif updated and rating.updated_at and updated <= rating.updated_at:
        report.ratings_kept += 1
    else:
        rating.stars, rating.undo_stars = item["stars"], None
        if updated:
            rating.updated_at = updated
        report.ratings_updated += 1


def _import_comparison(user_id, image_id, other_id, item, created, report) -> None:
    if image_id == other_id:
        report.unknown_images.append(f"line {item['line']}")
        return
    same = select(Comparison.id).where(
        Comparison.user_id == user_id,
        Comparison.image_a_id == image_id,
        Comparison.image_b_id == other_id,
        Comparison.outcome == item["outcome"],
    )
    if created and db.session.scalar(same.where(Comparison.created_at == created)):
        report.comparisons_present += 1
        return
    comparison = Comparison(
        user_id=user_id, image_a_id=image_id, image_b_id=other_id, outcome=item["outcome"]
    )
    if created:
        comparison.created_at = created
    db.session.add(comparison)
    db.session.flush()  # so a repeated row in the same file is seen as present
    report.comparisons_added += 1
