"""Probe bench: what one client sending a chunk-size line that never ends costs the server.

The outside probe's repro: `POST /login` with `Transfer-Encoding: chunked` and a chunk-size
line with no end. The same site is served twice, each in its own process, by stock waitress
(the baseline) and by `rating.server` (what `python app.py` runs); for each the bench prints
the server's CPU seconds spent on the attack, how long until the server answered, and how long
a normal page took to load while the attack was under way.

    python bench/malformed_chunks.py --mib 8
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD = (
    b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
)
SETTLE = 1.0  # the server is done when its CPU time has not moved for this long


def serve(server: str, instance: str) -> None:
    """Child process: serve a fresh site with `server` on a free port; print the port."""
    sys.path.insert(0, str(ROOT))
    import waitress

    from app import create_app
    from rating import server as tastebud_server

    config = {"SECRET_KEY": "bench", "QUEUE": "immediate", "DATABASE_URL": "", "STORAGE_ROOT": ""}
    app = create_app(config, instance_path=instance)
    if server == "waitress":
        httpd = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    else:
        httpd = tastebud_server.create_server(app, "127.0.0.1", 0)
    print(httpd.effective_port, flush=True)
    httpd.run()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def page_seconds(port: int) -> float:
    """Seconds to load the sign-in page on a fresh connection."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    return time.perf_counter() - started


def attack(server: str, mib: float) -> dict:
    """Serve the site with `server`, send the malformed body, and measure what it cost."""
    with tempfile.TemporaryDirectory() as instance:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", server, "--instance", instance],
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            port = int(child.stdout.readline())
            page_seconds(port)  # warm: templates compiled, database open
            before = cpu_seconds(child.pid)
            sent, answered, started = 0, None, time.perf_counter()
            probe: list[float] = []
            prober = threading.Thread(target=lambda: probe.append(page_seconds(port)))
            with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
                sock.sendall(HEAD)
                total = int(mib * 2**20)
                while sent < total and answered is None:
                    sock.sendall(b"f" * 65536)
                    sent += 65536
                    if sent == total // 2 // 65536 * 65536:
                        prober.start()  # a normal visitor arrives halfway through the attack
                    if select.select([sock], [], [], 0)[0]:
                        answered = time.perf_counter() - started
            if prober.ident is None:  # refused before halfway: the visitor comes now
                prober.start()
            prober.join(timeout=600)
            last, still = cpu_seconds(child.pid), time.perf_counter()
            while time.perf_counter() - still < SETTLE:  # until the server stops working
                time.sleep(0.1)
                now = cpu_seconds(child.pid)
                if now != last:
                    last, still = now, time.perf_counter()
            return {
                "cpu": last - before,
                "busy": still - started,
                "sent": sent,
                "answered": answered,
                "page": probe[0] if probe else float("nan"),
            }
        finally:
            child.kill()
            child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=8.0, help="size of the never-ending line")
    parser.add_argument("--serve", choices=["waitress", "tastebud"], help=argparse.SUPPRESS)
    parser.add_argument("--instance", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.instance)
    results = {server: attack(server, args.mib) for server in ("waitress", "tastebud")}
    print(f"a chunk-size line of {args.mib:g} MiB with no end, sent to POST /login")
    print(
        f"{'server':<10} {'server CPU':>11} {'busy for':>9} {'sent':>9} {'answered':>9} "
        f"{'page mid-attack':>16}"
    )
    for server, r in results.items():
        answered = "never" if r["answered"] is None else f"{r['answered'] * 1000:.0f} ms"
        print(
            f"{server:<10} {r['cpu'] * 1000:>8.0f} ms {r['busy']:>7.2f} s "
            f"{r['sent'] / 2**20:>5.2f} MiB {answered:>9} {r['page'] * 1000:>13.0f} ms"
        )
    base, ours = results["waitress"]["cpu"], results["tastebud"]["cpu"]
    tick = 1 / os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in ticks
    print(f"server CPU, tastebud / stock waitress: <= {max(ours, tick) / base:.4f}" if base else "")


if __name__ == "__main__":
    main()
