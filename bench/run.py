"""streamfold benchmark: the proxy against the same upstream called directly, one table.

    bench/run.sh [--seconds 5] [--smoke] [--with-litellm] [--only json,fold,stream,responses,messages,gemini,endurance]

Starts nginx (a static upstream that is never the bottleneck) serving fixture
answers, the proxy under gunicorn with the shipped gunicorn.conf.py, and wrk as
the load generator; runs each scenario for a fixed time; stops all it started;
prints scenario / proxy / direct / ratio and writes bench/results.json.
Load generator, upstream and proxy share the machine's cores, as they would on
one box; the ratios are what matter.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import endurance  # noqa: E402
from fold_bench import make_stream  # noqa: E402

KEY = "sk-bench-client-key"
# The same traffic on a key with every policy set (limits far above what the bench
# reaches, so nothing is refused): the "limits" rows measure what checking costs.
LIMITED_KEY = "sk-bench-limited-key"
LIMITED = {"key": LIMITED_KEY, "name": "bench-limited", "models": ["bench-*"], "rpm": 10**9, "tpm": 10**12,
           "max-concurrent": 100000}
BODY = {"model": "{model}", "messages": [{"role": "user", "content": "Say hello in one word."}],
        "max_tokens": 16}
# The same question as a Responses request (the bridged /v1/responses rows), as Codex sends it: store false
# (a stored answer adds one SQLite write, ~0.3 ms CPU, measured separately and noted in the README).
RESPONSES_BODY = {"model": "{model}", "input": "Say hello in one word.", "max_output_tokens": 16, "store": False}
# The same question as a Gemini generateContent body (the model and the stream are in the URL; the "model" and
# "stream" keys wrk_once adds are fields the Gemini API ignores).
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "Say hello in one word."}]}],
               "generationConfig": {"maxOutputTokens": 16}}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fixtures and servers ---------------------------------------------------------------------
def completion_json() -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1764000000, "model": "bench-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! " * 40},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 14, "completion_tokens": 80, "total_tokens": 94}}).encode()


def stream_200() -> bytes:
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764000000, "model": "bench"}
    events = [dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}])]
    events += [dict(head, choices=[{"index": 0, "delta": {"content": f" token{i}"}, "logprobs": None,
                                    "finish_reason": None}]) for i in range(197)]
    events.append(dict(head, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    events.append(dict(head, choices=[], usage={"prompt_tokens": 14, "completion_tokens": 198,
                                                "total_tokens": 212}))
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events) \
        + b"data: [DONE]\n\n"


def write_fixtures() -> Path:
    www = WORK / "www"
    for name, content in (("json", completion_json()), ("sse200", stream_200()), ("sse2000", make_stream())):
        target = www / name / "v1" / "chat" / "completions"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return www


def start_nginx(www: Path, port: int) -> subprocess.Popen:
    conf = WORK / "nginx.conf"
    # Started as root, nginx runs its worker as `nobody`, which cannot read a
    # checkout in a private directory (a mktemp -d folder, a 0700 home): every
    # request would be a 403. A root run keeps the worker as root instead (a
    # static loopback server for the bench); as any other user, nginx cannot
    # switch users and its worker reads what that user can.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {WORK}/nginx.pid;
error_log {WORK}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {WORK}/nginx-body;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        # Static files answer POST with 405; serve the file instead.
        error_page 405 =200 $uri;
        location /json/ {{ default_type application/json; }}
        location /sse200/ {{ default_type text/event-stream; }}
        location /sse2000/ {{ default_type text/event-stream; }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(WORK)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def providers(nginx_port: int, bridges: bool = True) -> list[dict]:
    """The nginx-served providers (bridges: the two chat-only ones the bridged rows ask; needs native-apis)."""
    base = f"http://127.0.0.1:{nginx_port}"
    out = [
        {"name": "json", "base-url": f"{base}/json/v1", "models": [{"name": "bench-model", "alias": "bench-json"}]},
        {"name": "fold", "base-url": f"{base}/sse200/v1", "force-upstream-stream": True,
         "models": [{"name": "bench-model", "alias": "bench-fold"}]},
        {"name": "stream", "base-url": f"{base}/sse200/v1",
         "models": [{"name": "bench-model", "alias": "bench-stream"}]},
    ]
    if bridges:
        out += [
            {"name": "bridge", "base-url": f"{base}/sse200/v1", "native-apis": ["chat"],
             "models": [{"name": "bench-model", "alias": "bench-bridge"}]},
            {"name": "bridge-fold", "base-url": f"{base}/sse200/v1", "native-apis": ["chat"],
             "force-upstream-stream": True, "models": [{"name": "bench-model", "alias": "bench-bridge-fold"}]},
        ]
    return out


def settings(nginx_port: int, slow_port: int) -> Path:
    import yaml
    providers_ = providers(nginx_port) + [
        {"name": "slow", "base-url": f"http://127.0.0.1:{slow_port}/v1",
         "models": [{"name": "bench-model", "alias": "bench-slow"}]}]
    path = WORK / "settings.yaml"
    path.write_text(yaml.safe_dump({"api-keys": [KEY, LIMITED], "timeouts": {"connect": 5, "read": 60},
                                    "state-path": str(WORK / "state.db"),  # not the checkout
                                    "openai-compatibility": providers_}, sort_keys=False))
    return path


def start_proxy(settings_path: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    environ = dict(os.environ, PROXY_SETTINGS=str(settings_path), LOG_LEVEL="warning", **(env or {}))
    environ.pop("PORT", None)
    log = open(WORK / "proxy.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{port}"],
                            cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, path="/healthz")
    return proc


def wait_port(port: int, path: str | None = None, timeout: float = 30) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if path is None:
                    return
                sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                if b" 200 " in sock.recv(1024):
                    time.sleep(0.5)  # let every worker finish booting
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- wrk --------------------------------------------------------------------------------------
def wrk(url: str, model: str, connections: int, seconds: float, stream: bool = False, repeat: int = 1,
        template: dict = BODY, key: str = KEY) -> dict:
    """Median of ``repeat`` wrk runs (by req/s): one run on 2 shared cores varies by +-30%."""
    runs = sorted((wrk_once(url, model, connections, seconds, stream, template, key) for _ in range(repeat)),
                  key=lambda r: r["rps"])
    return runs[len(runs) // 2]


def wrk_once(url: str, model: str, connections: int, seconds: float, stream: bool, template: dict = BODY,
             key: str = KEY) -> dict:
    body = json.dumps({**template, "model": model, "stream": stream})
    script = WORK / f"post-{model}-{int(stream)}-{key[-6:]}.lua"
    script.write_text(f"""
