"""Optional side-by-side: LiteLLM's proxy on scenarios 1-3 with the same nginx fixtures.

``bench/run.sh --with-litellm`` installs ``litellm[proxy]`` into its own venv
(``bench/.work/litellm-venv``, never into the project's), starts it with 2
workers in front of the same nginx upstream, and runs the same wrk scenarios.
LiteLLM has no forced-stream fold: its "fold" row asks it for a non-stream
answer from the SSE-only upstream and reports how many requests failed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"


def install() -> Path:
    venv = WORK / "litellm-venv"
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return binary


def run(direct: str, key: str, seconds: float, wrk, row) -> list[dict]:
    from run import free_port, stop, wait_port  # noqa: PLC0415 - helpers of the harness

    binary = install()
    config = WORK / "litellm.yaml"
    models = [("bench-json", "json"), ("bench-fold", "sse200"), ("bench-stream", "sse200")]
    config.write_text(yaml.safe_dump({"model_list": [
        {"model_name": name, "litellm_params": {"model": "openai/bench-model", "api_base": f"{direct}/{path}/v1",
                                                "api_key": "none"}} for name, path in models]}))
    port = free_port()
    log = open(WORK / "litellm.log", "wb")
    proc = subprocess.Popen([str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "2"], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, LITELLM_LOG="ERROR", LITELLM_MASTER_KEY=key))
    rows = []
    try:
        wait_port(port, path="/health/liveliness", timeout=180)
        via = f"http://127.0.0.1:{port}/v1/chat/completions"
        wrk(via, "bench-json", 8, 1)  # warm-up
        for c in (8, 32):
            result = wrk(via, "bench-json", c, seconds)
            rows.append(row(f"LiteLLM: JSON relay, c{c}", result["rps"], None, "req/s", result["errors"]))
        result = wrk(via, "bench-json", 1, seconds)
        rows.append(row("LiteLLM: JSON relay, c1, p50", result["p50_ms"], None, "ms", result["errors"]))
        result = wrk(via, "bench-fold", 8, seconds)
        rows.append(row("LiteLLM: non-stream from SSE-only upstream", result["rps"], None, "req/s",
                        result["errors"]))
        result = wrk(via, "bench-stream", 8, seconds, stream=True)
        rows.append(row("LiteLLM: streaming relay, 200 events, c8", result["rps"], None, "req/s",
                        result["errors"]))
    finally:
        stop(proc)
    return rows
