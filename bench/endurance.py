"""Endurance scenario: many concurrent slow streams through the proxy.

A slow upstream (asyncio, its own process) sends one event every 100 ms for
``seconds``, each stamped with the wall-clock time it was written; an asyncio
client opens all the streams through the proxy at once and measures the time
to the first event, the extra delay of every event (arrival minus stamp) and
whether each stream completed. The proxy's RSS (master + workers) is sampled
throughout.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

INTERVAL = 0.1


def start_slow_upstream(port: int, seconds: float) -> subprocess.Popen:
    """The slow upstream in its own process, so it never competes with the client for a GIL."""
    proc = subprocess.Popen([sys.executable, __file__, str(port), str(seconds)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("slow upstream did not start")


def _serve(port: int, seconds: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(int(seconds / INTERVAL)):
                chunk = {"id": "slow", "object": "chat.completion.chunk", "created": 1,
                         "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": None}],
                         "sent": time.time()}
                event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(INTERVAL)
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def run_clients(proxy_port: int, key: str, streams: int, seconds: float, proxy_pid: int) -> dict:
    return asyncio.run(_clients(proxy_port, key, streams, seconds, proxy_pid))


async def _clients(port: int, key: str, streams: int, seconds: float, proxy_pid: int) -> dict:
    body = json.dumps({"model": "bench-slow", "stream": True,
                       "messages": [{"role": "user", "content": "go"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
               ).encode() + body
    ttfe, delays, completed = [], [], 0
    peak = [0.0]
    stop = asyncio.Event()

    async def sample_rss() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(proxy_pid))
            await asyncio.sleep(0.2)

    async def one() -> None:
        nonlocal completed
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        except OSError:
            return
        writer.write(request)
        buffer, first = b"", True
        try:
            async with asyncio.timeout(seconds * 4 + 30):
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    now = time.time()
                    buffer += data
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        at = event.find(b"data: ")
                        if at < 0:
                            continue
                        payload = event[at + 6:]
                        if payload == b"[DONE]":
                            completed += 1
                            continue
                        if first:
                            ttfe.append((time.monotonic() - started) * 1000)
                            first = False
                        delays.append((now - json.loads(payload)["sent"]) * 1000)
        except (TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(one() for _ in range(streams)))
    stop.set()
    await sampler
    return {"completed": completed, "ttfe_p99_ms": percentile(ttfe, 99), "delay_p99_ms": percentile(delays, 99),
            "peak_rss_mb": peak[0]}


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * pct / 100))]


def rss_mb(pid: int) -> float:
    """RSS of a process and its children (gunicorn master + workers), from /proc."""
    total = 0
    for candidate in [pid] + children(pid):
        try:
            with open(f"/proc/{candidate}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().split(")")[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


if __name__ == "__main__":
    _serve(int(sys.argv[1]), float(sys.argv[2]))