wrk.method = "POST"
wrk.body = {json.dumps(body)}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
""")
    threads = max(1, min(2, connections))
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
              "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    for pct in ("50", "99"):
        match = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(match.group(1)), match.group(2)
        result[f"p{pct}_ms"] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = int(errors.group(1)) if errors else 0
    return result


# -- scenarios --------------------------------------------------------------------------------
def run(args) -> list[dict]:
    WORK.mkdir(exist_ok=True)
    www = write_fixtures()
    nginx_port, proxy_port, slow_port = free_port(), free_port(), free_port()
    nginx = start_nginx(www, nginx_port)
    slow = endurance.start_slow_upstream(slow_port, args.endurance_seconds)
    proxy = start_proxy(settings(nginx_port, slow_port), proxy_port)
    rows: list[dict] = []
    seconds, n = args.seconds, args.repeat
    direct = f"http://127.0.0.1:{nginx_port}"
    via = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
    try:
        for model, stream in (("bench-json", False), ("bench-fold", False), ("bench-stream", True)):
            wrk(via, model, 8, 1, stream=stream)  # warm-up: workers' first requests open pools, fill caches
        if "json" in args.only:
            for c in (8, 32):
                p = wrk(via, "bench-json", c, seconds, repeat=n)
                d = wrk(f"{direct}/json/v1/chat/completions", "x", c, seconds, repeat=n)
                rows.append(row(f"JSON relay, c{c}", p["rps"], d["rps"], "req/s", p["errors"]))
            p = wrk(via, "bench-json", 1, seconds, repeat=n)
            d = wrk(f"{direct}/json/v1/chat/completions", "x", 1, seconds, repeat=n)
            rows.append(row("JSON relay, c1, p50 added", p["p50_ms"] - d["p50_ms"], None, "ms", p["errors"]))
            rows.append(row("JSON relay, c1, p99 added", p["p99_ms"] - d["p99_ms"], None, "ms", p["errors"]))
        if "fold" in args.only:
            p = wrk(via, "bench-fold", 8, seconds, repeat=n)
            d = wrk(f"{direct}/sse200/v1/chat/completions", "x", 8, seconds, repeat=n)
            rows.append(row("forced-stream fold, 200 events, c8", p["rps"], d["rps"], "req/s", p["errors"]))
        if "stream" in args.only:
            p = wrk(via, "bench-stream", 8, seconds, stream=True, repeat=n)
            d = wrk(f"{direct}/sse200/v1/chat/completions", "x", 8, seconds, stream=True, repeat=n)
            rows.append(row("streaming relay, 200 events, c8", p["rps"], d["rps"], "req/s", p["errors"]))
            rows.append(row("streaming relay, events/s", p["rps"] * 200, d["rps"] * 200, "events/s", p["errors"]))
        # bridge CPU: many short interleaved pairs (cpu_pairs), taking about as long as the other rows' runs
        pairs = 1 if args.smoke else max(15, 5 * n, int(2 * n * seconds / PAIR_SECONDS))
        if "responses" in args.only:
            rows += responses_rows(via, proxy.pid, pairs)
        if "messages" in args.only:
            rows += messages_rows(via, proxy.pid, pairs)
        if "gemini" in args.only:
            rows += gemini_rows(via, proxy.pid, pairs)
        if "limits" in args.only:
            # Interleaved, so both sides see the same machine load.
            for label, model, stream in (("JSON relay, c8", "bench-json", False),
                                         ("streaming relay, 200 events, c8", "bench-stream", True)):
                plain, limited = [], []
                for _ in range(n):
                    plain.append(wrk(via, model, 8, seconds, stream=stream)["rps"])
                    limited.append(wrk(via, model, 8, seconds, stream=stream, key=LIMITED_KEY)["rps"])
                p, q = sorted(limited)[len(limited) // 2], sorted(plain)[len(plain) // 2]
                rows.append(row(f"{label}: key with limits vs none", p, q, "req/s"))
                rows.append(row(f"{label}: limits, cost per request", (1 / p - 1 / q) * 1e6, None, "us"))
        if "endurance" in args.only:
            result = endurance.run_clients(proxy_port, KEY, args.streams, args.endurance_seconds, proxy.pid)
            rows.append(row(f"{args.streams} slow streams: completed", result["completed"], args.streams, "streams"))
            rows.append(row(f"{args.streams} slow streams: first event p99", result["ttfe_p99_ms"], None, "ms"))
            rows.append(row(f"{args.streams} slow streams: added delay/event p99", result["delay_p99_ms"], None, "ms"))
            rows.append(row(f"{args.streams} slow streams: proxy peak RSS", result["peak_rss_mb"], None, "MB"))
        if args.with_litellm:
            import litellm_bench
            try:
                rows += litellm_bench.run(direct, KEY, seconds, lambda *a, **k: wrk(*a, repeat=n, **k), row)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                print(f"LiteLLM comparison skipped: {exc} (see bench/.work/litellm.log)", file=sys.stderr)
    finally:
        stop(proxy)
        stop(slow)
        stop(nginx)
    if "fold" in args.only:
        fold = subprocess.run([sys.executable, str(HERE / "fold_bench.py"), "--json",
                               "--seconds", str(min(seconds, 3))], capture_output=True, text=True, check=True)
        result = json.loads(fold.stdout)
        rows.append(row("fold alone, 2,000-chunk stream", result["streamfold_chunks_per_s"],
                        result["litellm_chunks_per_s"], "chunks/s"))
    return rows


def responses_rows(via: str, proxy_pid: int, pairs: int) -> list[dict]:
    """Bridged /v1/responses next to the same chat request: streaming, and non-stream to a forced provider.

    Both ask the same nginx-served 200-event chat stream; the bridge parses
    it and writes Responses events (or folds it and translates once) instead
    of relaying bytes. CPU per request is the gunicorn workers' user+system
    time (/proc) over a run divided by the requests wrk completed in it: the
    budget is the bridge at most 1.25x the chat request.
    """
    responses = via.replace("/chat/completions", "/responses")
    wrk(responses, "bench-bridge", 8, 1, stream=True, template=RESPONSES_BODY)  # warm-up
    rows = []
    for label, chat_model, bridge_model, stream in (
            ("stream, 200 events", "bench-stream", "bench-bridge", True),
            ("non-stream (forced fold), 200 events", "bench-fold", "bench-bridge-fold", False)):
        runs = cpu_pairs(proxy_pid, pairs, (via, chat_model, BODY), (responses, bridge_model, RESPONSES_BODY), stream)
        rows += pair_rows(f"bridged /v1/responses {label}", runs)
    return rows


def messages_rows(via: str, proxy_pid: int, pairs: int) -> list[dict]:
    """/v1/messages (translated to chat) next to the same chat request: streaming, and non-stream to a
    forced provider (the same fold, then one translation). CPU per request as in ``responses_rows``; the
    chat body doubles as an Anthropic one (it has max_tokens)."""
    messages = via.replace("/chat/completions", "/messages")
    wrk(messages, "bench-stream", 8, 1, stream=True)  # warm-up
    rows = []
    for label, model, stream in (("streaming, 200 events", "bench-stream", True),
                                 ("non-stream (forced fold), 200 events", "bench-fold", False)):
        runs = cpu_pairs(proxy_pid, pairs, (via, model, BODY), (messages, model, BODY), stream)
        rows += pair_rows(f"/v1/messages {label}", runs)
    return rows


def gemini_rows(via: str, proxy_pid: int, pairs: int) -> list[dict]:
    """The Gemini API (translated to chat) next to the same chat request: streamGenerateContent (?alt=sse, as
    the SDKs and Gemini CLI ask) and generateContent to a forced provider (the same fold, then one
    translation). CPU per request as in ``responses_rows``."""
    base = via.replace("/v1/chat/completions", "/v1beta/models/")
    rows = []
    for label, model, stream, method in (
            ("streaming, 200 events", "bench-stream", True, "streamGenerateContent?alt=sse"),
            ("non-stream (forced fold), 200 events", "bench-fold", False, "generateContent")):
        url = f"{base}{model}:{method}"
        wrk_once(url, model, 8, 1, stream, GEMINI_BODY)  # warm-up
        runs = cpu_pairs(proxy_pid, pairs, (via, model, BODY), (url, model, GEMINI_BODY), stream)
        rows += pair_rows(f"Gemini {label}", runs)
    return rows


PAIR_SECONDS = 1.0  # each side of a CPU pair: short, so the two sides of a pair see the same machine


def cpu_pairs(proxy_pid: int, count: int, chat: tuple, other: tuple, stream: bool) -> list[tuple[dict, dict]]:
    """(chat run, other run) pairs back to back, each run with its CPU per request (``cpu_ms``).

    Many short pairs (``PAIR_SECONDS`` each side) rather than a few long
    runs: this 2-core VM's speed drifts by 20-30% within seconds, which moved
    the ratio of two separate medians by as much.
    """
    pairs = []
    for i in range(count):
        pair = {}
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):  # which side goes first alternates: drift cancels
            url, model, template = (chat, other)[side]
            before = worker_cpu_seconds(proxy_pid)
            result = wrk_once(url, model, 8, PAIR_SECONDS, stream, template)
            result["cpu_ms"] = (worker_cpu_seconds(proxy_pid) - before) * 1000 / max(1, result["requests"])
            pair[side] = result
        pairs.append((pair[0], pair[1]))
    return pairs


def pair_rows(label: str, pairs: list[tuple[dict, dict]]) -> list[dict]:
    """req/s and CPU per request over all pairs (total CPU / total requests on each side), their ratio, and
    the interquartile range of the pairs' own ratios (how much one pair can say)."""
    totals = []
    for side in (0, 1):
        requests = sum(pair[side]["requests"] for pair in pairs)
        cpu_ms = sum(pair[side]["cpu_ms"] * pair[side]["requests"] for pair in pairs) / max(1, requests)
        rps = sorted(pair[side]["rps"] for pair in pairs)[len(pairs) // 2]
        totals.append((cpu_ms, rps, sum(pair[side]["errors"] for pair in pairs)))
    (chat_cpu, chat_rps, _), (cpu, rps, errors) = totals
    ratios = sorted(other["cpu_ms"] / chat["cpu_ms"] for chat, other in pairs if chat["cpu_ms"] > 0)  # ticks: 10 ms
    ratios = ratios or [0.0]
    quartiles = (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4])
    return [row(f"{label}, c8", rps, chat_rps, "req/s (vs chat)", errors),
            row(f"{label}, CPU per request", cpu, chat_cpu, "ms (vs chat)", errors, spread=quartiles)]


