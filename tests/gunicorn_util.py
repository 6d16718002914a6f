"""Start the proxy under real gunicorn (the shipped gunicorn.conf.py) for deployment-level tests."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from tests.upstream import free_port

ROOT = Path(__file__).resolve().parent.parent


class Gunicorn:
    def __init__(self, settings_path: Path, workers: int = 2, threads: int = 8, env: dict | None = None) -> None:
        # A PORT in env is the port to bind (for settings that read ${PORT}); else any free one.
        given = (env or {}).get("PORT")
        self.port = int(given) if given else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings_path = settings_path
        # A worker holds no more connections than it has threads here, so
        # concurrent test requests are spread over all workers.
        environ = dict(os.environ, PROXY_SETTINGS=str(settings_path), WEB_CONCURRENCY=str(workers),
                       GUNICORN_THREADS=str(threads), GUNICORN_WORKER_CONNECTIONS=str(threads),
                       PYTHONUNBUFFERED="1", **(env or {}))
        if not given:
            environ.pop("PORT", None)
        self.log_path = settings_path.with_suffix(f".{self.port}.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "app:app", "--bind",
                                      f"127.0.0.1:{self.port}"], cwd=ROOT, env=environ,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if (requests.get(self.url + "/healthz", timeout=1).status_code == 200
                        and self.output().count("streamfold ready") >= workers):
                    return
            except requests.RequestException:  # refused, or a read timeout while workers boot under load
                time.sleep(0.05)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("gunicorn did not start:\n" + self.output())

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def wait_ready(self, count: int, timeout: float = 30) -> None:
        """Until ``count`` workers in all have said "streamfold ready" since start (respawns and HUPs add up)."""
        deadline = time.monotonic() + timeout
        while self.output().count("streamfold ready") < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gunicorn has not booted {count} workers:\n" + self.output())
            time.sleep(0.05)

    def output(self) -> str:
        """What gunicorn and its workers wrote (stdout and stderr), also once stopped: a failed boot shows why."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def peak_rss(pid: int) -> int:
    """The process's high-water RSS in bytes (VmHWM): a peak freed since still shows."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def write_settings(path: Path, doc: dict) -> Path:
    doc.setdefault("state-path", str(path.with_suffix(".state.db")))  # never the checkout's default
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
