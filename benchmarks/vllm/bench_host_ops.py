"""The runner's greedy argmax over logits rows on the CPU: torch / vLLM's kernel vs numpy.

Per row count (1 = a batch-1 decode step; 8 = a batch-8 step; 17 = one request's tree of 16
nodes; 69 = the 68-node paper tree), the median microseconds of, side by side in one
process and alternating: the greedy argmax by torch, by vLLM's CPU kernel (if the build
has one) and by `host_ops.argmax_rows` (numpy), checked against torch's first; and torch's
top-K of the Jacobi feedback, for scale. (`vllm_cpu_host_ops-with-topk.json` is this
benchmark at e8369ba, with a blockwise top-K since removed: slower than torch's.)

    python -m benchmarks.vllm.bench_host_ops --threads 2

Writes `<out>.json` and `<out>.png` (default benchmarks/results/vllm_cpu_host_ops).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.vllm.bench_vllm import ROOT
from proposers.vllm.host_ops import argmax_rows


def timed_us(fn, repeats: int, inner: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def vllm_greedy_kernel():
    """vLLM's CPU greedy argmax (what plain vLLM-CPU's sampler calls), or None."""
    try:
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        return torch.ops._C.greedy_argmax if hasattr(torch.ops._C, "greedy_argmax") else None
    except Exception:  # noqa: BLE001 - no vLLM build here: the column is left out
        return None


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kernel = vllm_greedy_kernel()
    rows_out = []
    k = args.k
    for rows in args.rows:
        x = torch.randn(rows, args.vocab)
        fns = {"argmax_torch": lambda x=x: x.argmax(-1),
               "argmax_numpy": lambda x=x: argmax_rows(x),
               f"top{k}_torch": lambda x=x, k=k: x.topk(k, -1).indices}
        if kernel is not None:
            fns["argmax_vllm_kernel"] = lambda x=x: kernel(x)
        assert torch.equal(argmax_rows(x), x.argmax(-1))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(args.rounds):  # alternating order against drift
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[name].append(timed_us(fns[name], 5, args.inner))
        us = {name: round(statistics.median(t), 1) for name, t in times.items()}
        row = {"rows": rows, "vocab": args.vocab, "us": us,
               "argmax_speedup_vs_torch": round(us["argmax_torch"] / us["argmax_numpy"], 2)}
        if kernel is not None:
            row["argmax_speedup_vs_vllm_kernel"] = round(us["argmax_vllm_kernel"]
                                                         / us["argmax_numpy"], 2)
        rows_out.append(row)
        print(f"{rows:3d} rows: " + ", ".join(f"{k} {v:.0f} us" for k, v in us.items())
              + f"; numpy argmax {row['argmax_speedup_vs_torch']}x torch"
              + (f", {row['argmax_speedup_vs_vllm_kernel']}x vLLM's kernel" if kernel else ""),
              flush=True)
    return {"meta": {"command": "python -m benchmarks.vllm.bench_host_ops "
                                + " ".join(map(shlex.quote, sys.argv[1:])),
                     "threads": args.threads, "k": args.k, "torch": torch.__version__,
                     "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            "rows": rows_out}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    names = list(rows[0]["us"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r["us"][name] for r in rows],
               width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))],
                  [f"{r['rows']} rows" for r in rows])
    ax.set_ylabel("microseconds (median)")
    ax.set_yscale("log")
    ax.set_title(f"row reductions over a {rows[0]['vocab']}-token vocabulary, "
                 f"{data['meta']['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 17, 69])
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary")
    ap.add_argument("--k", type=int, default=10, help="top-K of the feedback")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (vLLM-CPU's: the cores)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_cpu_host_ops")
    args = ap.parse_args(argv)
    if min(args.rows) < 1 or args.vocab < 1 or not 1 <= args.k <= args.vocab or args.threads < 1 \
            or args.rounds < 1 or args.inner < 1:
        ap.error("--rows, --vocab, --threads, --rounds and --inner must be positive, "
                 "1 <= --k <= --vocab")
    data = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    plot(data, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
