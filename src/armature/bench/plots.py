"""PNG plots of a bench run (matplotlib on the Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from armature.bench.client import RequestResult


def write_plots(results: list[RequestResult], started_at: float, out_dir: Path, stem: str) -> list[Path]:
    """TTFT and end-to-end CDFs, TTFT over the run, ITL histogram; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts = [(r, r.ttft_s) for r in results if r.ok and r.ttft_s is not None]
    ok = [r for r, _ in firsts]
    ttft_ms = [ttft * 1000 for _, ttft in firsts]
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if not ok:
        return written

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    for label, values in (("TTFT", ttft_ms), ("end to end", [r.e2e_s * 1000 for r in ok])):
        xs = sorted(values)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_xlabel("ms")
    ax.set_ylabel("share of requests")
    ax.set_title("latency CDF")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    ax.scatter([r.start_s - started_at for r in ok], ttft_ms, s=6)
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT over the run")
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    itl = [x * 1000 for r in ok for x in r.itls_s]
    if itl:
        ax.hist(itl, bins=60)
    ax.set_xlabel("ms")
    ax.set_title("inter-token latency")
    ax.grid(alpha=0.3)

    ax = axes[1][1]
    ends = sorted(r.start_s + r.e2e_s - started_at for r in results)
    ax.plot(ends, range(1, len(ends) + 1))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests finished")
    ax.set_title("progress")
    ax.grid(alpha=0.3)

    fig.tight_layout()
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written
