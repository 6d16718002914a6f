"""Fleet bench: agent sessions replayed through streamfold over simulated replicas, once per policy.

    .venv/bin/python bench/fleet/run.py [--replicas 4] [--sessions 32] [--turns 30] [--plots docs] ...

Starts N simulated vLLM-like replicas in this process (``sim.py``: a block
prefix cache with LRU eviction, prefill cost per uncached token, decode cost
per output token, a batch limit with queueing), streamfold under gunicorn
(real HTTP, the shipped gunicorn.conf.py) with one replica set per policy,
then replays the same trace of agent sessions once per policy: round-robin,
least-busy, cache-aware, and an oracle (``Oracle``: cache-aware's decision
made with the replicas' actual caches, which streamfold can only guess at),
through streamfold too (one provider per replica). Each replica's cache holds
``--cache-fraction`` of the trace's working set (its distinct prompt tokens,
``sim.working_set_tokens``). It also prints the ceiling of the hit rate (no
policy can find cached more than the tokens sent minus the distinct ones). A
second trace adds one hot session that sends several requests at once, for
cache-aware against least-busy. Every parameter is printed with the results;
times are real (sleeps), so the whole run takes two to three minutes. Prints
one table, the acceptance ratios, writes ``bench/fleet/results.json`` and,
with ``--plots``, PNGs of time to first token over the run per policy.

``--abs-threshold`` defaults to 4, not the SGLang gateway's 64 that
``fleet.balance-abs-threshold`` ships with: that 64 is a quarter of a batch of
256 running requests (vLLM's ``max-num-seqs``), and the simulated replicas run
16 at once, a quarter of which is 4. With 64, no imbalance ever shows here
(the calm trace has about 50 requests in flight at most, over four replicas).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import sim  # noqa: E402
from tests.gunicorn_util import Gunicorn, write_settings  # noqa: E402

KEY = "sk-fleet-bench-key"
POLICIES = ("round-robin", "least-busy", "cache-aware")


def pair(text: str, kind=float) -> tuple:
    low, high = text.split(",")
    return kind(low), kind(high)


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--one-offs", type=int, default=16)
    p.add_argument("--hot", type=int, default=12, help="requests the hot session sends at once (flood trace)")
    p.add_argument("--prefix-tokens", default="4000,3000", help="shared prefix of the Claude- and Codex-shaped kinds")
    p.add_argument("--tail-tokens", default="400,1600", help="tokens a turn adds (tool result or user message)")
    p.add_argument("--output-tokens", default="20,60")
    p.add_argument("--think", default="0.1,0.4", help="seconds between a session's turns")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--cache-fraction", type=float, default=1 / 3,
                   help="each replica's cache, as a share of the trace's working set")
    p.add_argument("--prefill-ms", type=float, default=0.15, help="per uncached prompt token")
    p.add_argument("--decode-ms", type=float, default=2.0, help="per output token")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cache-threshold", type=float, default=0.3, help="fleet.cache-threshold for the run")
    p.add_argument("--abs-threshold", type=int, default=4, help="fleet.balance-abs-threshold for the run")
    p.add_argument("--rel-threshold", type=float, default=1.5, help="fleet.balance-rel-threshold for the run")
    p.add_argument("--workers", type=int, default=3, help="gunicorn workers")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--plots", default="", help="directory for the TTFT PNGs (e.g. docs)")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only shows everything works")
    args = p.parse_args()
    if args.smoke:
        args.sessions, args.turns, args.one_offs, args.hot, args.prefix_tokens = 4, 2, 1, 2, "400,300"
    return args


def settings(replicas: list[str], args: argparse.Namespace, folder: Path) -> Path:
    providers = [{"name": policy.replace("-", ""), "base-urls": replicas, "balance": policy,
                  "models": [{"name": "sim", "alias": policy}]} for policy in POLICIES]
    providers += [{"name": f"pin{n}", "base-url": url, "models": [{"name": "sim", "alias": f"pin-{n}"}]}
                  for n, url in enumerate(replicas)]
    doc = {"api-keys": [KEY], "request-retry": 1, "timeouts": {"connect": 5, "read": 120},
           "openai-compatibility": providers,
           "fleet": {"balance-abs-threshold": args.abs_threshold, "balance-rel-threshold": args.rel_threshold,
                     "cache-threshold": args.cache_threshold}}
    return write_settings(folder / "fleet.yaml", doc)


class Oracle:
    """The decision cache-aware approximates, made with what it cannot know: the replicas' actual caches.

    For each request it reads every replica's cache and picks the replica holding the longest cached
    prefix of the prompt (ties: the least loaded), when that prefix covers at least ``threshold`` of the
    prompt; otherwise the least loaded replica; and, like cache-aware, the least loaded replica when the
    chosen one has more than ``abs_threshold`` requests over the idlest and more than ``rel_threshold``
    times as many. Load is, as for streamfold's policies, the requests sent to a replica and not answered yet.
    """

    def __init__(self, replicas: list[sim.Replica], threshold: float, abs_threshold: int,
                 rel_threshold: float) -> None:
        self.replicas = replicas
        self.threshold, self.abs_threshold, self.rel_threshold = threshold, abs_threshold, rel_threshold
        self.turn = 0
        self.lock = threading.Lock()
        self.busy = [0] * len(replicas)

    def pick(self, messages: list[dict]) -> int:
        blocks = self.replicas[0].blocks(sim.render(messages))
        with self.lock:
            self.turn += 1
            count = len(self.replicas)
            loads = list(self.busy)
            matches = [replica.match(blocks) for replica in self.replicas]
            idlest = min(range(count), key=lambda n: (loads[n], (n - self.turn) % count))
            best = max(range(count), key=lambda n: (matches[n], -loads[n], (n - self.turn) % count))
            chosen = best
            if matches[best] < self.threshold * max(1, len(blocks)) or (
                    loads[best] - loads[idlest] > self.abs_threshold
                    and loads[best] > self.rel_threshold * loads[idlest]):
                chosen = idlest
            self.busy[chosen] += 1
            return chosen

    def done(self, replica: int) -> None:
        with self.lock:
            self.busy[replica] -= 1


def replay(url: str, policy: str, sessions: list[sim.Session], oracle: Oracle | None) -> list[dict]:
    """Run the trace through the proxy; one record per request (start, ttft, end, replica)."""
    records: list[dict] = []
    lock = threading.Lock()
    started = time.monotonic()

    def one(http: requests.Session, turn: sim.Turn, name: str = "") -> None:
        sent = time.monotonic()  # the oracle's decision counts in its time to first token, as streamfold's does
        pinned = oracle.pick(turn.messages) if oracle is not None else -1
        model = f"pin-{pinned}" if oracle is not None else policy
        body = {"model": model, "messages": turn.messages, "max_tokens": turn.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **turn.extra}
        first, replica, usage = None, -1, None
        with http.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300,
                       headers={"Authorization": f"Bearer {KEY}", **turn.headers}) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and event.get("choices"):
                    first = time.monotonic()
                    replica = int(event["choices"][0]["delta"]["content"][1:])
                if event.get("usage"):
                    usage = event["usage"]
        if oracle is not None:
            oracle.done(pinned)
        with lock:
            records.append({"start": sent - started, "ttft": first - sent, "end": time.monotonic() - started,
                            "session": name, "replica": replica, "prompt": usage["prompt_tokens"],
                            "cached": usage["prompt_tokens_details"]["cached_tokens"],
                            "output": usage["completion_tokens"]})

    def session(run: sim.Session) -> None:
        http = requests.Session()
        for turn in run.turns:
            time.sleep(turn.delay)
            if run.concurrent > 1:
                helpers = [threading.Thread(target=one, args=(requests.Session(), turn, run.name))
                           for _ in range(run.concurrent)]
                for helper in helpers:
                    helper.start()
                for helper in helpers:
                    helper.join()
            else:
                one(http, turn, run.name)

    threads = [threading.Thread(target=session, args=(run,)) for run in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(records: list[dict], replicas: int) -> dict:
    ttft = [r["ttft"] for r in records]
    span = max(r["end"] for r in records) - min(r["start"] for r in records)
    per = [sum(1 for r in records if r["replica"] == n) for n in range(replicas)]
    return {"requests": len(records), "hit_rate": sum(r["cached"] for r in records) / sum(r["prompt"] for r in records),
            "ttft_p50": statistics.median(ttft), "ttft_p99": percentile(ttft, 0.99),
            "requests_per_s": len(records) / span, "prompt_tokens_per_s": sum(r["prompt"] for r in records) / span,
            "per_replica": per, "spread": max(per) / max(1, min(per))}


def plot(folder: Path, name: str, runs: dict[str, list[dict]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    for policy, records in runs.items():
        ordered = sorted(records, key=lambda r: r["start"])
        axes.plot([r["start"] for r in ordered], [r["ttft"] * 1000 for r in ordered], ".", markersize=3,
                  label=policy, alpha=0.7)
    axes.set_xlabel("seconds into the run")
    axes.set_ylabel("time to first token (ms)")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path = folder / name
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    args = arguments()
    trace_args = dict(sessions=args.sessions, turns=args.turns, seed=args.seed,
                      prefix_tokens=pair(args.prefix_tokens, int), tail_tokens=pair(args.tail_tokens, int),
                      output_tokens=pair(args.output_tokens, int), think=pair(args.think), one_offs=args.one_offs)
    calm = sim.trace(**trace_args)
    flood = sim.trace(**{**trace_args, "seed": args.seed + 1}, hot=args.hot)
    working = sim.working_set_tokens(calm, args.block_tokens)
    params = sim.ReplicaParams(block_tokens=args.block_tokens, capacity_tokens=int(working * args.cache_fraction),
                               prefill_ms=args.prefill_ms, decode_ms=args.decode_ms, batch=args.batch)
    replicas = [sim.Replica(n, params) for n in range(args.replicas)]
    servers = [sim.serve(replica) for replica in replicas]
    urls = [f"http://127.0.0.1:{server.server_address[1]}/v1" for server in servers]
    print(f"fleet bench: {args.replicas} replicas, {args.sessions} concurrent sessions x {args.turns} turns "
          f"+ {args.one_offs} one-off requests; working set {working} tokens")
    print(f"replica: block {params.block_tokens} tokens, cache {params.capacity_tokens} tokens each "
          f"({args.cache_fraction:.2f} of the working set), prefill {params.prefill_ms} ms/uncached token, "
          f"decode {params.decode_ms} ms/output token, batch {params.batch}")
    print(f"trace: shared prefixes {args.prefix_tokens} tokens, turns add {args.tail_tokens}, outputs "
          f"{args.output_tokens}, think {args.think} s, seed {args.seed}; flood: a hot session sending "
          f"{args.hot} at once")
    print(f"streamfold: gunicorn {args.workers} workers, balance-abs-threshold {args.abs_threshold}, "
          f"balance-rel-threshold {args.rel_threshold}, other fleet settings default")
    with tempfile.TemporaryDirectory(prefix="streamfold-fleet-") as folder:
        proxy = Gunicorn(settings(urls, args, Path(folder)), workers=args.workers, threads=64)
        try:
            runs: dict[str, list[dict]] = {}
            for policy in (*POLICIES, "oracle"):
                for replica in replicas:
                    replica.reset()
                oracle = Oracle(replicas, args.cache_threshold, args.abs_threshold, args.rel_threshold)
                runs[policy] = replay(proxy.url, policy, calm, oracle if policy == "oracle" else None)
            floods: dict[str, list[dict]] = {}
            for policy in ("least-busy", "cache-aware"):
                for replica in replicas:
                    replica.reset()
                floods[policy] = replay(proxy.url, policy, flood, None)
        finally:
            proxy.stop()
            for server in servers:
                server.shutdown()
    results = {name: summary(records, args.replicas) for name, records in runs.items()}
    # No policy can find more of the prompt tokens cached than those it sends minus the distinct ones (each
    # distinct block is prefilled at least once somewhere): the ceiling of the hit rate.
    sent = sum(r["prompt"] for r in runs["cache-aware"])
    ceiling = 1 - working / sent
    results.update({f"{name} (flood)": summary(records, args.replicas) for name, records in floods.items()})
    print()
    print(f"{'policy':<24}{'hit rate':>10}{'TTFT p50':>11}{'TTFT p99':>11}{'req/s':>8}{'prompt tok/s':>14}"
          f"  requests per replica")
    for name, row in results.items():
        print(f"{name:<24}{row['hit_rate']:>10.1%}{row['ttft_p50'] * 1000:>9.0f}ms{row['ttft_p99'] * 1000:>9.0f}ms"
              f"{row['requests_per_s']:>8.1f}{row['prompt_tokens_per_s']:>14.0f}  {row['per_replica']}")
    print(f"{'ceiling (each distinct block prefilled once)':<46}{ceiling:>6.1%}")
    ratios = {
        "cache-aware hit rate / oracle's": results["cache-aware"]["hit_rate"] / results["oracle"]["hit_rate"],
        "cache-aware hit rate / the ceiling": results["cache-aware"]["hit_rate"] / ceiling,
        "cache-aware TTFT p50 / round-robin's": results["cache-aware"]["ttft_p50"] / results["round-robin"]["ttft_p50"],
        "flood: cache-aware TTFT p99 / least-busy's":
            results["cache-aware (flood)"]["ttft_p99"] / results["least-busy (flood)"]["ttft_p99"],
    }
    goals = {"cache-aware hit rate / oracle's": (">=", 0.9), "cache-aware TTFT p50 / round-robin's": ("<=", 0.4),
             "flood: cache-aware TTFT p99 / least-busy's": ("<=", 1.1)}
    print()
    for name, value in ratios.items():
        if name not in goals:
            print(f"{name:<46}{value:>6.2f}")
            continue
        sign, goal = goals[name]
        ok = value >= goal if sign == ">=" else value <= goal
        print(f"{name:<46}{value:>6.2f}  (goal {sign} {goal}: {'met' if ok else 'NOT MET'})")
    out = {"parameters": vars(args), "working_set_tokens": working, "cache_tokens": params.capacity_tokens,
           "hit_rate_ceiling": ceiling,
           "results": results, "ratios": ratios}
    if args.plots:
        folder = ROOT / args.plots
        folder.mkdir(exist_ok=True)
        print("plots:", plot(folder, "fleet-ttft.png", runs, "Agent sessions over 4 replicas: TTFT per request"),
              plot(folder, "fleet-ttft-flood.png", floods, "With one hot session flooding: TTFT per request"))
    if not args.smoke:
        (HERE / "results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
