"""Benchmark: the cost of enforcing the transition table.

The same measurement as ``kvpoll bench statemachine``; this script saves the
JSON next to the printed report so runs can be compared over time::

    python benchmarks/statemachine.py [--repeat 5] [--out bench-results/statemachine.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvpoll.bench.statemachine import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rooms", type=int, default=100_000)
    parser.add_argument("--transitions-rooms", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path("bench-results/statemachine.json"))
    args = parser.parse_args()
    result = run(repeats=args.repeat, rooms=args.rooms, transitions_rooms=args.transitions_rooms)
    print(result.report())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
