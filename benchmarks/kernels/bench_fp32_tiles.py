"""Launch shapes of the float32 tree-attention kernel, swept on one GPU.

In float32 the kernel's dots run in IEEE fp32 (no TF32: the GPU exactness tests compare
greedy tokens), i.e. on the CUDA cores, where a tile's registers and not the tensor
cores set the speed. The default float32 tile (`default_tile_config`) was never measured:
the reference runner's float32 tree steps on the H200 took ~37 ms against 3.8 ms for a
one-token step (`methods-cuda-float32-msn-compiled-prestaging.json`). This times, per
case (both benchmark models, float32, batch and prefix as given, the tree sizes of the
runner's steps), the current default and every tile of a small grid, each checked
against the default's output, and SDPA (`F.scaled_dot_product_attention` on K/V
gathered into contiguous tensors, dense bool mask; the gather not timed) as the peer.
Writes JSON and a plot.

    python benchmarks/kernels/bench_fp32_tiles.py --out benchmarks/results/kernels-h200-fp32-tiles.json
    python benchmarks/kernels/bench_fp32_tiles.py --plot benchmarks/results/kernels-h200-fp32-tiles.json
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_fp32_tiles.py --smoke --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import benchmarks.kernels.bench_tree_attention as bench
from benchmarks.kernels.bench_tree_attention import MODELS, SMOKE_MODELS, Case, time_graph
from kernels.tree_attention import TileConfig

# (block_m, block_n, num_warps, num_stages): the grid swept besides the default.
GRID = [TileConfig(m, n, num_warps=w, num_stages=s)
        for m, n, w, s in itertools.product((16, 32, 64), (16, 32, 64), (2, 4, 8), (1, 2))]
SMOKE_GRID = [TileConfig(16, 16, num_warps=2, num_stages=1), TileConfig(32, 16, num_warps=4,
                                                                         num_stages=1)]


def tile_key(tile: TileConfig) -> str:
    return f"{tile.block_m}x{tile.block_n}w{tile.num_warps}s{tile.num_stages}"


def time_case(case: Case, tiles: list[TileConfig]) -> dict:
    """Microseconds of the default tile, of each tile of `tiles` that fits its rows and
    matches the default's output, and of SDPA, on this case."""
    default = case.default_tile()
    ref = case.ours(0, tile=default, num_splits=case.num_splits(default))
    us: dict[str, float] = {}
    errors: dict[str, str] = {}

    def run(name: str, tile: TileConfig) -> None:
        splits = case.num_splits(tile)
        try:
            out = case.ours(0, tile=tile, num_splits=splits)
        except (OutOfResources, AssertionError, RuntimeError) as exc:  # RuntimeError: Triton's
            # compiler rejects some fp32 tiles (`PassManager::run failed`)
            errors[name] = type(exc).__name__
            return
        if not torch.allclose(out, ref, atol=1e-4, rtol=1e-4):
            errors[name] = f"mismatch {float((out - ref).abs().max()):.2e}"
            return
        us[name] = time_graph([lambda c=c: case.ours(c, tile=tile, num_splits=splits)
                               for c in range(case.copies)])

    run("default", default)
    group = case.num_heads // case.num_kv_heads
    for tile in tiles:
        if tile.block_m >= group and tile_key(tile) != tile_key(default):
            run(tile_key(tile), tile)
    kv = [case.gathered(c) for c in range(case.copies)]
    q4, mask = case.q4(), case.dense_mask()

    def sdpa(c: int):
        return F.scaled_dot_product_attention(q4, *kv[c], attn_mask=mask, enable_gqa=True)

    us["sdpa"] = time_graph([lambda c=c: sdpa(c) for c in range(case.copies)])
    best = min((k for k in us if k not in ("default", "sdpa")), key=us.get, default=None)
    return {"model": case.model, "batch": case.batch, "prefix_len": case.prefix_len,
            "tree_size": case.tree_size, "dtype": "float32", "default_tile": tile_key(default),
            "us": {k: round(v, 2) for k, v in us.items()}, "best": best,
            "best_over_default": round(us[best] / us["default"], 3) if best else None,
            "errors": errors}


def plot(data: dict, path: Path) -> None:
    """Per case: the default tile, the best tile of the grid and SDPA, in microseconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    labels = [f"{r['model'].split('-')[0]} B{r['batch']} P{r['prefix_len']} T{r['tree_size']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.5 * len(rows)), 5.0))
    x = range(len(rows))
    for i, (name, key) in enumerate((("default tile", "default"), ("best tile", None),
                                     ("SDPA", "sdpa"))):
        ys = [r["us"].get(key or r["best"], float("nan")) for r in rows]
        ax.bar([j + 0.27 * i for j in x], ys, 0.27, label=name)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.27 for j in x], labels, rotation=90, fontsize=7)
    ax.set_ylabel("microseconds (log)")
    ax.set_title(f"float32 tree attention launch shapes, {data['meta']['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, metavar="JSON", help="draw the plot of a JSON and exit")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--tree-sizes", type=int, nargs="+", default=[1, 16, 79])
    ap.add_argument("--grid", type=json.loads, metavar="JSON",
                    help="tiles to sweep instead of the whole grid: [[block_m, block_n, "
                         "num_warps, num_stages], ...]")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script)")
    args = ap.parse_args(argv)
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if args.out is None:
        ap.error("--out is required (or --plot JSON)")
    if min(args.batches + args.prefix_lens + args.tree_sizes) < 1:
        ap.error("batches, prefix lengths and tree sizes must be >= 1")
    tiles = GRID
    if args.grid is not None:
        try:
            tiles = [TileConfig(m, n, num_warps=w, num_stages=st) for m, n, w, st in args.grid]
        except (TypeError, ValueError):
            ap.error(f"--grid: expected [[block_m, block_n, num_warps, num_stages], ...], "
                     f"got {args.grid!r}")
    if args.smoke:
        if not os.environ.get("TRITON_INTERPRET"):
            ap.error("--smoke needs TRITON_INTERPRET=1 in the environment")
        bench.SMOKE = True
        models, args.batches, args.prefix_lens, args.tree_sizes = (
            list(SMOKE_MODELS), [2], [40], [1, 4])
        tiles, device = SMOKE_GRID, torch.device("cpu")
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    else:
        models, device = args.models, torch.device("cuda")
    meta = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "dtype": "float32", "grid": [tile_key(t) for t in tiles],
            "command": "python " + " ".join(sys.argv)}
    rows, start = [], time.time()
    for model, b, p, t in itertools.product(models, args.batches, args.prefix_lens,
                                            args.tree_sizes):
        if time.time() - start > args.budget_s:
            print(f"budget reached; skipping {model} B={b} P={p} T={t}", flush=True)
            continue
        torch.manual_seed(0)
        row = time_case(Case(model, b, p, t, torch.float32, device), tiles)
        rows.append(row)
        us = row["us"]
        print(f"{model:<13} B={b:<2} P={p:<5} T={t:<3} default {row['default_tile']} "
              f"{us['default']:9.1f} us  best {row['best']} {us.get(row['best'], float('nan')):9.1f}"
              f"  sdpa {us['sdpa']:9.1f}  ({len(row['errors'])} skipped)", flush=True)
    data = {"meta": meta, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    print(f"wrote {args.out}")
    try:
        plot(data, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: draw the plot later with --plot", flush=True)


if __name__ == "__main__":
    main()
