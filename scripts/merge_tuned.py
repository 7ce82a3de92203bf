"""Merge tuned-config JSON files ({"M,N,K,G": config}) into one; later files win on the same key.

    python scripts/merge_tuned.py OUT.json BASE.json NEW.json [...] [--min-m M]

--min-m drops BASE's entries below that bucketed M (for a table re-tuned at small M on another GPU of the
same architecture, whose large-M entries are kept).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("base")
    ap.add_argument("new", nargs="+")
    ap.add_argument("--min-m", type=int, default=0, help="keep only BASE entries with M >= this")
    args = ap.parse_args()
    with open(args.base) as f:
        merged = {k: v for k, v in json.load(f).items() if int(k.split(",")[0]) >= args.min_m}
    for p in args.new:
        with open(p) as f:
            merged.update(json.load(f))
    with open(args.out, "w") as f:
        json.dump(dict(sorted(merged.items(), key=lambda kv: [int(x) for x in kv[0].split(",")])), f, indent=1)
    print(f"{args.out}: {len(merged)} entries")


if __name__ == "__main__":
    main()
