"""Plot one or more load-sweep JSON files (one line per engine).

    python -m benchmarks.load.plot benchmarks/results/load-*.json --out load.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_tput, ax_ttft), (ax_itl, ax_rej) = axes
    width = 0.8 / max(len(paths), 1)
    for k, path in enumerate(paths):
        report = json.loads(Path(path).read_text())
        label = report["engine"]
        levels = report["levels"]
        cs = [lv["concurrency"] for lv in levels]
        ax_tput.plot(cs, [lv["output_tokens_per_s"] for lv in levels], "o-", label=label)
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax_ttft.plot(cs, [lv["ttft_s"][q] for lv in levels], style, label=f"{label} {q}")
            ax_itl.plot(cs, [1000 * lv["itl_s"][q] if lv["itl_s"][q] is not None else None
                             for lv in levels], style, label=f"{label} {q}")
        xs = [i + k * width for i in range(len(cs))]
        ax_rej.bar(xs, [lv["status_counts"].get("429", 0) for lv in levels], width,
                   label=f"{label} 429")
        ax_rej.bar(xs, [lv["completed"] for lv in levels], width, alpha=0.35,
                   bottom=[lv["status_counts"].get("429", 0) for lv in levels],
                   label=f"{label} completed")
        ax_rej.set_xticks([i + width * (len(paths) - 1) / 2 for i in range(len(cs))],
                          [str(c) for c in cs])
    ax_tput.set(title="Output throughput", xlabel="concurrency", ylabel="tokens/s")
    ax_ttft.set(title="Time to first token", xlabel="concurrency", ylabel="s")
    ax_itl.set(title="Inter-token latency (per delta)", xlabel="concurrency", ylabel="ms")
    ax_rej.set(title="Requests: 429 (bottom) and completed", xlabel="concurrency",
               ylabel="requests")
    for ax in (ax_tput, ax_ttft, ax_itl):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle("msn-serve HTTP load sweep (loopback, streaming chat, greedy)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load.plot")
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    plot(args.reports, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
