"""A scaled-out tastebud on this machine, as a deployer runs it: the web app, a GPU worker and
a light worker as separate processes, each with an instance folder of its own, sharing one
storage root, the database and Redis (those of a --services run, tests/services.py).

`COMMANDS` are the services' commands; `compose.yaml` runs exactly these (tests/test_scale.py
checks that it does).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from tests.polling import wait_for
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "web": ["python", "app.py"],
    "gpu-worker": ["flask", "--app", "app", "jobs", "worker", "--gpu"],
    "worker": ["flask", "--app", "app", "jobs", "worker", "--threads", "2"],
}
TOKEN = re.compile(r'"X-CSRFToken": "([^"]+)"')  # the htmx header every page carries
PASSWORD = "correct horse battery"


def local(command: list[str]) -> list[str]:
    """A service's command with this environment's Python and flask."""
    programs = {"python": sys.executable, "flask": str(Path(sys.executable).with_name("flask"))}
    return [programs.get(command[0], command[0]), *command[1:]]


class Deployment:
    """Start and stop the services; `settings` become TASTEBUD_* variables for all of them."""

    def __init__(self, root: Path, settings: dict):
        self.root, self.port = root, free_port()
        self.storage = root / "storage"
        self.storage.mkdir(parents=True)
        self.base = f"http://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,  # TASTEBUD_DATABASE_URL and TASTEBUD_REDIS_URL of the --services run
            "OMP_NUM_THREADS": "1",
            "TASTEBUD_HOST": "127.0.0.1",
            "TASTEBUD_PORT": str(self.port),
            "TASTEBUD_STORAGE_ROOT": str(self.storage),
            "TASTEBUD_SECRET_KEY": "the same on every machine",
            "TASTEBUD_EMBEDDED_WORKER": "false",
            "TASTEBUD_EMBEDDED_GPU_WORKER": "false",
        }
        self.env |= {f"TASTEBUD_{name}": json.dumps(value) for name, value in settings.items()}

    def start(self, service: str, host: str | None = None) -> subprocess.Popen:
        """Start a service (its own instance folder and log); the web one, until it answers.

        With `host`, it runs under that host name (a UTS namespace of its own, `other_host`),
        as on another machine: its death is then seen only by its missing heartbeats.
        """
        instance = self.root / service
        instance.mkdir(exist_ok=True)
        env = self.env | {"TASTEBUD_INSTANCE_PATH": str(instance)}
        command = local(COMMANDS[service])
        if host:
            command = [
                "unshare",
                "--uts",
                "sh",
                "-c",
                f'hostname {host} && exec "$@"',
                "-",
                *command,
            ]
        with open(instance / "log", "ab") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.processes[service] = process
        if service == "web":
            self._wait_until_up(process)
        return process

    def _wait_until_up(self, process: subprocess.Popen, limit: float = 90) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"{self.base}/static/style.css", timeout=2).ok:
                    return
            except requests.RequestException:  # not listening yet, or not answering yet
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the web did not answer within {limit} s:\n{self.log('web')}")

    def kill(self, service: str) -> None:
        """kill -9 a service (and reap it, so its pid is gone as on a crashed machine)."""
        process = self.processes.pop(service)
        process.kill()
        process.wait(timeout=30)

    def log(self, service: str) -> str:
        path = self.root / service / "log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)}" for name in COMMANDS)

    def stop(self) -> None:
        """Stop every service: Ctrl-C first, then kill what is left."""
        for process in self.processes.values():
            process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)
        self.processes.clear()


class Browser:
    """One person's cookie jar on the deployment, posting forms as the pages do."""

    def __init__(self, base: str):
        self.base, self.http = base, requests.Session()

    def token(self) -> str:
        return TOKEN.search(self.http.get(f"{self.base}/login", timeout=30).text).group(1)

    def post(self, path: str, data: dict | None = None, htmx: bool = False, timeout=60):
        headers = {"HX-Request": "true"} if htmx else {}
        form = {"csrf_token": self.token(), **(data or {})}
        return self.http.post(f"{self.base}{path}", data=form, headers=headers, timeout=timeout)

    def get(self, path: str, timeout=60):
        return self.http.get(f"{self.base}{path}", timeout=timeout)

    def register(self, name: str) -> None:
        form = {"username": name, "password": PASSWORD, "confirm": PASSWORD}
        answer = self.post("/register", form)
        assert answer.ok and "Sign out" in answer.text, answer.text[:500]


def other_host_possible() -> bool:
    """Whether a service can run under another host name here (root, and namespaces allowed)."""
    try:
        done = subprocess.run(
            ["unshare", "--uts", "sh", "-c", "hostname probe"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def register_people(base: str, count: int) -> list[Browser]:
    """`count` people registered (rater0, rater1, …), each signed in with a browser of their own."""
    people = [Browser(base) for _ in range(count)]
    for n, person in enumerate(people):
        person.register(f"rater{n}")
    return people


class RatingThroughFault:
    """People rating at a person's pace while something breaks: `run(fault)` has every browser
    rate the pool in its own order, calls `fault()` once `before` ratings are acknowledged, and
    stops `after` more acknowledged ratings later. Then `acknowledged` holds (person, image,
    stars) for each 200 answer, and `refused` (status or error name, text) for the others."""

    def __init__(self, browsers: list[Browser], image_ids: list[int]):
        self.browsers, self.image_ids = browsers, image_ids
        self.acknowledged: list[tuple[int, int, int]] = []
        self.refused: list[tuple[int | str, str]] = []
        self._stop = threading.Event()

    def run(self, fault, before: int = 40, after: int = 40, limit: float = 60) -> None:
        threads = [
            threading.Thread(target=self._rate, args=(n, browser))
            for n, browser in enumerate(self.browsers)
        ]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(self.acknowledged) >= before, limit, "ratings before the fault")
            fault()
            done = len(self.acknowledged) + after
            wait_for(lambda: len(self.acknowledged) >= done, limit, "ratings after the fault")
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=60)

    def _rate(self, person: int, browser: Browser) -> None:
        for image_id in random.Random(person).sample(self.image_ids, len(self.image_ids)):
            if self._stop.is_set():
                return
            stars = 1 + (image_id + person) % 5
            try:
                answer = browser.post(f"/rate/{image_id}", {"stars": stars}, htmx=True, timeout=30)
            except requests.RequestException as error:  # refused: nothing acknowledged
                self.refused.append((type(error).__name__, str(error)))
                continue
            if answer.status_code == 200:
                self.acknowledged.append((person, image_id, stars))
            else:
                self.refused.append((answer.status_code, answer.text))
            time.sleep(0.05)  # a person's pace, roughly, so the load spans the fault

    def lost(self, saved: dict[tuple[int, int], int], user_ids: list[int]) -> list:
        """The acknowledged ratings `saved` ({(user id, image id): stars}) does not hold;
        `user_ids[n]` is the n-th browser's account."""
        return [
            (person, image_id)
            for person, image_id, stars in self.acknowledged
            if saved.get((user_ids[person], image_id)) != stars
        ]

    def bare_errors(self) -> list[str]:
        """Refusals that were not the site's own database-away answer (503)."""
        return [
            text
            for code, text in self.refused
            if isinstance(code, int) and not (code == 503 and "database can" in text)
        ]
