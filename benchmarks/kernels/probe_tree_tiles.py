"""Why tree steps run below the bandwidth bound: compiled-code facts and a tile grid.

For a few tree cases of ``bench_tree_attention.py`` (the throughput regime, B=64, and
the latency regime, B=1) this prints, per launch shape, what Triton compiled (Hopper
``wgmma`` or ``mma.sync`` dots, ``cp.async`` copies, registers, spills, shared memory)
and times it at the best of a few split counts (1, 2 at B > 8; 16, 32, 64 otherwise),
with the matmul rate and K/V read rate that time implies; the kernel's default launch is
marked. It writes one JSON row per (case, tile); ``--launch-bound`` instead times a
reference-runner graph step launched for the whole cache vs for its prefix bucket.

    python benchmarks/kernels/probe_tree_tiles.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernels.bench_tree_attention import Case, time_graph
from kernels.tree_attention import TileConfig, _tree_attention_kernel

CASES = [("llama3-8b", 64, 32768, 16), ("llama3-8b", 1, 32768, 16), ("llama3-8b", 64, 4096, 64),
         ("smollm2-135m", 64, 32768, 16), ("smollm2-135m", 1, 32768, 16),
         ("llama3-8b", 8, 32768, 16), ("llama3-8b", 1, 4096, 16),
         ("llama3-8b", 1, 32768, 64), ("llama3-8b", 64, 32768, 64),
         ("smollm2-135m", 64, 32768, 64), ("smollm2-135m", 1, 4096, 64)]
GRID = [(bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]


def compiled_facts() -> dict[str, dict]:
    """Facts of every compiled variant of the attention kernel, keyed by its constants."""
    out = {}
    for cache in getattr(_tree_attention_kernel, "device_caches", {}).values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for key, k in kernels.items():
            ptx = k.asm.get("ptx", "")
            out[str(key)] = {
                "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
                "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
                "cp_async": len(re.findall(r"cp\.async\.(?:cg|ca)", ptx)),
                "ld_global_v4": len(re.findall(r"ld\.global[.\w]*\.v4", ptx)),
                "regs": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None),
                "shared": getattr(k.metadata, "shared", None),
                "num_warps": getattr(k.metadata, "num_warps", None),
            }
    return out


def best_split(case: Case, tile: TileConfig) -> tuple[int, float]:
    best = None
    for s in ((1, 2) if case.batch > 8 else (16, 32, 64)):
        if s > -(-case.seq_len // tile.block_n):
            break
        us = time_graph([lambda c=c, s=s: case.ours(c, tile, num_splits=s) for c in range(case.copies)],
                        target_ms=10, replays=3)
        if best is None or us < best[1]:
            best = (s, us)
    return best


def launch_bound_rows(capacity: int = 4352, bound: int = 512, prefix: int = 300) -> list[dict]:
    """One step of the reference runner's CUDA graphs (B=1, a ``prefix``-token prompt):
    the kernel launched for the whole cache (``max_seq_len=capacity``) vs for the
    graph's prefix bucket (``bound``); default tiles and split counts for each."""
    from kernels.tree_attention import tree_attention

    rows = []
    for model in ("smollm2-135m", "llama3-8b"):
        for tree in (1, 16, 64):
            case = Case(model, 1, prefix, tree, torch.bfloat16, torch.device("cuda"))
            row = {"launch_bound": True, "case": [model, 1, prefix, tree]}
            for name, max_seq_len in (("capacity", capacity), ("bucket", bound)):
                def step(c, n=max_seq_len, x=case, t=tree):
                    return tree_attention(x.query, x.k_pool, x.v_pool, x.tables[c], x.cu, x.seq_lens,
                                          x.tree_mask, max_query_len=t, max_seq_len=n)
                row[f"{name}_us"] = round(time_graph([lambda c=c, f=step: f(c) for c in range(case.copies)],
                                                     target_ms=10, replays=5), 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", type=int, nargs="+", default=list(range(len(CASES))),
                    help="indices into CASES (default: all)")
    ap.add_argument("--launch-bound", action="store_true",
                    help="instead: the runner's graph launch for the whole cache vs its prefix bucket")
    args = ap.parse_args()
    if args.launch_bound:
        args.out.write_text(json.dumps(launch_bound_rows(), indent=1))
        return
    dev = torch.device("cuda")
    rows = []
    for model, batch, prefix, tree in (CASES[i] for i in args.cases):
        case = Case(model, batch, prefix, tree, torch.bfloat16, dev)
        group = case.num_heads // case.num_kv_heads
        default = case.default_tile()
        block_ms = (64,) if tree * group <= 64 else (64, 128)
        tiles = [default] + [TileConfig(bm, bn, w, st) for bm in block_ms for bn, w, st in GRID]
        seen = set()
        for tile in tiles:
            if str(tile.as_list()) in seen:
                continue
            seen.add(str(tile.as_list()))
            before = set(compiled_facts())
            try:
                split, us = best_split(case, tile)
            except (OutOfResources, RuntimeError) as exc:  # record and go on
                rows.append({"case": [model, batch, prefix, tree], "tile": tile.as_list(),
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            facts = compiled_facts()
            new = [facts[k] for k in facts if k not in before]
            row = {"case": [model, batch, prefix, tree], "tile": tile.as_list(),
                   "default": tile == default, "best_split": split, "us": round(us, 2),
                   "tflops": round(case.flops / us / 1e6, 1),
                   "kv_tbps": round(case.kv_bytes / us / 1e6, 2),
                   "compiled": new[0] if new else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(rows, indent=1))  # a timeout keeps what ran


if __name__ == "__main__":
    main()
