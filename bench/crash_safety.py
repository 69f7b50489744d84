"""Crash bench: kill -9 the server under rating load, and again in the middle of a training.

1. Ratings: `python app.py` serves a throw-away instance; raters rate-and-next as fast as they
   can; after a few seconds the server gets SIGKILL (no cleanup runs, as in an OOM kill). Each
   rater keeps every rating the server acknowledged (HTTP 200); the database is then read and
   every acknowledged rating must be there with its stars. Repeated `--runs` times, each on a
   restarted server over the same database.
2. Training: one of those raters presses "Train my taste" on the demo world; once the LoRA
   phase has saved a checkpoint the server gets SIGKILL again. After a restart the job must say
   it failed because its worker stopped, the last checkpoint must be downloadable, no ratings
   may be missing, and "Train my taste" must work again: the bench runs it to the end.

    python bench/crash_safety.py --runs 3 --raters 16
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import requests
from rating_load import PASSWORD, TOKEN, Rater, prepare, start_server, wait_until_up
from taste_flow import wait_for

from tests.widgets import job_state as widget_state  # on the path once taste_flow put it there


class RecordingRater(Rater):
    """A rater who remembers what the server acknowledged: (image id, stars), in order."""

    def __init__(self, base: str, name: str):
        super().__init__(base, name)
        self.name, self.acked = name, []

    def step(self) -> bool:
        stars = random.randint(1, 5)
        form = {**self.fields, "stars": stars}
        headers = {"HX-Request": "true", "HX-Target": "rate-card"}
        url, image = f"{self.base}/rate/{self.image}", self.image
        response = self.http.post(url, data=form, headers=headers, timeout=60)
        if response.status_code != 200:
            return False
        self.acked.append((image, stars))
        return self.read(response.text)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stored_ratings(instance: Path) -> dict[tuple[str, int], int]:
    """(username, image id) -> stars, as the database holds them now."""
    with closing(sqlite3.connect(instance / "tastebud.db")) as con:
        rows = con.execute(
            "SELECT user.username, rating.image_id, rating.stars"
            " FROM rating JOIN user ON user.id = rating.user_id"
        ).fetchall()
    return {(name, image): stars for name, image, stars in rows}


def kill_under_rating_load(instance: Path, raters: int, seconds: float) -> tuple[int, int]:
    """Serve, rate, SIGKILL after `seconds`; return (acknowledged, lost)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(instance, "", port, None, 1)
    wait_until_up(server, base)
    people = [RecordingRater(base, f"rater{n:02d}") for n in range(raters)]

    def rate(person: RecordingRater) -> None:
        try:
            while person.step():
                pass
        except requests.RequestException:
            pass  # the server is gone

    threads = [threading.Thread(target=rate, args=(p,)) for p in people]
    for thread in threads:
        thread.start()
    time.sleep(seconds)  # the load runs for this long; then the kill, at an arbitrary moment
    server.kill()
    server.wait()
    for thread in threads:
        thread.join(timeout=120)
    stored = stored_ratings(instance)
    acked = {(p.name, image): stars for p in people for image, stars in p.acked}
    lost = sum(stored.get(key) != stars for key, stars in acked.items())
    return sum(len(p.acked) for p in people), lost


def signed_in(base: str, name: str) -> tuple[requests.Session, str]:
    """A session signed in as `name`, and the CSRF token its pages carry."""
    http = requests.Session()
    token = TOKEN.search(http.get(f"{base}/login", timeout=30).text).group(1)
    form = {"csrf_token": token, "username": name, "password": PASSWORD}
    http.post(f"{base}/login", data=form, timeout=30).raise_for_status()
    return http, TOKEN.search(http.get(f"{base}/taste/", timeout=30).text).group(1)


def train(http: requests.Session, base: str, token: str) -> int:
    """Press "Train my taste"; return the job id."""
    headers = {"HX-Request": "true", "X-CSRFToken": token}
    answer = http.post(f"{base}/taste/train", headers=headers, timeout=60)
    answer.raise_for_status()
    return widget_state(answer.text).id


