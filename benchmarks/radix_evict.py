"""Prefix-cache eviction in a full KV pool: the engine's cost per admission once the cache is full.

A server that has run for a while has a full radix cache, so every new page it needs is an
eviction. The cache is filled with ``--requests`` finished requests of ``--pages`` pages each
under one shared prefix (a chat system prompt), then ``--rounds`` times: evict one page and insert
a new request's pages, as a step of a busy engine does. Baseline in the same run: the same cache
with eviction by a walk of the whole tree into a fresh heap, as the engine did before (and as
SGLang's ``RadixCache.evict`` still collects its leaves).

    .venv/bin/python benchmarks/radix_evict.py
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from armature.engine.radix_cache import RadixCache

ROOT = Path(__file__).resolve().parents[1]


class WalkingRadixCache(RadixCache):
    """The baseline: each eviction first walks the tree for its unlocked leaves into a new heap."""

    def evict(self, num_pages: int) -> int:
        self._rebuild_lru()
        return super().evict(num_pages)


def run(cls: type[RadixCache], args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(0)
    page = args.page_size
    free: list[int] = []
    cache = cls(page, free.extend)
    next_page = iter(range(1 << 40))
    prefix = [rng.randrange(50_000) for _ in range(4 * page)]
    for _ in range(args.requests):
        toks = prefix + [rng.randrange(50_000) for _ in range((args.pages - 4) * page)]
        cache.insert(toks, [next(next_page) for _ in range(args.pages)])
    size = cache.total_pages
    started = time.perf_counter()
    for _ in range(args.rounds):
        cache.evict(1)
        toks = prefix + [rng.randrange(50_000) for _ in range(page)]
        cache.insert(toks, [next(next_page) for _ in range(5)])
    per = (time.perf_counter() - started) / args.rounds
    return {"cached_pages": size, "us_per_evict_and_insert": round(per * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--pages", type=int, default=32, help="pages per cached request")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "radix_evict.json"))
    args = ap.parse_args()
    ours = run(RadixCache, args)
    base = run(WalkingRadixCache, args)
    gain = base["us_per_evict_and_insert"] / ours["us_per_evict_and_insert"]
    print(f"cache of {ours['cached_pages']} pages, {args.rounds} rounds of evict 1 + insert 1 request")
    print(f"{'eviction':<32}{'us per round':>14}")
    print(f"{'LRU queue (engine)':<32}{ours['us_per_evict_and_insert']:>14}")
    print(f"{'walk of the tree (baseline)':<32}{base['us_per_evict_and_insert']:>14}")
    print(f"speed-up: {gain:.0f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "engine": ours, "walk_baseline": base, "speedup": round(gain, 1),
              "machine": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
