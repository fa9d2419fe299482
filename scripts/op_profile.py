#!/usr/bin/env python3
"""Sums a libtorch operator trace (`llmlab bench generate --profile FILE`) per operator.

Prints, per decoded token (--tokens: the generation's new tokens), the operators dispatched
(top-level: the ones llmlab calls; all: nested ones included), the wall time the trace spans,
the time inside top-level operators and outside them (llmlab's own code and kernels, which
libtorch does not see), and the operators with the most self time (time not in nested ones).
Standard library only.
"""
import argparse
import collections
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("trace")
    ap.add_argument("--tokens", type=int, required=True, help="new tokens of the profiled run")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    events = [e for e in json.load(open(a.trace)) if e.get("ph") == "X"]
    by_tid = collections.defaultdict(list)
    for e in events:
        by_tid[e["tid"]].append(e)
    selft = collections.Counter()
    count = collections.Counter()
    top_count = collections.Counter()
    top_time = 0.0
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    for evs in by_tid.values():
        # Parents start no later and end no earlier than their children.
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            count[e["name"]] += 1
            selft[e["name"]] += e["dur"]
            if stack:
                selft[stack[-1]["name"]] -= e["dur"]
            else:
                top_count[e["name"]] += 1
                top_time += e["dur"]
            stack.append(e)
    n = a.tokens
    span = end - start
    print(f"trace {a.trace}: {len(events)} operator calls, {span / 1e3:.1f} ms, {n} tokens")
    print(f"per token: {sum(top_count.values()) / n:.0f} top-level operators "
          f"({sum(count.values()) / n:.0f} with nested ones), {span / n / 1e3:.2f} ms wall, "
          f"{top_time / n / 1e3:.2f} ms in operators, {(span - top_time) / n / 1e3:.2f} ms outside them")
    print(f"{'operator':40s} {'calls/token':>11s} {'self ms/token':>13s} {'us/call':>8s}")
    for name, t in selft.most_common(a.top):
        print(f"{name:40s} {count[name] / n:11.1f} {t / n / 1e3:13.3f} {t / count[name]:8.1f}")


if __name__ == "__main__":
    main()
