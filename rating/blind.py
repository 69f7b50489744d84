"""The blind check: "Which do you prefer?" between the base model and my taste LoRA.

After a version is trained, its results phase renders pairs: one held-out prompt and a seed
the LoRA never saw, once by the base model and once with the LoRA at the strength its
evaluation chose. Each picture becomes a hidden image of a "generated" source: out of the pool
and never shown to anyone but the version's owner. The owner picks the better one of each
pair without knowing which is which (the side is drawn when the pair is made and kept on the
server); each pick is stored as an ordinary comparison, so the next version learns from it.
The page then gives the person's own win rate for the LoRA, with a 95 % interval.
"""

from __future__ import annotations

import io
import math
import secrets

from flask import Blueprint, abort, current_app, redirect, request, send_file, url_for
from flask_login import current_user, login_required
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from rating import jobs
from rating.media import image_store
from rating.models import (
    GENERATED,
    Comparison,
    Image,
    Source,
    TasteVersion,
    db,
    get_version_or_404,
)
from rating.rate import page_or_fragment
from rating.ratings import save_pick

bp = Blueprint("blind", __name__, url_prefix="/taste/versions/<int:number>/blind")

SEED_OFFSET = 1000  # the check's seeds: past the grid's and the LoRA evaluation's own
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval
COUNTS = ("wins", "ties", "losses")  # the LoRA's, per strength
MORE_PAIRS = "blind_pairs"  # the job kind that draws more pairs for a check


def prefix(version: TasteVersion) -> str:
    """What the comparison tokens of a version's check start with."""
    return f"blind-{version.id}-"


def token(version: TasteVersion, index: int) -> str:
    """The comparison token of pair `index`: one pick per pair, and how its picks are found."""
    return f"{prefix(version)}{index}"


def chosen_strengths(lora: dict, configured) -> list[float]:
    """The LoRA strengths to check: those configured, else the one its evaluation recommends
    (read off its score curve), else the one its evaluation scored best."""
    if configured:
        return [float(s) for s in configured]
    if lora.get("recommended_strength"):
        return [float(lora["recommended_strength"])]
    scores = {float(k): v for k, v in (lora.get("scores_by_strength") or {}).items()}
    positive = {k: v for k, v in scores.items() if k > 0 and v is not None}
    return [max(positive, key=positive.get)] if positive else [1.0]


def plan(prompts: list[str], pairs: int, strengths: list[float], start: int = 0) -> list[dict]:
    """Lay out the pairs: prompts in turn, a fresh seed each, strengths in turn; `start` is
    how many were laid out before (more pairs go on where those stopped)."""
    return [
        {
            "prompt": prompts[k % len(prompts)],
            "seed": SEED_OFFSET + k,
            "strength": strengths[k % len(strengths)],
        }
        for k in range(start, start + pairs)
    ]


def drawn_so_far(version: TasteVersion) -> int:
    """How many pairs the version's check has laid out: those offered and the identical ones
    dropped (their seeds are used up too)."""
    checked = version.metrics.get("blind") or {}
    return len(checked.get("pairs") or []) + int(checked.get("identical") or 0)


def generated_source(version: TasteVersion) -> Source:
    """The (private) source that holds a version's generated pictures: made on first use."""
    made = db.session.scalars(
        select(Source).where(Source.kind == GENERATED, Source.created_by_id == version.owner_id)
    )
    found = next((s for s in made if (s.params or {}).get("version_id") == version.id), None)
    if found is not None:
        return found
    source = Source(
        kind=GENERATED,
        label=f"Blind check of taste version {version.number}",
        params={"version_id": version.id},
        created_by_id=version.owner_id,
    )
    db.session.add(source)
    db.session.flush()
    return source


