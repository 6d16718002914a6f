"""Instructions per request of two commits' app, in-process under callgrind: a measure this VM's load cannot move.

    python bench/instructions.py [A] [B] [--requests 200] [--only json,fold,stream,...] [--keep DIR]

A defaults to 778ffcc (the Part 1 code), B to HEAD. Scenarios: json, fold,
stream (chat), and the bridges (responses, responses-fold, messages,
messages-fold) for commits that have them. Each commit is checked out
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
# scenario: (path, model, stream, body template name in bench/run.py); the bridges' rows need native-apis
CHAT = "/v1/chat/completions"
MODELS = {"json": (CHAT, "bench-json", False, "BODY"), "fold": (CHAT, "bench-fold", False, "BODY"),
          "stream": (CHAT, "bench-stream", True, "BODY"),
          "responses": ("/v1/responses", "bench-bridge", True, "RESPONSES_BODY"),
          "responses-fold": ("/v1/responses", "bench-bridge-fold", False, "RESPONSES_BODY"),
          "messages": ("/v1/messages", "bench-stream", True, "BODY"),
          "messages-fold": ("/v1/messages", "bench-fold", False, "BODY")}
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


def child(root: str, settings: str, body: bytes, key: str, count: int, toggle: str, path: str = CHAT) -> None:
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
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SCRIPT_NAME": "",
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
          keep: Path | None = None, threads: str = "-01") -> float:
    import json
    path, model, stream, template = MODELS[scenario]
    body = json.dumps({**getattr(bench, template), "model": model, "stream": stream})
    out = Path(tempfile.mkdtemp(prefix="sf-callgrind-"))
    try:
        subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", "--instr-atstart=no",
                        f"--callgrind-out-file={out}/cg.out", sys.executable, __file__, "--child", str(root),
                        str(settings), body, bench.KEY, str(requests), str(toggle), path],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total = 0
        for path in out.glob(f"cg.out*{threads}"):  # -01: the main thread (background ticks are other threads)
            for line in path.read_text().splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        if keep is not None:  # for callgrind_annotate: the main thread's profile, per function
            keep.mkdir(parents=True, exist_ok=True)
            for path in out.glob(f"cg.out*{threads}"):
                shutil.copy(path, keep / path.name.replace("cg.out", f"{scenario}-{root.name}"))
        return total / requests
    finally:
        shutil.rmtree(out, ignore_errors=True)


def count_worker(bench, root: Path, settings: Path, scenario: str, requests: int) -> float:
    """``--gunicorn``: the whole of one gunicorn worker (event loop, request threads, background threads) per
    request, the commit's own gunicorn.conf.py with one worker, requests one at a time on one keep-alive
    connection (as the c1 row), counted between callgrind_control's zeroing and dump."""
    import json
    import socket
    path, model, stream, template = MODELS[scenario]
    body = json.dumps({**getattr(bench, template), "model": model, "stream": stream}).encode()
    port = bench.free_port()
    out = Path(tempfile.mkdtemp(prefix="sf-callgrind-"))
    environ = dict(os.environ, PROXY_SETTINGS=str(settings), LOG_LEVEL="warning", WEB_CONCURRENCY="1",
                   GUNICORN_THREADS="8")
    for name in ("PORT", "PROMETHEUS_MULTIPROC_DIR", "REDIS_URL"):
        environ.pop(name, None)
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--trace-children=yes", "--separate-threads=yes",
                             f"--callgrind-out-file={out}/cg.%p", sys.executable, "-m", "gunicorn", "app:app",
                             "--bind", f"127.0.0.1:{port}"], cwd=root, env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_port(port, path="/healthz", timeout=900)
        request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {bench.KEY}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        with socket.create_connection(("127.0.0.1", port)) as sock:
            def one() -> None:  # head and body in one write, as wrk sends them; the answer read whole
                sock.sendall(request)
                got = b""
                while True:
                    data = sock.recv(65536)
                    if not data:
                        sys.exit("the proxy closed the connection")
                    got += data
                    head, _, rest = got.partition(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        sys.exit(f"the proxy answered {head[:40]!r}")
                    if b"content-length:" in head.lower():
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        if len(rest) >= length:
                            return
                    elif rest.endswith(b"0\r\n\r\n"):  # chunked: its last chunk
                        return

            for _ in range(50):
                one()
            worker = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
            subprocess.run(["callgrind_control", "-z", worker], check=True, capture_output=True)
            for _ in range(requests):
                one()
            subprocess.run(["callgrind_control", "-d", worker], check=True, capture_output=True)
        total = 0
        for dump in out.glob(f"cg.{worker}.*"):  # the dump asked for, every thread of the worker
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        return total / requests
    finally:
        bench.stop(proc)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        root, settings, body, key, requests, toggle, path = sys.argv[2:9]
        child(root, settings, body.encode(), key, int(requests), toggle, path)
        return
    sys.path.insert(0, str(HERE))
    import ab
    import run as bench
    parser = argparse.ArgumentParser(description="instructions per request of two commits, in-process")
    parser.add_argument("a", nargs="?", default="778ffcc")
    parser.add_argument("b", nargs="?", default="HEAD")
    parser.add_argument("--requests", type=int, default=200, help="requests counted per scenario and commit")
    parser.add_argument("--only", default="json,fold,stream",
                        help=f"scenarios: {','.join(MODELS)} (the bridges need a commit with native-apis on both sides)")
    parser.add_argument("--all-threads", action="store_true",
                        help="count every thread, not the main thread only: for a route that reads on helper "
                             "threads (the Anthropic bridge's pump); background ticks then add a little")
    parser.add_argument("--gunicorn", action="store_true",
                        help="count the whole of one gunicorn worker instead (all its threads, the commit's own "
                             "worker class), requests one at a time on a keep-alive connection; slow to start")
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
        what = ("one gunicorn worker, all threads" if args.gunicorn else
                f"{'all threads' if args.all_threads else 'main thread'}, in-process")
        print(f"A = {sides[0].sha[:9]}, B = {sides[1].sha[:9]}; instructions per request, {what}")
        for scenario in args.only.split(","):
            if args.gunicorn:
                a, b = (count_worker(bench, side.tree, path, scenario, args.requests)
                        for side, path in zip(sides, settings))
            else:
                a, b = (count(bench, side.tree, path, scenario, args.requests, toggle, args.keep,
                              "" if args.all_threads else "-01")
                        for side, path in zip(sides, settings))
            print(f"{scenario:8} A {a:12,.0f}  B {b:12,.0f}  B/A {b / a:.3f}")
    finally:
        for side in sides:
            side.close()
        bench.stop(nginx)
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