def worker_cpu_seconds(master_pid: int) -> float:
    """User + system CPU seconds of gunicorn's workers so far (Linux /proc)."""
    total = 0
    for child in Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split():
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def row(name: str, proxy: float, direct: float | None, unit: str, errors: int = 0, ratio: float | None = None,
        spread: tuple[float, float] | None = None) -> dict:
    if ratio is None and direct:
        ratio = proxy / direct
    out = {"scenario": name, "proxy": round(proxy, 2), "direct": round(direct, 2) if direct else None,
           "ratio": round(ratio, 3) if ratio is not None else None, "unit": unit, "errors": errors}
    if spread is not None:
        out["ratio_range"] = [round(spread[0], 3), round(spread[1], 3)]
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'scenario':48} {'streamfold':>14} {'direct/other':>14} {'ratio':>7}  unit")
    for r in rows:
        direct = "" if r["direct"] is None else f"{r['direct']:,.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        errors = f"  ({r['errors']} errors)" if r["errors"] else ""
        spread = f"  (pairs' IQR {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f})" if "ratio_range" in r else ""
        print(f"{r['scenario']:48} {r['proxy']:>14,.2f} {direct:>14} {ratio:>7}  {r['unit']}{errors}{spread}")


def main() -> None:
    parser = argparse.ArgumentParser(description="streamfold benchmark")
    parser.add_argument("--seconds", type=float, default=4, help="duration of each wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="wrk runs per figure; the median is reported")
    parser.add_argument("--smoke", action="store_true", help="a few seconds in all, to check the harness works")
    parser.add_argument("--with-litellm", action="store_true", help="also run LiteLLM's proxy on scenarios 1-3")
    parser.add_argument("--only", default="json,fold,stream,responses,messages,gemini,endurance")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent slow streams (endurance)")
    parser.add_argument("--endurance-seconds", type=float, default=10, help="length of each slow stream")
    parser.add_argument("--output", default=str(HERE / "results.json"))
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.repeat, args.streams, args.endurance_seconds = 1, 1, 20, 1
    args.only = set(args.only.split(","))
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run bench/run.sh, which installs it")
    rows = run(args)
    print_table(rows)
    Path(args.output).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": os.cpu_count(), "python": platform.python_version(),
        "smoke": args.smoke, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
