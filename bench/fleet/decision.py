"""What the routing decision costs, in process: ``Balancer.route`` plus ``begin``/``served``/``end``.

    .venv/bin/python bench/fleet/decision.py [--prompt-kb 120] [--seconds 2]

For 4 and 32 replicas, five kinds of request, agent-sized (about
``--prompt-kb`` of history: a system prompt of a third of it shared by every
conversation, then a history of its own; and about 20 KB of tools after it,
in the OpenAI SDK's order of fields):

* a Claude Code turn with its session header (the affinity path: the body is
  never looked at);
* the next turn of a conversation without any hint, whose last turn the
  index has seen (the prefix path: its last blocks looked up, its new tail of
  about 2 KB entered); 40 conversations take 12 turns each, in turn;
* the first turn of a conversation without any hint: the shared system
  prompt and a first message of about 1 KB;
* a whole conversation without any hint that the index has not seen (a
  conversation that went on elsewhere, or whose blocks were evicted):
  the worst case, everything after the shared system prompt is looked up
  and entered;
* a short one-off prompt.

Each request's body is parsed from its bytes just before it is routed, as a
route does (untimed), so they are in the CPU's caches as they are when a route
hands them over. Prints microseconds per request, as CPU time of the thread
that spent it (so the time other jobs on a shared machine take from it does
not count, but what they do to its caches does), medians of loops of 50: what the request's own
thread spends (``route``, ``begin``, ``served``, ``end``), in brackets the
part of it ``route`` took (the decision proper, before the upstream request
is sent), and after ``+`` what entering the prompt's blocks into the index
took, which the index thread does off the request's path; and the shared
table's size.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import orjson

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


# an agent's tool list (about 20 KB), which the OpenAI SDK sends after the history, as it orders a body's fields
TOOLS = [{"type": "function", "function": {
    "name": f"tool_{n}", "description": f"Tool {n} of the agent: " + "what it does and when to use it. " * 14,
    "parameters": {"type": "object", "properties": {
        "path": {"type": "string", "description": "The file or directory the tool works on."},
        "pattern": {"type": "string", "description": "What to look for, as a regular expression."},
        "limit": {"type": "integer", "description": "At most this many results."}},
        "required": ["path"]}}} for n in range(24)]


def agent_body(kb: int, session: int) -> dict:
    """A chat body as the OpenAI SDK sends an agent's turn: ``messages`` (a system prompt of a third of ``kb``
    shared by every conversation, then a history of its own), then the other fields and the tools."""
    system = ("You are Claude Code, an interactive CLI tool. " * 400)[: kb * 1024 // 3]
    history, size = [], len(system)
    turn = 0
    while size < kb * 1024:
        text = f"session {session} turn {turn}: " + "tool result line with some output\n" * 40
        history += [{"role": "assistant", "content": f"calling a tool {turn}"}, {"role": "user", "content": text}]
        size += len(text) + 20
        turn += 1
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "task"}, *history],
            "model": "m", "max_tokens": 32000, "stream": True, "tools": TOOLS}


SPENT = {"path": 0.0, "route": 0.0, "index": 0.0}  # CPU seconds, summed by ``request`` and the index thread
CLOCK = [0.0]  # CPU seconds that reading the thread's CPU clock twice adds to what is between (a system call)


def calibrate() -> float:
    """The median CPU time between two reads of the thread's clock with nothing between them."""
    spans = []
    for _ in range(2001):
        started = time.thread_time()
        spans.append(time.thread_time() - started)
    return statistics.median(spans)


def loop(run) -> tuple[float, float, float]:
    """(on the path, route, index) CPU microseconds per request for 50 requests made by ``run``."""
    for part in SPENT:
        SPENT[part] = 0.0
    run()
    return SPENT["path"] / 50 * 1e6, SPENT["route"] / 50 * 1e6, SPENT["index"] / 50 * 1e6


def medians(samples: list[tuple[float, float, float]]) -> tuple[float, ...]:
    return tuple(statistics.median(sample[n] for sample in samples) for n in range(3))


def timed(step, seconds: float) -> tuple[float, ...]:
    """Medians over repeated loops of 50 calls of ``step`` lasting ``seconds`` in all."""
    samples, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        samples.append(loop(lambda: [step() for _ in range(50)]))
    return medians(samples)


def as_sent(body: dict) -> tuple[dict, bytes]:
    """The body parsed and as a client sends it (what the routes hand the balancer)."""
    return body, orjson.dumps(body)


