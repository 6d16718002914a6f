"""Instructions per request of two commits' app, in-process under callgrind: a measure this VM's load cannot move.

    python bench/instructions.py [A] [B] [--requests 200] [--only json,fold,stream] [--keep DIR]

A defaults to 778ffcc (the Part 1 code), B to HEAD. Each commit is checked out
into a temporary worktree (as bench/ab.py does) and its Flask app is built in
a child process run by ``valgrind --tool=callgrind``, against the same nginx
upstream and settings as the A/B. The child sends warm-up requests through
the WSGI interface directly, then counts only the main thread's instructions
over ``--requests`` more (callgrind's instrumentation is switched on and off
around them through a tiny C helper compiled here with gcc, since Python has
no other way to ask for it). No gunicorn: this is the app's own work per
request (Flask, routing, the upstream client, record keeping), exactly
repeatable (within about 0.3%), where wall-clock and CPU-time figures on a
shared 2-core VM move by 10-30%. Needs valgrind, gcc and valgrind's headers.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"json": ("bench-json", False), "fold": ("bench-fold", False), "stream": ("bench-stream", True)}
HELPER = """#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""


def helper(bench) -> Path:
    """The shared object that switches callgrind's counting on and off."""
    made = bench.WORK / "callgrind-toggle.so"
    if not made.exists():
        source = bench.WORK / "callgrind-toggle.c"
        source.write_text(HELPER)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(made), str(source)], check=True)
    return made


def child(root: str, settings: str, body: bytes, key: str, count: int, toggle: str) -> None:
    """In the valgrind'ed process: the commit's app, warm-up requests, then ``count`` counted ones. Imports
    nothing of the bench, so the process holds what a worker holds."""
    import ctypes
    sys.path.insert(0, root)
    os.chdir(root)
    os.environ.update(PROXY_SETTINGS=settings, PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="sf-instr-"),
                      STREAMFOLD_INSTANCE_SECRET=os.urandom(32).hex())
    sys.stderr = open(os.devnull, "w")  # the access log: written as under gunicorn, not shown
    from proxy import create_app
    app = create_app()
    statuses = []

    def one() -> None:
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "SCRIPT_NAME": "",
                   "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8317",
                   "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
                   "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0),
                   "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
                   "HTTP_AUTHORIZATION": f"Bearer {key}", "HTTP_HOST": "127.0.0.1:8317"}
        answer = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
        for _ in answer:
            pass
        getattr(answer, "close", lambda: None)()

    for _ in range(50):
        one()
    if not statuses[-1].startswith("200"):
        sys.exit(f"warm-up answered {statuses[-1]}")
    switch = ctypes.CDLL(toggle)
    switch.start()
    for _ in range(count):
        one()
    switch.stop()


def count(bench, root: Path, settings: Path, scenario: str, requests: int, toggle: Path,
          keep: Path | None = None) -> float:
    import json
    model, stream = MODELS[scenario]
    body = json.dumps({**bench.BODY, "model": model, "stream": stream})
    out = Path(tempfile.mkdtemp(prefix="sf-callgrind-"))
    try:
        subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", "--instr-atstart=no",
                        f"--callgrind-out-file={out}/cg.out", sys.executable, __file__, "--child", str(root),
                        str(settings), body, bench.KEY, str(requests), str(toggle)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total = 0
        for path in out.glob("cg.out*-01"):  # the main thread (background ticks are other threads)
            for line in path.read_text().splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        if keep is not None:  # for callgrind_annotate: the main thread's profile, per function
            keep.mkdir(parents=True, exist_ok=True)
            for path in out.glob("cg.out*-01"):
                shutil.copy(path, keep / path.name.replace("cg.out", f"{scenario}-{root.name}"))
        return total / requests
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        root, settings, body, key, requests, toggle = sys.argv[2:8]
        child(root, settings, body.encode(), key, int(requests), toggle)
        return
    sys.path.insert(0, str(HERE))
    import ab
    import run as bench
    parser = argparse.ArgumentParser(description="instructions per request of two commits, in-process")
    parser.add_argument("a", nargs="?", default="778ffcc")
    parser.add_argument("b", nargs="?", default="HEAD")
    parser.add_argument("--requests", type=int, default=200, help="requests counted per scenario and commit")
    parser.add_argument("--only", default="json,fold,stream")
    parser.add_argument("--keep", type=Path, help="copy each run's callgrind profile (main thread) into this "
                        "folder, named <scenario>-<side>, for callgrind_annotate")
    args = parser.parse_args()
    for tool in ("valgrind", "gcc", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    bench.WORK.mkdir(exist_ok=True)
    toggle = helper(bench)
    nginx_port = bench.free_port()
    nginx = bench.start_nginx(bench.write_fixtures(), nginx_port)
    parent = Path(tempfile.mkdtemp(prefix="streamfold-instr-"))
    sides: list[ab.Side] = []
    try:
        sides = [ab.Side("A", args.a, parent), ab.Side("B", args.b, parent)]
        settings = [side.write_settings(nginx_port) for side in sides]
        print(f"A = {sides[0].sha[:9]}, B = {sides[1].sha[:9]}; instructions per request, main thread, in-process")
        for scenario in args.only.split(","):
            a, b = (count(bench, side.tree, path, scenario, args.requests, toggle, args.keep)
                    for side, path in zip(sides, settings))
            print(f"{scenario:8} A {a:12,.0f}  B {b:12,.0f}  B/A {b / a:.3f}")
    finally:
        for side in sides:
            side.close()
        bench.stop(nginx)
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