def keep_picture(picture, source: Source, title: str) -> int:
    """Store a generated picture as a hidden image (once per pixels); return its id."""
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    stored = image_store().add(picture, buffer.getvalue(), "png")
    same = select(Image.id).where(Image.sha256 == stored.sha256)
    if (found := db.session.scalar(same)) is not None:
        return found
    image = Image(
        sha256=stored.sha256,
        phash=stored.phash,
        width=stored.width,
        height=stored.height,
        original_ext="png",
        source_id=source.id,
        title=title[:2000],
        hidden=True,
    )
    try:
        with db.session.begin_nested():
            db.session.add(image)
        return image.id
    except IntegrityError:  # another job stored the same pixels a moment ago
        return db.session.scalar(same)


def new_pair(spec: dict, base_id: int, lora_id: int) -> dict:
    """A pair as the version records it; the LoRA's side is drawn here, unseen by the page."""
    return {**spec, "base": base_id, "lora": lora_id, "lora_left": secrets.randbelow(2) == 0}


def sides(pair: dict) -> tuple[int, int]:
    """The (left, right) image ids of a pair."""
    return (pair["lora"], pair["base"]) if pair["lora_left"] else (pair["base"], pair["lora"])


def pairs_of(version: TasteVersion) -> list[dict]:
    """The version's blind pairs (none for versions made before the check existed)."""
    return (version.metrics.get("blind") or {}).get("pairs") or []


def answered(version: TasteVersion):
    """The owner's comparisons made by this version's check, oldest first."""
    return (
        select(Comparison)
        .where(
            Comparison.user_id == version.owner_id,
            Comparison.token.startswith(prefix(version)),
        )
        .order_by(Comparison.id)
    )


def picks_of(version: TasteVersion) -> dict[int, str]:
    """The owner's answers so far: pair index → outcome (a: left, b: right, tie).

    Only a comparison of exactly that pair's two pictures, in their sides' order, counts.
    """
    pairs, found = pairs_of(version), {}
    for comparison in db.session.scalars(answered(version)):
        index = comparison.token.removeprefix(prefix(version))
        if index.isdigit() and int(index) < len(pairs):
            if sides(pairs[int(index)]) == (comparison.image_a_id, comparison.image_b_id):
                found[int(index)] = comparison.outcome
    return found


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: sound even for a dozen answers."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def call(record: dict) -> str:
    """What a win record says: "lora" (preferred beyond chance), "base" (the base model was),
    or "open" (its 95 % interval still spans 50 %: too close to call)."""
    return "lora" if record["low"] > 0.5 else "base" if record["high"] < 0.5 else "open"


def record(won: float, answered: int) -> dict:
    """A win record: pairs answered, pairs won (ties as half), the rate, its interval, and
    what it says (`call`)."""
    low, high = wilson(won, answered)
    found = {"answered": answered, "won": won, "rate": won / answered, "low": low, "high": high}
    return found | {"call": call(found)}


def results(version: TasteVersion) -> list[dict]:
    """The LoRA's blind record per strength checked: wins, ties, losses, rate and interval.

    A tie counts as half a win. Strengths with no answer yet are left out.
    """
    answers = picks_of(version)
    by_strength: dict[float, dict] = {}
    for index, pair in enumerate(pairs_of(version)):
        outcome = answers.get(index)
        if outcome is None:
            continue
        tally = by_strength.setdefault(
            pair["strength"], {"strength": pair["strength"]} | dict.fromkeys(COUNTS, 0)
        )
        lora_side = "a" if pair["lora_left"] else "b"
        key = "ties" if outcome == "tie" else "wins" if outcome == lora_side else "losses"
        tally[key] += 1
    return [
        tally | record(tally["wins"] + tally["ties"] / 2, sum(tally[k] for k in COUNTS))
        for tally in sorted(by_strength.values(), key=lambda t: t["strength"])
    ]


def summary(version: TasteVersion) -> dict | None:
    """All strengths together, for the version list and the verdict (None: nothing answered)."""
    found = results(version)
    if not found:
        return None
    return record(sum(r["won"] for r in found), sum(r["answered"] for r in found))


def own_version_or_404(number: int) -> TasteVersion:
    """My version `number`, with a blind check to take (404 otherwise)."""
    version = get_version_or_404(number, current_user)
    if not pairs_of(version):
        abort(404)
    return version


