"""A/B of two commits of streamfold on one harness, alternating, in one run.

    bench/measure_project.sh [A] [B] [--rounds 3] [--seconds 3] [--only json,fold,stream,c1,messages,responses]

A defaults to 778ffcc (the Part 1 code), B to the checkout's HEAD. Each commit
is checked out into a temporary worktree (``git worktree add --detach``) and
started from it with the same Python (this venv), the same gunicorn overrides
(workers, threads) over the commit's own gunicorn.conf.py, and the same settings
against one nginx upstream serving the same fixture answers as bench/run.py.
Both proxies stay up; every round runs each scenario on A and B back to back,
which goes first alternating round by round, so the machine's drift hits both.

Printed per scenario: the median over rounds of A and B (req/s, or the c1 p50
latency through the proxy minus direct to nginx, measured next to it), the
ratio B/A, and the workers' CPU per request pooled over the rounds (total
user+system CPU of each side's workers from /proc over the total requests
wrk completed) with its ratio. Scenarios a commit does not have (the bridges
before Part 2) are left out for both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402

KEY = bench.KEY
# name: (path, model, stream, connections, body)
SCENARIOS = {
    "json": ("/v1/chat/completions", "bench-json", False, 8, bench.BODY),
    "fold": ("/v1/chat/completions", "bench-fold", False, 8, bench.BODY),
    "stream": ("/v1/chat/completions", "bench-stream", True, 8, bench.BODY),
    "c1": ("/v1/chat/completions", "bench-json", False, 1, bench.BODY),
    "messages-stream": ("/v1/messages", "bench-stream", True, 8, bench.BODY),
    "messages-fold": ("/v1/messages", "bench-fold", False, 8, bench.BODY),
    "responses-stream": ("/v1/responses", "bench-bridge", True, 8, bench.RESPONSES_BODY),
    "responses-fold": ("/v1/responses", "bench-bridge-fold", False, 8, bench.RESPONSES_BODY),
}
GROUPS = {"messages": ("messages-stream", "messages-fold"), "responses": ("responses-stream", "responses-fold")}


def git(*args: str, cwd: Path = bench.ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


class Side:
    """One commit: its worktree, its settings, its running gunicorn."""

    def __init__(self, label: str, ref: str, parent: Path):
        self.label, self.sha = label, git("rev-parse", "--verify", f"{ref}^{{commit}}")
        self.tree = parent / f"{label}-{self.sha[:9]}"
        git("worktree", "add", "--detach", str(self.tree), self.sha)
        source = "\n".join(p.read_text() for p in self.tree.glob("proxy/**/*.py"))
        self.knows = {key for key in ("state-path", "native-apis", "/v1/messages", "/v1/responses")
                      if f'"{key}"' in source}
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def has(self, scenario: str) -> bool:
        path = SCENARIOS[scenario][0]
        return path == "/v1/chat/completions" or (path in self.knows and "native-apis" in self.knows)

    def write_settings(self, nginx_port: int) -> Path:
        """The bench providers against nginx, in the settings this commit understands."""
        import yaml
        providers = bench.providers(nginx_port, bridges="native-apis" in self.knows)
        document = {"api-keys": [KEY], "timeouts": {"connect": 5, "read": 60}, "openai-compatibility": providers}
        if "state-path" in self.knows:
            document["state-path"] = str(self.tree / "bench-state.db")
        settings = self.tree / "bench-settings.yaml"
        settings.write_text(yaml.safe_dump(document, sort_keys=False))
        return settings

    def start(self, nginx_port: int, env: dict) -> None:
        settings = self.write_settings(nginx_port)
        self.port = bench.free_port()
        environ = dict(os.environ, PROXY_SETTINGS=str(settings), LOG_LEVEL="warning", **env)
        for name in ("PORT", "PROMETHEUS_MULTIPROC_DIR", "STREAMFOLD_METRICS_DIR_MADE", "REDIS_URL"):
            environ.pop(name, None)
        log = open(self.tree / "bench-proxy.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "app:app", "--bind",
                                      f"127.0.0.1:{self.port}"], cwd=self.tree, env=environ,
                                     stdout=log, stderr=subprocess.STDOUT)
        bench.wait_port(self.port, path="/healthz")

    def url(self, scenario: str) -> str:
        return f"http://127.0.0.1:{self.port}{SCENARIOS[scenario][0]}"

    def measure(self, scenario: str, seconds: float) -> dict:
        _, model, stream, connections, body = SCENARIOS[scenario]
        before = bench.worker_cpu_seconds(self.proc.pid)
        result = bench.wrk_once(self.url(scenario), model, connections, seconds, stream, body)
        result["cpu_s"] = bench.worker_cpu_seconds(self.proc.pid) - before
        return result

    def close(self) -> None:
        if self.proc is not None:
            bench.stop(self.proc)
        subprocess.run(["git", "worktree", "remove", "--force", str(self.tree)], cwd=bench.ROOT,
                       capture_output=True)


def median(values: list[float]) -> float:
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def run(args) -> dict:
    bench.WORK.mkdir(exist_ok=True)
    www = bench.write_fixtures()
    nginx_port = bench.free_port()
    parent = Path(tempfile.mkdtemp(prefix="streamfold-ab-"))
    env = {"WEB_CONCURRENCY": str(args.workers), "GUNICORN_THREADS": str(args.threads)}
    sides: list[Side] = []
    nginx = bench.start_nginx(www, nginx_port)
    try:
        sides = [Side("A", args.a, parent), Side("B", args.b, parent)]
        for side in sides:
            side.start(nginx_port, env)
        scenarios = [name for name in args.only if all(side.has(name) for side in sides)]
        skipped = [name for name in args.only if name not in scenarios]
        direct = f"http://127.0.0.1:{nginx_port}/json/v1/chat/completions"
        for side in sides:  # warm-up: pools opened, caches filled
            for name in scenarios:
                side.measure(name, 1)
        runs = {name: {"A": [], "B": [], "direct": []} for name in scenarios}
        for round_ in range(args.rounds):
            order = sides if round_ % 2 == 0 else sides[::-1]
            for name in scenarios:
                for side in order:
                    runs[name][side.label].append(side.measure(name, args.seconds))
                if name == "c1":  # the direct figure next to the proxied ones
                    runs[name]["direct"].append(bench.wrk_once(direct, "x", 1, args.seconds, False))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for side in sides:
            side.close()
        bench.stop(nginx)
        shutil.rmtree(parent, ignore_errors=True)
    return {"a": sides[0].sha, "b": sides[1].sha, "rows": rows(runs), "skipped": skipped}


def rows(runs: dict) -> list[dict]:
    out = []
    for name, sides in runs.items():
        row = {"scenario": name, "errors": sum(r["errors"] for label in "AB" for r in sides[label])}
        for label in "AB":
            results = sides[label]
            if name == "c1":
                row[label] = median([r["p50_ms"] - d["p50_ms"] for r, d in zip(results, sides["direct"])])
                row["unit"] = "ms added p50"
            else:
                row[label] = median([r["rps"] for r in results])
                row["unit"] = "req/s"
            row[f"cpu_{label}_us"] = sum(r["cpu_s"] for r in results) * 1e6 / max(1, sum(r["requests"] for r in results))
        row["ratio"] = row["B"] / row["A"] if row["A"] else None
        row["cpu_ratio"] = row["cpu_B_us"] / row["cpu_A_us"] if row["cpu_A_us"] else None
        out.append(row)
    return out


def print_table(result: dict) -> None:
    print(f"A = {result['a'][:9]}, B = {result['b'][:9]}; medians over rounds, CPU per request pooled")
    print(f"{'scenario':18} {'A':>10} {'B':>10} {'B/A':>6}  {'unit':14} {'CPU A µs':>9} {'CPU B µs':>9} {'B/A':>6}")
    for r in result["rows"]:
        errors = f"  ({r['errors']} errors)" if r["errors"] else ""
        print(f"{r['scenario']:18} {r['A']:>10,.2f} {r['B']:>10,.2f} {r['ratio']:>6.3f}  {r['unit']:14} "
              f"{r['cpu_A_us']:>9,.0f} {r['cpu_B_us']:>9,.0f} {r['cpu_ratio']:>6.3f}{errors}")
    if result["skipped"]:
        print(f"not in both commits, skipped: {', '.join(result['skipped'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description="streamfold A/B of two commits, alternating")
    parser.add_argument("a", nargs="?", default="778ffcc", help="the reference commit (default: 778ffcc, Part 1)")
    parser.add_argument("b", nargs="?", default="HEAD", help="the commit compared with it (default: HEAD)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3, help="duration of each wrk run")
    parser.add_argument("--only", default="json,fold,stream,c1",
                        help="scenarios: json,fold,stream,c1,messages,responses "
                             "(messages/responses: the bridges, stream and forced fold)")
    parser.add_argument("--workers", type=int, default=(os.cpu_count() or 1) + 1)
    parser.add_argument("--threads", type=int, default=512)
    parser.add_argument("--output", default=str(HERE / "ab-results.json"))
    args = parser.parse_args()
    args.only = [name for part in args.only.split(",") for name in GROUPS.get(part, (part,))]
    unknown = [name for name in args.only if name not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario: {', '.join(unknown)}")
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run bench/run.sh once, which installs it")
    result = run(args)
    print_table(result)
    Path(args.output).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": os.cpu_count(),
                                             "rounds": args.rounds, "seconds": args.seconds, **result}, indent=2))


if __name__ == "__main__":
    main()
