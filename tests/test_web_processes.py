"""WEB_PROCESSES: `python app.py` serves with several processes on one socket, replaces one
that dies, and takes them all down when it stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from tests.polling import wait_for
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[1]


def children(pid: int) -> set[int]:
    """The processes `pid` started (Linux /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "Z"


def answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/login", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_several_web_processes_serve_and_one_that_dies_is_replaced(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TASTEBUD_INSTANCE_PATH": str(tmp_path),
        "TASTEBUD_HOST": "127.0.0.1",
        "TASTEBUD_PORT": str(port),
        "TASTEBUD_WEB_PROCESSES": "2",
        "TASTEBUD_EMBEDDED_GPU_WORKER": "false",
    }
    env.pop("TASTEBUD_DATABASE_URL", None)  # SQLite (WAL) coordinates the processes here
    env.pop("TASTEBUD_REDIS_URL", None)
    with open(tmp_path / "log", "wb") as log:
        parent = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: len(children(parent.pid)) == 2 and answers(base), 90, "two servers")
        servers = children(parent.pid)
        for _ in range(20):  # the socket is shared: every request is answered, by either
            assert answers(base)
        victim = min(servers)
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: victim not in children(parent.pid) and len(children(parent.pid)) == 2,
            30,
            "a replacement server",
        )
        wait_for(lambda: answers(base), 30, "serving again")
        servers = children(parent.pid)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
        wait_for(lambda: not any(alive(pid) for pid in servers), 15, "no server left behind")
        assert "by 2 processes" in (tmp_path / "log").read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