def revealed(version: TasteVersion, answers: dict[int, str]) -> list[dict]:
    """Once every pair is judged: which side was the LoRA's in each, and what was picked
    (the LoRA, the base model, or about the same)."""
    shown = []
    for index, pair in enumerate(pairs_of(version)):
        lora_side = "a" if pair["lora_left"] else "b"
        outcome = answers.get(index)
        picked = "same" if outcome == "tie" else "lora" if outcome == lora_side else "base"
        shown.append({"index": index, "lora_left": pair["lora_left"], "picked": picked})
    return shown


def render_check(version: TasteVersion, notice: str = ""):
    """The next unanswered pair, or, once all are answered, the results and which was which
    (and the job drawing more pairs, when I asked for more)."""
    pairs, answers = pairs_of(version), picks_of(version)
    waiting = [k for k in range(len(pairs)) if k not in answers]
    more_job = None if waiting else jobs.latest(version.owner_id, MORE_PAIRS, version_id=version.id)
    context = dict(
        version=version,
        index=waiting[0] if waiting else None,
        total=len(pairs),
        answered=len(answers),
        results=results(version),
        reveal=[] if waiting else revealed(version, answers),
        notice=notice,
        more_job=more_job,  # looked up once the check is done: a pick's answer needs none
        more_pairs=more_pairs(),
    )
    return page_or_fragment("taste/blind.html", "taste/_blind_card.html", **context)


@bp.get("/")
@login_required
def page(number: int):
    """Show the blind check: the next pair to judge, or my win rate once all are judged."""
    return render_check(own_version_or_404(number))


@bp.post("/<int:index>")
@login_required
def pick(number: int, index: int):
    """Store my pick for pair `index` (a: left, b: right, tie) and show the next pair."""
    version = own_version_or_404(number)
    pairs = pairs_of(version)
    outcome = request.form.get("outcome")
    if not 0 <= index < len(pairs) or outcome not in ("a", "b", "tie"):
        abort(400, description="Pick the left picture, the right one, or “about the same”.")
    left, right = sides(pairs[index])
    save_pick(current_user.id, left, right, outcome, token(version, index))
    return render_check(version)


def more_pairs() -> int:
    """How many pairs "Judge more pairs" adds: as many as a check starts with."""
    return max(1, int(current_app.config["TASTE_BLIND_PAIRS"]))


@bp.post("/more")
@login_required
def more(number: int):
    """Draw more pairs for my check, as a GPU job (one at a time per version); answer with the
    check, which shows the job's progress and then the new pairs."""
    version = own_version_or_404(number)
    jobs.enqueue_once(
        MORE_PAIRS,
        current_user.id,
        lock_key=f"blind:{version.id}",
        version_id=version.id,
        pairs=more_pairs(),
    )
    if not request.headers.get("HX-Request"):
        return redirect(url_for("blind.page", number=number))
    return render_check(version)


@bp.post("/undo")
@login_required
def undo(number: int):
    """Take back my latest pick of this check."""
    version = own_version_or_404(number)
    latest = db.session.scalars(answered(version)).all()
    if not latest:
        return render_check(version, notice="Nothing to undo.")
    db.session.delete(latest[-1])
    db.session.commit()
    return render_check(version, notice="Undone: that pair is back.")


@bp.get("/<int:index>/<any(left, right):side>.png")
@login_required
def picture(number: int, index: int, side: str):
    """Send one picture of a pair by its side: the URL says nothing of which model drew it."""
    pairs = pairs_of(own_version_or_404(number))
    if not 0 <= index < len(pairs):
        abort(404)
    left, right = sides(pairs[index])
    image = db.session.get(Image, left if side == "left" else right)
    if image is None:
        abort(404)
    path = image_store().original_path(image.sha256, image.original_ext)
    if not path.is_file():
        abort(404)
    response = send_file(path, mimetype="image/png", max_age=3600)
    response.cache_control.private = True
    return response
