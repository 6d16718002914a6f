"""What the routing decision costs, in process: ``Balancer.route`` plus ``begin``/``served``/``end``.

    .venv/bin/python bench/fleet/decision.py [--prompt-kb 120] [--seconds 2]

For 4 and 32 replicas, three kinds of request: a Claude Code turn with its
session header (the affinity path), the same turn without any hint (the
prompt is rendered and its blocks hashed: the prefix path), and a short
one-off prompt. The prompt is agent-sized (``--prompt-kb`` of rendered text:
a system prompt and tool list, then a long history). Prints microseconds per
request (median of repeated timed loops) and the shared table's size.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from proxy.balance.balancer import Balancer  # noqa: E402
from proxy.config.model import Fleet, Model, Provider  # noqa: E402
from proxy.keys import KeyPool  # noqa: E402
from proxy.routing import Replicas, Target  # noqa: E402


def replica_set(count: int) -> Replicas:
    urls = tuple(f"http://10.0.0.{n}:8000/v1" for n in range(count))
    provider = Provider(name="gpu", base_url=urls[0], base_urls=urls, balance="cache-aware")
    model = Model(name="qwen", alias="m")
    group = Replicas(Target(provider, "qwen", model, url, f"gpu#{n + 1}") for n, url in enumerate(urls))
    group.name, group.policy = "m", "cache-aware"
    return group


def agent_body(kb: int, session: int) -> dict:
    system = ("You are Claude Code, an interactive CLI tool. " * 400)[: kb * 1024 // 3]
    history, size = [], len(system)
    turn = 0
    while size < kb * 1024:
        text = f"session {session} turn {turn}: " + "tool result line with some output\n" * 40
        history += [{"role": "assistant", "content": f"calling a tool {turn}"}, {"role": "user", "content": text}]
        size += len(text) + 20
        turn += 1
    return {"model": "m", "max_tokens": 32000, "stream": True,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "task"}, *history]}


def timed(step, seconds: float) -> float:
    """Median microseconds per call over repeated loops lasting ``seconds`` in all."""
    samples, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(50):
            step()
        samples.append((time.perf_counter() - started) / 50 * 1e6)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-kb", type=int, default=120)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    fleet = Fleet()
    keys = KeyPool()
    print(f"routing decision, in process; prompt {args.prompt_kb} KB rendered, block-chars {fleet.block_chars}")
    print(f"{'replicas':>8} {'with session hint':>18} {'prefix index':>13} {'short one-off':>14}")
    for count in (4, 32):
        balancer = Balancer(None, fleet)
        targets = replica_set(count)
        hinted = agent_body(args.prompt_kb, 1)
        headers = {"x-claude-code-session-id": "abc"}
        bare = agent_body(args.prompt_kb, 2)
        short = {"model": "m", "messages": [{"role": "user", "content": "What is 2+2?"}]}

        def request(body: dict, hint: dict) -> None:
            choice = balancer.route(targets, body, hint, keys, fleet)
            target = choice.targets[0]
            column = balancer.begin(target)
            balancer.served(choice, target, fleet)
            balancer.end(target, column)

        request(hinted, headers)
        request(bare, {})
        results = [timed(lambda: request(hinted, headers), args.seconds),
                   timed(lambda: request(bare, {}), args.seconds),
                   timed(lambda: request(short, {}), args.seconds)]
        print(f"{count:>8} {results[0]:>16.1f}us {results[1]:>11.1f}us {results[2]:>12.1f}us")
    print(f"shared table: {balancer.table.size / 1e6:.1f} MB for max-sessions {fleet.max_sessions}, "
          f"max-prefix-blocks {fleet.max_prefix_blocks}")


if __name__ == "__main__":
    main()