def timed_once(step, bodies: list[tuple[dict, bytes]]) -> tuple[float, ...]:
    """Medians over loops of 50 calls of ``step``, each body sent once, in order."""
    return medians([loop(lambda: [step(body) for body in bodies[start:start + 50]])
                    for start in range(0, len(bodies) - 49, 50)])


def first_turn(kb: int, session: int) -> dict:
    """The first turn of a conversation: the shared system prompt and a first message of about 1 KB."""
    body = agent_body(kb, session)
    task = f"session {session}: " + "describe the task in a few lines\n" * 30
    return {**body, "messages": [body["messages"][0], {"role": "user", "content": task}]}


def next_turns(kb: int, conversations: int, turns: int) -> tuple[list[dict], list[dict]]:
    """(first turns, then each conversation's next turns in rounds): each turn adds about 2 KB."""
    firsts = [agent_body(kb, 100 + n) for n in range(conversations)]
    rounds = []
    for turn in range(turns):
        for number, first in enumerate(firsts):
            tail = []
            for earlier in range(turn + 1):
                tail += [{"role": "assistant", "content": f"conversation {number} calls a tool ({earlier})"},
                         {"role": "user", "content": f"result {number}.{earlier}\n" + "a line of tool output\n" * 90}]
            rounds.append({**first, "messages": first["messages"] + tail})
    return firsts, rounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-kb", type=int, default=120)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    fleet = Fleet()
    keys = KeyPool()
    print(f"routing decision, in process; body {args.prompt_kb} KB, block-chars {fleet.block_chars}")
    print("CPU microseconds per request (each thread's CPU time, so other jobs on the machine do not count), "
          "medians of loops of 50: on the request's path (of which route: the decision before the upstream "
          "request is sent) + entering the prompt's blocks, off the path (the index thread)")
    print(f"{'replicas':>8}{'with session hint':>25}{'next turn, no hint':>25}{'first turn, no hint':>25}"
          f"{'unseen conv., no hint':>25}{'short one-off':>25}")
    CLOCK[0] = calibrate()
    print(f"reading the thread's CPU clock costs {CLOCK[0] * 1e6:.1f} us here (a system call), taken off each span")
    for count in (4, 32):
        balancer = Balancer(None, fleet)
        targets = replica_set(count)
        hinted = as_sent(agent_body(args.prompt_kb, 1))
        headers = {"x-claude-code-session-id": "abc"}
        short = as_sent({"model": "m", "messages": [{"role": "user", "content": "What is 2+2?"}]})
        firsts, rounds = next_turns(args.prompt_kb, 40, 12)
        firsts, rounds = list(map(as_sent, firsts)), list(map(as_sent, rounds))
        fresh = [as_sent(agent_body(args.prompt_kb, 1000 + n)) for n in range(100)]
        opening = [as_sent(first_turn(args.prompt_kb, 2000 + n)) for n in range(100)]

        inner = balancer._enter

        def enter(*job) -> None:  # in whichever thread enters a prompt's blocks (the index thread, mostly)
            started = time.thread_time()
            inner(*job)
            SPENT["index"] += time.thread_time() - started - CLOCK[0]

        balancer._enter = enter

        def request(sent: tuple[dict, bytes], hint: dict) -> None:
            raw = sent[1]
            body = orjson.loads(raw)  # as the route parsed it just before: the body's bytes are in the caches
            started = time.thread_time()
            choice = balancer.route(targets, body, hint, keys, fleet, raw)
            routed = time.thread_time()
            again = time.thread_time()
            target = choice.targets[0]
            column = balancer.begin(target)
            balancer.served(choice, target, fleet, 10 * 1024 * 1024)  # max-request-bytes' default
            balancer.end(target, column)
            done = time.thread_time()
            SPENT["route"] += routed - started - CLOCK[0]
            SPENT["path"] += routed - started + done - again - 2 * CLOCK[0]
            balancer.settle()  # the next turn comes seconds later: the index thread is done by then

        request(hinted, headers)
        for body in firsts:
            request(body, {})
        results = [timed(lambda: request(hinted, headers), args.seconds),
                   timed_once(lambda body: request(body, {}), rounds),
                   timed_once(lambda body: request(body, {}), opening),
                   timed_once(lambda body: request(body, {}), fresh),
                   timed(lambda: request(short, {}), args.seconds)]
        print(f"{count:>8}" + "".join(f"{path:>7.1f} ({route:>5.1f}) +{index:>5.1f}" for path, route, index in results))
    print(f"shared table: {balancer.table.size / 1e6:.1f} MB for max-sessions {fleet.max_sessions}, "
          f"max-prefix-blocks {fleet.max_prefix_blocks}")


if __name__ == "__main__":
    main()
