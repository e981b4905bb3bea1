"""Two py-spy profiles of the daemon side by side, in µs of CPU per answer.

    .venv/bin/python benchmarks/profile_proxy.py --variant llmproxy-off --stream \\
        --py-spy PATH --stacks /tmp/off.txt
    .venv/bin/python benchmarks/profile_proxy.py --variant llmproxy-file --stream \\
        --py-spy PATH --stacks /tmp/file.txt
    .venv/bin/python benchmarks/compare_stacks.py /tmp/file.txt /tmp/off.txt
    .venv/bin/python benchmarks/compare_stacks.py /tmp/file.txt /tmp/off.txt \\
        --under _PollLikeMixin._doReadOrWrite --self

Shares of samples cannot be compared across variants: a sink adds work, so every
other part's share shrinks.  Beside each stacks file is the daemon's CPU per
answer during the profile (``PATH.json``, written by ``profile_proxy.py
--stacks``); a function's share of the samples times that is what it cost per
answer, comparable between variants.  ``--under FUNC`` keeps only the
stacks through that frame (the relay: ``_PollLikeMixin._doReadOrWrite``; the
capture: ``CapturePump._turn``); ``--self`` counts each function's own time
instead of what it and its callees took.  Two runs minutes apart on a shared
machine differ by its drift: read large ratios, or profile each side twice.
Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

_WHERE = re.compile(r" \(.*\)$")


def per_answer(path: Path, under: str | None, own: bool) -> tuple[dict[str, float], float]:
    """Function -> µs per answer (self or inclusive), and the total, for one stacks file."""
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    counts: Counter[str] = Counter()
    total = every = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        every += count
        frames = [_WHERE.sub("", frame) for frame in stack.split(";")]
        if under is not None and under not in frames:
            continue
        total += count
        for frame in [frames[-1]] if own else set(frames):
            counts[frame] += count
    scale = float(meta["cpu_us_per_answer"]) / max(every, 1)
    return {name: n * scale for name, n in counts.items()}, total * scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("first", type=Path, help="stacks file (profile_proxy.py --stacks)")
    p.add_argument("second", type=Path, help="the other stacks file")
    p.add_argument("--under", default=None, metavar="FUNC", help="only stacks through FUNC")
    p.add_argument("--self", dest="own", action="store_true", help="own time, not inclusive")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    first, first_total = per_answer(args.first, args.under, args.own)
    second, second_total = per_answer(args.second, args.under, args.own)
    totals = f"{first_total:.0f} ({args.first.name}), {second_total:.0f} ({args.second.name})"
    print(f"us per answer: {totals}")
    print(f"{'first':>8} {'second':>8} {'ratio':>7}  function")
    names = sorted(set(first) | set(second), key=lambda n: -first.get(n, 0.0))
    for name in names[: args.top]:
        a, b = first.get(name, 0.0), second.get(name, 0.0)
        ratio = f"{a / b:6.1f}x" if b else "    new"
        print(f"{a:8.1f} {b:8.1f} {ratio:>7}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
