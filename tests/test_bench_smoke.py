"""The benchmark harness still runs end to end (smoke mode: a few seconds, no figures asserted)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_bench_smoke_prints_the_table_and_writes_results_from_a_private_checkout(tmp_path):
    output = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--output", str(output)],
                            cwd=private_checkout(tmp_path), capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "JSON relay, c8" in result.stdout and "fold alone" in result.stdout
    rows = json.loads(output.read_text())["rows"]
    assert {r["scenario"] for r in rows} >= {"JSON relay, c8", "forced-stream fold, 200 events, c8",
                                             "streaming relay, 200 events, c8", "20 slow streams: completed"}
    assert all(r["errors"] == 0 for r in rows)
    completed = next(r for r in rows if r["scenario"] == "20 slow streams: completed")
    assert completed["proxy"] == 20
