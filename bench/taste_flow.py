"""The whole "Train my taste" flow on the product defaults, timed by phase, as a user drives it.

A fresh instance with the demo base model, the real job queue and its workers; one admin loads
the demo pack, one person rates images through the site (stars follow how saturated each image
is: a simple, visible taste), presses "Train my taste", and the page is polled until the job
ends; then the same rater takes the version's blind check by its own eyes (saturation of
the two pictures as served). Prints each phase's seconds, the scorer's and the LoRA's figures,
the bundle's size and the blind win rate.

    .venv/bin/python bench/taste_flow.py            # --ratings 40 --pool 300 --threads N --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from app import create_app
from rating import jobs
from rating.models import Image, Job, TasteVersion, db

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' Site helper
from tests.blind_rater import take_blind_check  # noqa: E402
from tests.conftest import Site  # noqa: E402
from tests.images import saturation, saturation_stars  # noqa: E402
from tests.widgets import job_state  # noqa: E402

FINAL = ("succeeded", "failed", "cancelled")


def wait_for(check, what: str, timeout: float):
    """Poll `check` until it returns something truthy; give up after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def main() -> None:
    """Run the flow once and print what each phase took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=40)
    parser.add_argument("--pool", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="TORCH_THREADS (0: half the cores)")
    parser.add_argument("--scorer", default="{}", help="TASTE_SCORER settings, as JSON")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    instance = tempfile.mkdtemp(prefix="tastebud-flow-")
    config = {"SECRET_KEY": "bench", "TORCH_THREADS": args.threads, "DEMO_PACK_SIZE": args.pool}
    config["TASTE_SCORER"] = json.loads(args.scorer)
    app = create_app(config, instance_path=instance)
    workers = jobs.start_embedded_worker(app)
    figures: dict = {}
    try:
        admin = Site(app.test_client())
        admin.register("admin")
        started = time.monotonic()
        admin.post("/admin/demo", {"count": args.pool})
        with app.app_context():
            count = lambda: db.session.scalar(select(func.count(Image.id)))  # noqa: E731
            wait_for(lambda: count() >= args.pool, "the demo pack", 1200)
            images = db.session.execute(select(Image.id, Image.sha256).limit(args.ratings)).all()
        figures["demo pack"] = round(time.monotonic() - started, 1)
        person = Site(app.test_client())
        person.register("rater")
        for image_id, sha256 in images:
            stars = saturation_stars(person.client.get(f"/img/{sha256}.jpg").get_data())
            person.post(f"/rate/{image_id}", {"stars": stars})
        started = time.monotonic()
        answer = person.post("/taste/train", htmx=True).get_data(as_text=True)
        job_id = job_state(answer).id

        def finished():
            html = person.client.get(f"/jobs/{job_id}", headers={"HX-Request": "true"})
            return job_state(html.get_data(as_text=True)).done

        wait_for(finished, "the taste job", 3600)
        figures["train my taste, click to done"] = round(time.monotonic() - started, 1)
        with app.app_context():
            job = db.session.get(Job, job_id)
            version = db.session.scalar(select(TasteVersion).where(TasteVersion.job_id == job_id))
            if job.status != "succeeded":
                raise SystemExit(f"the job {job.status}: {job.error or job.message}")
            metrics, number = version.metrics, version.number
        blind = take_blind_check(person, number, saturation)
        bundle = person.client.get(f"/taste/versions/{number}/download/lora")
        lora = metrics.get("lora", {})
        report = {
            "phases_s": metrics.get("seconds", {}),
            "wall_s": figures,
            "scorer": {k: metrics.get("scorer", {}).get(k) for k in ("srcc", "pairwise_accuracy")},
            "lora": {
                k: lora.get(k)
                for k in (
                    "score_gain",
                    "drift",
                    "diversity",
                    "steps",
                    "chosen_step",
                    "reason",
                    "stopped_because",
                )
            },
            "bundle_bytes": len(bundle.get_data()) if bundle.status_code == 200 else None,
            "blind_check": blind,
        }
    finally:
        workers.stop(graceful=True)
    if args.json:
        print(json.dumps(report))
        return
    print(f"demo base model, {args.ratings} ratings of a {args.pool}-image demo pack")
    for name, seconds in {**report["wall_s"], **report["phases_s"]}.items():
        print(f"  {name:32s} {seconds:8.1f} s")
    print(f"  scorer: {report['scorer']}")
    print(f"  lora:   {report['lora']}")
    print(f"  bundle: {report['bundle_bytes']} bytes")
    print(f"  blind check (the rater's own eyes): {report['blind_check']}")


if __name__ == "__main__":
    main()
