"""Key-loop code variants of the tree-attention kernel, side by side on one GPU.

``kernels.tree_attention.KernelVariant`` names the variants (the product ``p @ v``
accumulated inside the dot or added after it; the softmax scale inside the exponent's
FMA or multiplied first). Every case of ``bench_tree_attention.py``'s grid (or a subset)
runs each variant with the default launch shape and split count, in alternating order
(A B B A ...) so that drift hits both alike; per case the median over rounds, and the
ratio of each variant's time to the baseline's (``old``: both off, the code before).
Writes JSON and a plot beside it (the GPU machine may lack matplotlib: then
``--plot JSON`` draws it later from the JSON).

    python benchmarks/kernels/ab_kernel_variant.py --out benchmarks/results/kernels-h200-variants.json
    python benchmarks/kernels/ab_kernel_variant.py --plot benchmarks/results/kernels-h200-variants.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import benchmarks.kernels.bench_tree_attention as bench
from benchmarks.kernels.bench_tree_attention import (
    MODELS,
    SMOKE_MODELS,
    Case,
    copy_bandwidth_gbps,
    time_graph,
)
from kernels.tree_attention import KernelVariant, TileConfig, tree_attention

VARIANTS = {
    "old": KernelVariant(acc_in_dot=False, fma_scale=False),
    "acc_in_dot": KernelVariant(acc_in_dot=True, fma_scale=False),
    "fma_scale": KernelVariant(acc_in_dot=False, fma_scale=True),
    "new": KernelVariant(acc_in_dot=True, fma_scale=True),
}


def time_variant(case: Case, variant: KernelVariant, tile: TileConfig | None = None) -> float:
    tile = tile or case.default_tile()
    splits = case.num_splits(tile)

    def call(c: int):
        return tree_attention(case.query, case.k_pool, case.v_pool, case.tables[c], case.cu,
                              case.seq_lens, case.tree_mask, max_query_len=case.tree_size,
                              max_seq_len=case.seq_len, tile=tile, num_splits=splits,
                              variant=variant)

    return time_graph([lambda c=c: call(c) for c in range(case.copies)], target_ms=20, replays=5)


def plot(data: dict, path: Path) -> None:
    """Each variant's (and extra tile's) time ratio to the baseline, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    base = data["meta"]["variants"][0]
    names = [n for n in dict.fromkeys(n for r in rows for n in r["us"]) if n != base]
    labels = [f"{r['model'].split('-')[0]} B{r['batch']} P{r['prefix_len'] // 1024}k "
              f"T{r['tree_size']}" for r in rows]
    fig, ax = plt.subplots(figsize=(min(18.0, max(8.0, 0.45 * len(rows))), 5.0))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + i * width for j, r in enumerate(rows) if name in r["us"]]
        ys = [r["us"][name] / r["us"][base] for r in rows if name in r["us"]]
        ax.bar(xs, ys, width, label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(0.8, None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, rotation=90,
                  fontsize=7)
    ax.set_ylabel(f"time / {base} (lower is faster)")
    ax.set_title(f"tree attention key-loop variants, {data['meta']['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, metavar="JSON",
                    help="draw the plot of an earlier run's JSON (beside it, .png) and exit")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--tree-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--variants", nargs="+", default=["old", "new"], choices=sorted(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2, help="alternations (A B B A per round)")
    ap.add_argument("--extra-tiles", type=json.loads, default=[],
                    help="JSON list of TileConfig lists, each timed with the last variant on "
                         "the cases whose default tile has its block_m (named LAST@TILE)")
    ap.add_argument("--budget-s", type=float, default=500.0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script, times nothing real)")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if args.out is None:
        ap.error("--out is required (or --plot JSON)")
    if args.smoke:
        if not os.environ.get("TRITON_INTERPRET"):
            sys.exit("ab_kernel_variant.py: --smoke needs TRITON_INTERPRET=1 in the environment")
        bench.SMOKE = True
        args.models, args.batches, args.prefix_lens = list(SMOKE_MODELS), [2], [40]
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("ab_kernel_variant.py: needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    else:
        device = torch.device("cuda")
    copy_gbps = copy_bandwidth_gbps(device)
    meta = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)",
            "torch": torch.__version__,
            "triton": __import__("triton").__version__, "dtype": "bfloat16",
            "copy_gbps": round(copy_gbps, 1), "variants": args.variants,
            "command": "python " + " ".join(sys.argv)}
    rows, start = [], time.time()
    cases = [(m, b, p, t) for p in sorted(args.prefix_lens, reverse=True) for m in args.models
             for t in sorted(args.tree_sizes, reverse=True) for b in args.batches]
    print(f"{'model':<13}{'B':>3}{'prefix':>7}{'T':>4}  " + "".join(f"{v:>12}" for v in args.variants)
          + "   ratios to " + args.variants[0], flush=True)
    for model, b, p, t in cases:
        if time.time() - start > args.budget_s:
            print(f"budget reached; skipping {model} B={b} P={p} T={t}", flush=True)
            continue
        case = Case(model, b, p, t, torch.bfloat16, device)
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else args.variants[::-1]
            for v in order:
                times[v].append(time_variant(case, VARIANTS[v]))
        default = case.default_tile()
        for extra in (TileConfig.from_list(t) for t in args.extra_tiles):
            if extra.block_m == default.block_m and extra != default:
                name = f"{args.variants[-1]}@{extra.as_list()}"
                try:
                    times[name] = [time_variant(case, VARIANTS[args.variants[-1]], extra)
                                   for _ in range(args.rounds)]
                except OutOfResources as exc:  # a launch shape this GPU cannot hold
                    print(f"  {name}: {exc}", flush=True)
        us = {v: statistics.median(x) for v, x in times.items()}
        base = us[args.variants[0]]
        row = {"model": model, "batch": b, "prefix_len": p, "tree_size": t,
               "num_heads": case.num_heads, "num_kv_heads": case.num_kv_heads,
               "head_dim": case.head_dim, "tile": case.default_tile().as_list(),
               "num_splits": case.num_splits(case.default_tile()),
               "us": {v: round(x, 2) for v, x in us.items()},
               "all_us": {v: [round(y, 2) for y in x] for v, x in times.items()},
               "ratio_to_" + args.variants[0]: {v: round(x / base, 4) for v, x in us.items()},
               "pct_of_bound": {v: round(100 * case.bytes / (x * 1e-6) / (copy_gbps * 1e9), 1)
                                for v, x in us.items()},
               "tflops": {v: round(case.flops / (x * 1e-6) / 1e12, 1) for v, x in us.items()}}
        rows.append(row)
        print(f"{model:<13}{b:>3}{p:>7}{t:>4}  " + "".join(f"{us[v]:12.1f}" for v in args.variants)
              + "   " + " ".join(f"{v}={x / base:.3f}" for v, x in us.items()
                                 if v != args.variants[0]), flush=True)
        del case
        if not args.smoke:
            torch.cuda.empty_cache()
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    for v in args.variants[1:]:
        logs = [math.log(r["us"][v] / r["us"][args.variants[0]]) for r in rows]
        by_tree = {}
        for r, x in zip(rows, logs):
            by_tree.setdefault(r["tree_size"], []).append(x)
        print(f"{v}: geometric mean time ratio to {args.variants[0]} "
              f"{math.exp(sum(logs) / len(logs)):.3f} over {len(logs)} cases; by tree size "
              + ", ".join(f"{t}: {math.exp(sum(x) / len(x)):.3f}" for t, x in sorted(by_tree.items())))
    meta["seconds"] = round(time.time() - start, 1)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    try:
        plot({"meta": meta, "rows": rows}, args.out.with_suffix(".png"))
    except ImportError as exc:
        print(f"no plot ({exc}); run --plot {args.out} where matplotlib is installed")


if __name__ == "__main__":
    main()
