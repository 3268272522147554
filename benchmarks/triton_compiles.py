"""How often the prefill (extend) attention kernel compiles while batch shapes change (GPU).

Every Triton compile stalls the engine for most of a second. A server meets batches of 1 to many
sequences whose page tables are 1, 2, 16 or 17 pages wide (widths that are 1, a multiple of 16
or neither, which Triton would otherwise tell apart), and whose metadata rows start at offsets
that may or may not be 16-byte aligned. This script runs the kernel over those 24 batch shapes
from an empty compile cache and reports how many variants were compiled and which calls took
longer than 50 ms. Before the kernels stopped specialising on these, the same run compiled 9
variants, 0.6-1.1 s each (docs/benchmarks.md).

    python benchmarks/triton_compiles.py
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "triton_compiles.json"))
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache  # before triton is imported: an empty cache
    import torch

    if not torch.cuda.is_available():
        sys.exit("triton_compiles.py needs a CUDA GPU")
    from armature.engine.attention import triton_kernels as kernels

    dev, heads, kv_heads, d, page = "cuda", 32, 8, 128, 16
    k = torch.randn(64 * page, kv_heads, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rows = []
    for nseq in (1, 2, 3, 4, 5, 8):
        for width in (1, 2, 16, 17):
            table = (torch.arange(nseq * width, dtype=torch.int32, device=dev) % 64).view(nseq, width)
            meta = torch.tensor([list(range(nseq)), [0] * nseq], dtype=torch.int32, device=dev)
            seqs = torch.tensor([[width * page - 5] * nseq, [5] * nseq, [5 * i for i in range(nseq)]],
                                dtype=torch.int32, device=dev)  # fmt: skip
            q = torch.randn(5 * nseq, heads, d, device=dev, dtype=torch.bfloat16)
            out = torch.empty_like(q)
            start = time.perf_counter()
            kernels.extend_attention(q, k, v, out, table, meta[0], meta[1], seqs[0], seqs[1], seqs[2], page, d**-0.5, 64)
            torch.cuda.synchronize()
            rows.append({"sequences": nseq, "table_width": width, "seconds": round(time.perf_counter() - start, 3)})
    compiles = len(glob.glob(f"{cache}/**/*.cubin", recursive=True))
    slow = [r for r in rows if r["seconds"] > 0.05]
    print(f"{'sequences':>9} {'table width':>11} {'seconds':>8}")
    for r in slow:
        print(f"{r['sequences']:>9} {r['table_width']:>11} {r['seconds']:>8}")
    print(f"{len(rows)} batch shapes: {compiles} compiled variant(s); {len(slow)} call(s) over 50 ms")
    report = {"gpu": torch.cuda.get_device_name(), "compiles": compiles, "calls": rows,
              "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