def job_state(http: requests.Session, base: str, job_id: int) -> tuple[str, str, str]:
    """(status, phase, widget html) as the page's poll sees them."""
    html = http.get(f"{base}/jobs/{job_id}", headers={"HX-Request": "true"}, timeout=60).text
    state = widget_state(html)
    status, phase = state.status, state.phase
    return status, phase, html


def kill_mid_training(instance: Path) -> dict:
    """Train, SIGKILL in the LoRA phase after a checkpoint, restart, check, train again."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(instance, "", port, None, 1)
    wait_until_up(server, base)
    ratings_before = stored_ratings(instance)
    http, token = signed_in(base, "rater00")
    started = time.monotonic()
    job_id = train(http, base, token)

    def in_lora_with_a_checkpoint():
        status, phase, _ = job_state(http, base, job_id)
        if status != "running" or phase != "lora":
            return status in ("succeeded", "failed", "cancelled") and SystemExit(status)
        return any(instance.glob("taste/*/v*/lora/checkpoint-*/*.safetensors"))

    found = wait_for(in_lora_with_a_checkpoint, "a LoRA checkpoint", 1800)
    if isinstance(found, SystemExit):
        raise SystemExit(f"the job ended ({found}) before it could be killed; use more steps")
    killed_after = time.monotonic() - started
    server.kill()
    server.wait()
    # app.py fails jobs a dead worker left running
    server = start_server(instance, "", port, None, 1)
    try:
        wait_until_up(server, base)
        http, token = signed_in(base, "rater00")
        status, _, html = job_state(http, base, job_id)
        with closing(sqlite3.connect(instance / "tastebud.db")) as con:
            number, lora_dir = con.execute(
                "SELECT number, lora_dir FROM taste_version WHERE job_id = ?", (job_id,)
            ).fetchone()
        bundle = http.get(f"{base}/taste/versions/{number}/download/lora", timeout=60)
        half_written = [
            p.name for p in instance.rglob("*") if ".tmp" in p.name or p.name[:3] == "tmp"
        ]
        again = time.monotonic()
        second = train(http, base, token)
        wait_for(
            lambda: job_state(http, base, second)[0] in ("succeeded", "failed"), "retrain", 3600
        )
        return {
            "killed_after_s": killed_after,
            "status_after_restart": status,
            "says_why": "the worker stopped" in html,
            "kept_checkpoint": lora_dir,
            "its_bundle_bytes": len(bundle.content) if bundle.ok else 0,
            "ratings_missing": sum(
                stored_ratings(instance).get(k) != v for k, v in ratings_before.items()
            ),
            "half_written_files": half_written,
            "retrain": job_state(http, base, second)[0],
            "retrain_s": time.monotonic() - again,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rating-load kills")
    parser.add_argument("--raters", type=int, default=16)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=8, help="load before each kill")
    parser.add_argument("--no-training", action="store_true", help="only the rating kills")
    args = parser.parse_args()
    instance = Path(tempfile.mkdtemp(prefix="tastebud-crash-"))
    try:
        prepare(instance, "", args.raters, args.images, seed=0)
        total_acked = total_lost = 0
        print(f"kill -9 under rating load: {args.raters} raters, {args.seconds:g} s each run")
        for run in range(1, args.runs + 1):
            acked, lost = kill_under_rating_load(instance, args.raters, args.seconds)
            total_acked, total_lost = total_acked + acked, total_lost + lost
            print(f"  run {run}: {acked} ratings acknowledged, {lost} lost")
        print(f"  total: {total_acked} acknowledged, {total_lost} lost")
        if args.no_training:
            return
        print("kill -9 in the LoRA phase of Train my taste (rater00, demo world)")
        for name, value in kill_mid_training(instance).items():
            shown = f"{value:.1f}" if isinstance(value, float) else value
            print(f"  {name:24s} {shown}")
    finally:
        shutil.rmtree(instance, ignore_errors=True)


if __name__ == "__main__":
    main()
