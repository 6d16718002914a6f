"""The benchmark harness still runs end to end (smoke mode: a few seconds, no figures asserted)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def private_checkout(tmp_path: Path) -> Path:
    """A copy of what the bench runs, in a directory only its owner can enter (as in a mktemp -d clone)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    checkout = private / "checkout"
    ignore = shutil.ignore_patterns(".work", "__pycache__", "results.json")
    for name in ("proxy", "bench"):
        shutil.copytree(ROOT / name, checkout / name, ignore=ignore)
    for name in ("app.py", "gunicorn.conf.py"):
        shutil.copy(ROOT / name, checkout / name)
    return checkout


@pytest.mark.timeout(150)
def test_bench_smoke_prints_the_table_and_writes_results_from_a_private_checkout(tmp_path):
    output = tmp_path / "results.json"
    # its own session: if the test fails or times out, the whole group (the bench's gunicorn, nginx and wrk
    # too) is stopped, not only run.py, whose own cleanup a kill would skip
    bench = subprocess.Popen([sys.executable, "bench/run.py", "--smoke", "--output", str(output)],
                             cwd=private_checkout(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        stdout, _ = bench.communicate(timeout=140)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGTERM)
            try:
                bench.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == 0, stdout
    assert "JSON relay, c8" in stdout and "fold alone" in stdout
    rows = json.loads(output.read_text())["rows"]
    assert {r["scenario"] for r in rows} >= {"JSON relay, c8", "forced-stream fold, 200 events, c8",
                                             "streaming relay, 200 events, c8", "20 slow streams: completed"}
    assert all(r["errors"] == 0 for r in rows)
    completed = next(r for r in rows if r["scenario"] == "20 slow streams: completed")
    assert completed["proxy"] == 20
