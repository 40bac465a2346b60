"""Tree attention on one GPU: our paged Triton kernel vs SDPA, flex_attention and the bandwidth bound.

Issue 4, requirement 5. For each case (model shapes x prefix x batch x tree size)
the same queries, keys and values are run through

* ``ours``: ``kernels.tree_attention`` reading the paged pool through block tables;
* ``sdpa``: ``F.scaled_dot_product_attention`` on K/V already gathered into a
  contiguous ``[batch, kv_heads, len, dim]`` tensor, with a dense bool mask
  (the gather is not timed, which favours the peer);
* ``flex``: compiled ``flex_attention`` with a ``BlockMask`` on the same gathered K/V;

and compared with the bound ``bytes that must be read / measured copy bandwidth``
(K and V of every prefix and tree token once, plus Q and O). ``tree_size`` counts
query rows per sequence, root included: 1 is a plain decode step.

Every time is a CUDA-graph replay (the H200 host needs ~16 us per launch, which
would swamp small cases); small cases rotate over several copies of their inputs
so that they are not served from the 60 MB L2.

    python benchmarks/kernels/bench_tree_attention.py --out benchmarks/results/kernels-h200.json

Several GPUs (benchmarks/kernels/h200_x4.sh drives this): ``--phase sweep --shard I/N``
times kernel variants per case class (model x tree size) on GPU I's share of the
classes; ``--merge-sweep`` picks each class's best; ``--phase final --shard I/N
--configs best.json`` runs GPU I's share of the cases with those variants;
``--merge`` joins the shards into one result JSON + plot. ``--smoke`` runs tiny
shapes on the CPU under ``TRITON_INTERPRET=1`` (plumbing only, times meaningless).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels.tree_attention import (
    SPLIT_CHOICES,
    TileConfig,
    default_tile_config,
    device_num_sms,
    estimate_programs_per_sm,
    plan_num_splits,
    tree_attention,
    tree_mask_from_template,
    tree_mask_to_dense,
)

MODELS = {  # name: (num_heads, num_kv_heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
SMOKE_MODELS = {"tiny-gqa4": (8, 2, 128), "tiny-gqa3": (6, 2, 64)}
BLOCK_SIZE = 16
L2_BYTES = 60 * 2**20
SMOKE = False  # set by --smoke: CPU, Triton interpreter, wall-clock timing, one input copy
# Where each sequence's blocks lie in the paged pool (`Case`, --block-order): "random" (the
# default: every block a random one of the pool, as after churn) or "sequential" (each
# sequence's blocks one after another, as in a fresh pool and like the peers' contiguous K/V).
BLOCK_ORDERS = ("random", "sequential")


def template_parents(tree_size: int) -> list[int]:
    """A BFS-ordered ternary tree of ``tree_size`` rows (depth 4 at 64 rows), like a TR-Jacobi template."""
    return [-1] + [(i - 1) // 3 for i in range(1, tree_size)]


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second.

    The GPU idles at a low clock; a second of copies first brings it up, or the
    bound comes out low (2.8 TB/s instead of 4.3 in our first run).
    """
    if SMOKE:
        src = torch.randn(2**22, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        src.clone()
        return 2 * src.numel() * 2 / (time.perf_counter() - t0) / 1e9
    n = 2**30
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t0 = time.time()
    while time.time() - t0 < 1.5:
        for _ in range(50):
            dst.copy_(src)
        torch.cuda.synchronize()
    us = time_graph([lambda: dst.copy_(src)], target_ms=30)
    return 2 * n * 2 / (us * 1e-6) / 1e9


def time_graph(fns, target_ms: float = 20.0, replays: int = 7) -> float:
    """Median microseconds per call of ``fns`` (called round robin) from CUDA-graph replays."""
    if SMOKE:
        for f in fns:
            f()
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) / len(fns) * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for f in fns:
        f()
    end.record()
    end.synchronize()
    est_ms = max(start.elapsed_time(end) / len(fns), 1e-3)
    reps = int(min(max(target_ms / (est_ms * len(fns)), 1), 200))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / (reps * len(fns)) * 1000.0


def num_sms() -> int:
    """What ``tree_attention`` counts (4 under the interpreter)."""
    return device_num_sms(torch.device("cpu" if SMOKE else "cuda"))


class Case:
    """Inputs of one case, in ``copies`` independent sets (to defeat the L2)."""

    def __init__(self, model, batch, prefix_len, tree_size, dtype, device, block_order="random"):
        if block_order not in BLOCK_ORDERS:
            raise ValueError(f"block_order must be one of {BLOCK_ORDERS}, got {block_order!r}")
        self.model, self.batch, self.prefix_len, self.tree_size = model, batch, prefix_len, tree_size
        self.block_order = block_order
        self.num_heads, self.num_kv_heads, self.head_dim = {**MODELS, **SMOKE_MODELS}[model]
        self.dtype = dtype
        H, Hkv, D, B, T = self.num_heads, self.num_kv_heads, self.head_dim, batch, tree_size
        self.seq_len = L = prefix_len + T
        elt = torch.finfo(dtype).bits // 8
        self.kv_bytes = 2 * B * L * Hkv * D * elt
        self.bytes = self.kv_bytes + 2 * B * T * H * D * elt  # + Q read and O written
        self.flops = 4 * B * T * H * L * D
        self.copies = 1 if SMOKE else int(min(max(1, math.ceil(4 * L2_BYTES / self.kv_bytes)), 16))
        blocks_per_seq = -(-L // BLOCK_SIZE)
        num_blocks = self.copies * B * blocks_per_seq
        self.k_pool = torch.randn(num_blocks, BLOCK_SIZE, Hkv, D, dtype=dtype, device=device)
        self.v_pool = torch.randn(num_blocks, BLOCK_SIZE, Hkv, D, dtype=dtype, device=device)
        if block_order == "random":
            perm = torch.randperm(num_blocks, device=device).to(torch.int32)
        else:
            perm = torch.arange(num_blocks, device=device, dtype=torch.int32)
        self.tables = perm.view(self.copies, B, blocks_per_seq)
        self.query = torch.randn(B * T, H, D, dtype=dtype, device=device)
        self.cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
        self.seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
        parents = template_parents(T)
        self.tree_mask = tree_mask_from_template(parents, B).to(device)
        self.tree_dense = tree_mask_to_dense(self.tree_mask[:T].cpu(),
                                             torch.tensor([0, T]))[0].to(device)

    def default_tile(self) -> TileConfig:
        return default_tile_config(self.tree_size, self.num_heads // self.num_kv_heads, self.head_dim,
                                   self.dtype, self.batch, self.num_kv_heads, self.seq_len, num_sms())

    def num_splits(self, tile: TileConfig) -> int:
        sms = num_sms()
        return plan_num_splits(tile, self.batch, self.batch * self.tree_size, self.num_heads,
                               self.num_kv_heads, self.head_dim, self.tree_size, self.seq_len,
                               torch.finfo(self.dtype).bits // 8, sms)

    def ours(self, copy: int, tile: TileConfig | None = None, out=None, num_splits: int | None = None):
        return tree_attention(
            self.query, self.k_pool, self.v_pool, self.tables[copy], self.cu, self.seq_lens,
            self.tree_mask, max_query_len=self.tree_size, max_seq_len=self.seq_len, out=out,
            tile=tile, num_splits=num_splits,
        )

    def gathered(self, copy: int):
        pos = torch.arange(self.seq_len, device=self.k_pool.device)
        blocks = self.tables[copy].long()[:, pos // BLOCK_SIZE]
        k = self.k_pool[blocks, pos % BLOCK_SIZE].transpose(1, 2).contiguous()
        v = self.v_pool[blocks, pos % BLOCK_SIZE].transpose(1, 2).contiguous()
        return k, v

    def q4(self):
        return self.query.view(self.batch, self.tree_size, self.num_heads, self.head_dim).transpose(1, 2)

    def dense_mask(self):
        mask = torch.ones(self.batch, 1, self.tree_size, self.seq_len, dtype=torch.bool,
                          device=self.query.device)
        mask[..., self.prefix_len:] = self.tree_dense
        return mask

    def block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        prefix = torch.full((self.batch,), self.prefix_len, device=self.query.device)
        tree = self.tree_dense

        def mask_mod(b, h, q_idx, kv_idx):
            j = kv_idx - prefix[b]
            return (j < 0) | tree[q_idx, j.clamp(min=0)]

        return create_block_mask(mask_mod, self.batch, None, self.tree_size, self.seq_len,
                                 device=self.query.device)


_flex = None


def flex_fn():
    global _flex
    if _flex is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 256
        _flex = torch.compile(flex_attention)
    return _flex


def run_case(case: Case, args, tile: TileConfig | None = None, source: str = "default") -> dict:
    row = {
        "model": case.model, "batch": case.batch, "prefix_len": case.prefix_len, "tree_size": case.tree_size,
        "num_heads": case.num_heads, "num_kv_heads": case.num_kv_heads, "head_dim": case.head_dim,
        "dtype": str(case.dtype).removeprefix("torch."), "copies": case.copies,
        "bytes_read_written": case.bytes, "flops": case.flops,
    }
    default = case.default_tile()
    tile = tile or default
    # Which kernel variant ran (TileConfig.as_list: block_m, block_n, warps, stages, head_pack,
    # use_dot, table_per_block, programs_per_sm) and where it came from.
    row["config"] = tile.as_list()
    row["config_source"] = source
    row["num_splits"] = case.num_splits(tile)
    outs = [torch.empty_like(case.query) for _ in range(case.copies)]
    row["ours"] = time_graph([lambda c=c: case.ours(c, tile, out=outs[c]) for c in range(case.copies)])
    ref_out = case.ours(0, tile)
    if tile != default:
        # The kernel's built-in default on the same inputs, for the gain of the tuned variant.
        row["ours_default"] = time_graph([lambda c=c: case.ours(c, default, out=outs[c])
                                          for c in range(case.copies)])
        row["ours_default_config"] = default.as_list()
        row["max_abs_diff_vs_default"] = float((case.ours(0, default).float() - ref_out.float()).abs().max())
    gathered = [case.gathered(c) for c in range(case.copies)]
    q4 = case.q4()
    mask = case.dense_mask()
    # A peer that fails for any reason (OOM, no kernel for the combination, a compile
    # error) is recorded in the JSON instead of ending the run.
    try:
        def sdpa(c, gathered=gathered, mask=mask):
            return F.scaled_dot_product_attention(q4, *gathered[c], attn_mask=mask, enable_gqa=True)

        got = sdpa(0).transpose(1, 2).reshape_as(ref_out)
        row["max_abs_diff_vs_sdpa"] = float((got.float() - ref_out.float()).abs().max())
        row["sdpa"] = time_graph([lambda c=c: sdpa(c) for c in range(case.copies)])
    except Exception as exc:  # noqa: BLE001
        row["sdpa"], row["sdpa_error"] = None, f"{type(exc).__name__}: {exc}"[:300]
    sdpa = mask = None  # free the dense mask before flex builds its own
    if not args.no_flex:
        try:
            bm = case.block_mask()
            flex = flex_fn()

            def run_flex(c, gathered=gathered):
                return flex(q4, *gathered[c], block_mask=bm, enable_gqa=True)

            got = run_flex(0).transpose(1, 2).reshape_as(ref_out)
            row["max_abs_diff_vs_flex"] = float((got.float() - ref_out.float()).abs().max())
            row["flex"] = time_graph([lambda c=c: run_flex(c) for c in range(case.copies)])
        except Exception as exc:  # noqa: BLE001
            row["flex"], row["flex_error"] = None, f"{type(exc).__name__}: {exc}"[:300]
    else:
        row["flex"] = None
    del gathered
    add_bounds(row, args.copy_gbps, args.bf16_tflops)
    return row


def add_bounds(row: dict, copy_gbps: float, bf16_tflops: float) -> None:
    """Bandwidth bound, and the compute bound that tree steps with many rows per kv head hit first."""
    row["bound_gbps"] = copy_gbps
    row["bound_us"] = row["bytes_read_written"] / (copy_gbps * 1e9) * 1e6
    row["achieved_gbps"] = row["bytes_read_written"] / (row["ours"] * 1e-6) / 1e9
    row["pct_of_bound"] = 100.0 * row["achieved_gbps"] / copy_gbps
    row["compute_bound_us"] = row["flops"] / (bf16_tflops * 1e12) * 1e6
    row["roofline_us"] = max(row["bound_us"], row["compute_bound_us"])
    row["pct_of_roofline"] = 100.0 * row["roofline_us"] / row["ours"]


SWEEP_CASES = [(1, 32768), (8, 4096), (64, 4096), (64, 512)]  # (batch, prefix) per class
SMOKE_SWEEP_CASES = [(2, 40)]


def class_key(model: str, tree_size: int) -> str:
    return f"{model}/T{tree_size}"


def candidates(model: str, tree_size: int, dtype=torch.bfloat16) -> list[tuple[str, TileConfig]]:
    """Kernel variants to time for one case class, most promising first; the default leads."""
    H, Hkv, D = {**MODELS, **SMOKE_MODELS}[model]
    G = H // Hkv
    elt = torch.finfo(dtype).bits // 8
    base = default_tile_config(tree_size, G, D, dtype)
    out = [("default", base)]

    def add(name, tile):
        cols = triton_next_pow2(tile.head_pack * D)
        smem = tile.num_stages * 2 * tile.block_n * cols * elt
        rows = tile.head_pack * G
        if (smem > 200 * 1024 or tile.block_m < rows or Hkv % tile.head_pack
                or (tile.use_dot and tile.block_m < 16) or any(t == tile for _, t in out)):
            return
        out.append((name, tile))

    if tree_size == 1:
        for bn, w, st in ((128, 4, 3), (64, 4, 3), (256, 4, 2), (256, 8, 2), (128, 8, 2), (64, 4, 4),
                          (256, 8, 3)):
            add(f"dot bn{bn} w{w} s{st}", TileConfig(16, bn, w, st))
        add("dot table-per-key", TileConfig(base.block_m, base.block_n, base.num_warps, base.num_stages,
                                            table_per_block=False))
        for pack in (p for p in (2, 3, 4) if Hkv % p == 0 and p * D <= 512):
            bm = max(16, triton_next_pow2(pack * G))
            for bn, w, st in ((64, 4, 2), (32, 4, 3), (64, 4, 3), (128, 4, 2), (64, 8, 2), (32, 4, 4)):
                add(f"pack{pack} bn{bn} w{w} s{st}", TileConfig(bm, bn, w, st, head_pack=pack))
        bm = triton_next_pow2(G)
        for bn, w, st in ((32, 4, 2), (64, 8, 2), (16, 4, 2), (32, 8, 3), (64, 4, 2), (32, 4, 3)):
            add(f"fma bn{bn} w{w} s{st}", TileConfig(bm, bn, w, st, use_dot=False))
    else:
        for bm, bn, w, st in ((64, 64, 4, 2), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 3),
                              (128, 64, 4, 3), (64, 128, 4, 2), (32, 64, 4, 3), (64, 64, 8, 3),
                              (128, 64, 8, 2), (128, 128, 8, 2), (64, 32, 4, 2)):
            add(f"dot bm{bm} bn{bn} w{w} s{st}", TileConfig(bm, bn, w, st))
        add("dot table-per-key", TileConfig(base.block_m, base.block_n, base.num_warps, base.num_stages,
                                            table_per_block=False))
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def with_ppsm(tile: TileConfig, ppsm: int) -> TileConfig:
    return TileConfig(*tile.as_list()[:4], head_pack=tile.head_pack, use_dot=tile.use_dot,
                      table_per_block=tile.table_per_block, programs_per_sm=ppsm)


def shard_of(items: list, shard: tuple[int, int], weights: list[float] | None = None) -> list:
    """This shard's items: greedy longest-first over ``weights`` (round robin without)."""
    idx, n = shard
    if weights is None:
        return items[idx::n]
    loads = [0.0] * n
    owner = {}
    for i in sorted(range(len(items)), key=lambda i: -weights[i]):
        k = min(range(n), key=lambda j: loads[j])
        loads[k] += weights[i]
        owner[i] = k
    return [items[i] for i in range(len(items)) if owner[i] == idx]


def _time_variant(ctx: dict, name: str, tile: TileConfig, stage: int, args) -> float | None:
    """Time one variant on every case of a sweep class; its score is the geometric mean of its
    times over the class default's (the first variant timed)."""
    key, us_list = ctx["key"], []
    for case, r in zip(ctx["cases"], ctx["ref"]):
        try:
            diff = float((case.ours(0, tile).float() - r).abs().max())
            if not diff <= 0.05:
                raise ValueError(f"output differs from the default's by {diff}")
            us = time_graph([lambda c=c, case=case: case.ours(c, tile) for c in range(case.copies)],
                            target_ms=8, replays=5)
        except Exception as exc:  # noqa: BLE001 (a variant that does not fit is skipped)
            print(f"  {key} {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            ctx["rows"].append({"class": key, "name": name, "tile": tile.as_list(), "stage": stage,
                                "error": f"{type(exc).__name__}: {exc}"[:300]})
            return None
        us_list.append(us)
        ctx["rows"].append({"class": key, "name": name, "tile": tile.as_list(), "stage": stage,
                            "model": case.model, "batch": case.batch, "prefix_len": case.prefix_len,
                            "tree_size": case.tree_size, "us": us, "num_splits": case.num_splits(tile),
                            "max_abs_diff": diff,
                            "pct_of_bound": 100 * case.bytes / (us * 1e-6) / 1e9 / args.copy_gbps})
    base = ctx["base_us"]
    if not base:
        base.extend(us_list)
    score = math.exp(sum(math.log(u / b) for u, b in zip(us_list, base)) / len(us_list))
    ctx["scores"][name] = (score, tile)
    print(f"  {key} {name:<24} {tile.as_list()} " + " ".join(f"{u:8.1f}" for u in us_list)
          + f"  score {score:.3f}", flush=True)
    return score


def sweep_classes(args, device) -> dict:
    """Time variants per case class (this shard's classes); each class's best by geometric mean.

    Stage 1 times every candidate (split count from the occupancy estimate) on the
    class's cases; stage 2 retimes the best three with 1-4 programs per SM for the
    split heuristic. A variant whose output differs from the default's by more
    than 0.05 (bf16) or that fails to compile is dropped. Stops at the budget.
    """
    t_start = time.time()
    classes = [(m, t) for t in args.tree_sizes for m in args.models]
    weights = [3.0 if t == 1 else 1.5 if t >= 64 else 1.3 for _, t in classes]
    mine = shard_of(classes, args.shard, weights)
    print(f"sweep shard {args.shard}: classes {[class_key(*c) for c in mine]}", flush=True)
    rows, best = [], {}
    reps = SMOKE_SWEEP_CASES if SMOKE else SWEEP_CASES
    per_class = args.sweep_budget_s / max(1, len(mine))
    for ci, (model, t) in enumerate(mine):
        key = class_key(model, t)
        deadline = t_start + per_class * (ci + 1)
        cases = [Case(model, b, p, t, torch.bfloat16, device) for b, p in reps]
        cands = candidates(model, t)
        ref = None
        for i, (name, tile) in enumerate(cands):  # the reference output: the first variant that runs
            try:
                ref = [c.ours(0, tile).float() for c in cases]
            except Exception as exc:  # noqa: BLE001
                print(f"  {key} {name} fails ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
                continue
            cands = cands[i:]
            break
        if ref is None:
            continue
        if SMOKE:
            cands = cands[:2] + [c for c in cands if not c[1].use_dot or c[1].head_pack > 1][:2]
        scores: dict[str, tuple[float, TileConfig]] = {}
        ctx = {"key": key, "cases": cases, "ref": ref, "rows": rows, "scores": scores, "base_us": []}
        for name, tile in cands:
            if time.time() > deadline - 0.25 * per_class and name != "default":
                print(f"  {key}: stage-1 budget reached, {name} and later skipped", flush=True)
                break
            _time_variant(ctx, name, tile, 1, args)
        top = sorted(scores.items(), key=lambda kv: kv[1][0])[:3]
        for name, (_, tile) in top:
            est = estimate_programs_per_sm(tile, cases[0].head_dim, 2)
            for ppsm in (1, 2, 3, 4):
                if ppsm == est or time.time() > deadline:
                    continue
                _time_variant(ctx, f"{name} ppsm{ppsm}", with_ppsm(tile, ppsm), 2, args)
        if scores:
            name, (score, tile) = min(scores.items(), key=lambda kv: kv[1][0])
            best[key] = {"name": name, "tile": tile.as_list(), "score_vs_default": score,
                         "default_tile": cands[0][1].as_list(), "cases": [[c.batch, c.prefix_len] for c in cases],
                         "candidates_timed": len(scores)}
            print(f"sweep {key}: best {name} {tile.as_list()} at {score:.3f}x the default's time", flush=True)
        del cases, ref, ctx
        if not SMOKE:
            torch.cuda.empty_cache()
    return {"rows": rows, "best": best, "shard": list(args.shard), "copy_gbps": args.copy_gbps}


def add_read_ceiling(rows: list[dict]) -> None:
    """The fastest K/V read rate any method reached in this run, as a second ceiling.

    A copy both reads and writes, and on the H200 here it moves fewer bytes per
    second (2.8 TB/s, read + written) than an attention kernel that only reads
    (SDPA on contiguous K/V reached 4.5 TB/s), so ``pct_of_bound`` can pass 100%.
    Only cases whose rotated inputs are several times the L2 count.
    """
    rates = [
        r["bytes_read_written"] / (r[m] * 1e-6) / 1e9
        for r in rows if r["copies"] * r["bytes_read_written"] >= 4 * L2_BYTES
        for m in ("ours", "sdpa", "flex") if r.get(m)
    ]
    ceiling = max(rates) if rates else float("nan")
    for r in rows:
        r["read_ceiling_gbps"] = ceiling
        r["pct_of_read_ceiling"] = 100.0 * r["achieved_gbps"] / ceiling
        compute_us = r["compute_bound_us"]
        r["read_roofline_us"] = max(r["bytes_read_written"] / (ceiling * 1e9) * 1e6, compute_us)
        r["pct_of_read_roofline"] = 100.0 * r["read_roofline_us"] / r["ours"]


def _us(v: float | None) -> str:
    return f"{v:9.1f}" if v else f"{'-':>9}"


def _ratio(row: dict, peer: str) -> str:
    return f"{row[peer] / row['ours']:10.2f}" if row.get(peer) else f"{'-':>10}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 9), squeeze=False)
    for col, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        orders = len({r.get("block_order", "random") for r in mine}) > 1
        ax = axes[0][col]
        for b in sorted({r["batch"] for r in mine}):
            for t in sorted({r["tree_size"] for r in mine}):
                for order in sorted({r.get("block_order", "random") for r in mine}):
                    pts = sorted((r["prefix_len"], r["pct_of_read_ceiling"]) for r in mine
                                 if r["batch"] == b and r["tree_size"] == t
                                 and r.get("block_order", "random") == order)
                    ax.plot(*zip(*pts), marker="o", label=f"batch {b}, tree {t}"
                            + (f", {order} blocks" if orders else ""))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prefix length")
        ax.set_ylabel("% of read ceiling (fastest K/V read in the run)")
        ax.set_title(f"{model}: our kernel's K/V read rate")
        ax.axhline(80, color="grey", ls="--", lw=0.8)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        labels = [f"B{r['batch']}/P{r['prefix_len'] // 1024 or r['prefix_len']}"
                  f"{'k' if r['prefix_len'] >= 1024 else ''}/T{r['tree_size']}"
                  f"{'/' + r['block_order'][:3] if orders else ''}" for r in mine]
        x = range(len(mine))
        for key, off in (("sdpa", -0.2), ("flex", 0.2)):
            ratio = [(r[key] / r["ours"]) if r.get(key) else float("nan") for r in mine]
            ax.bar([i + off for i in x], ratio, width=0.4, label=f"{key} time / ours")
        ax.axhline(1, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_title(f"{model}: speedup of ours over the peers")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_shard(text: str) -> tuple[int, int]:
    i, n = (int(x) for x in text.split("/"))
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text}: want I/N with 0 <= I < N")
    return i, n


def all_cases(args) -> list[tuple[str, int, int, int]]:
    """(model, batch, prefix, tree) in run order: longest prefixes first (if the budget runs out,
    the short, least telling cases go)."""
    return [(m, b, p, t) for p in sorted(args.prefix_lens, reverse=True) for m in args.models
            for b in args.batches for t in args.tree_sizes]


def final_cases(args, device, meta: dict, configs: dict) -> list[dict]:
    t_start = time.time()
    rows: list[dict] = []
    header = f"{'model':<13}{'B':>3}{'prefix':>7}{'T':>4} {'ours us':>9}{'sdpa us':>9}{'flex us':>9}" \
             f"{'sdpa/ours':>10}{'flex/ours':>10}{'GB/s':>7}{'%bound':>7}  config"
    print(header, flush=True)
    cases = all_cases(args)
    # Rough seconds a case takes (setup and flex compile, plus the big reads), to balance the shards.
    sizes = {**MODELS, **SMOKE_MODELS}
    weights = [4.0 + b * (p + t) * sizes[m][1] * sizes[m][2] * 4 * t ** 0.5 / 2e9 for m, b, p, t in cases]
    todo = shard_of(cases, args.shard, weights)
    for model, b, p, t in todo:
        if time.time() - t_start > args.budget_s:
            print(f"budget reached; skipping {model} B={b} P={p} T={t}", flush=True)
            continue
        best = configs.get(class_key(model, t))
        tile = TileConfig.from_list(best["tile"]) if best else None
        for order in args.block_order:  # each order right after the other, same case
            case = Case(model, b, p, t, torch.bfloat16, device, block_order=order)
            try:
                r = run_case(case, args, tile, f"sweep best ({best['name']})" if best else "default")
            except Exception as exc:  # noqa: BLE001 (our kernel failed: record it, keep the other cases)
                print(f"{model} B={b} P={p} T={t} ({order} blocks): {type(exc).__name__}: "
                      f"{str(exc)[:300]}", flush=True)
                del case
                continue
            r.update(meta)
            r["block_order"] = order
            rows.append(r)
            del case
            if not SMOKE:
                torch.cuda.empty_cache()
            print(f"{model:<13}{b:>3}{p:>7}{t:>4} {_us(r['ours'])}{_us(r['sdpa'])}"
                  f"{_us(r['flex'])}{_ratio(r, 'sdpa')}{_ratio(r, 'flex')}"
                  f"{r['achieved_gbps']:7.0f}{r['pct_of_bound']:7.1f}  {r['config']} x{r['num_splits']}"
                  f"{'' if len(args.block_order) == 1 else '  ' + order + ' blocks'}", flush=True)
            args.out.write_text(json.dumps(rows, indent=1))
    return rows


def time_splits(case: Case, tile: TileConfig, target_ms: float) -> dict[int, float]:
    """Microseconds of ``tile`` at each split count the kernel chooses from (up to one
    key tile per split)."""
    times = {}
    for s in SPLIT_CHOICES:
        if s > -(-case.seq_len // tile.block_n):
            break
        times[s] = time_graph([lambda c=c, s=s: case.ours(c, tile, num_splits=s) for c in range(case.copies)],
                              target_ms=target_ms, replays=5)
    return times


def split_cases(args, device, meta: dict) -> list[dict]:
    """Each case with its class tile at every split count of ``SPLIT_CHOICES`` (up to one
    key tile per split): the data the split model is fitted to and checked against
    (``num_splits_model``: what ``plan_num_splits`` picks for that tile)."""
    t_start = time.time()
    rows: list[dict] = []
    cases = all_cases(args)
    sizes = {**MODELS, **SMOKE_MODELS}
    weights = [2.0 + b * (p + t) * sizes[m][1] * sizes[m][2] * 4 * t ** 0.5 / 2e9 for m, b, p, t in cases]
    for model, b, p, t in shard_of(cases, args.shard, weights):
        if time.time() - t_start > args.budget_s:
            print(f"budget reached; skipping {model} B={b} P={p} T={t}", flush=True)
            continue
        case = Case(model, b, p, t, torch.bfloat16, device)
        # The class tile (what the fitted split model and its test assume), not the
        # shape-aware default.
        tile = default_tile_config(t, case.num_heads // case.num_kv_heads, case.head_dim, case.dtype)
        ref = case.ours(0, tile, num_splits=1).float()
        times = time_splits(case, tile, target_ms=8)
        diffs = {s: float((case.ours(0, tile, num_splits=s).float() - ref).abs().max()) for s in times}
        sms = num_sms()
        row = {"model": model, "batch": b, "prefix_len": p, "tree_size": t,
               "num_heads": case.num_heads, "num_kv_heads": case.num_kv_heads, "head_dim": case.head_dim,
               "config": tile.as_list(), "num_sms": sms,
               "programs_per_sm_estimate": estimate_programs_per_sm(tile, case.head_dim, 2),
               "num_splits_model": case.num_splits(tile),
               "splits_us": {str(k): v for k, v in times.items()},
               "max_abs_diff_vs_1_split": max(diffs.values()), **meta}
        rows.append(row)
        best = min(times, key=times.get)
        print(f"{model:<13}{b:>3}{p:>7}{t:>4} model x{row['num_splits_model']} "
              f"{times.get(row['num_splits_model'], float('nan')):8.1f} us; best x{best} {times[best]:8.1f} us; "
              + " ".join(f"{k}:{v:.1f}" for k, v in times.items()), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
        del case
        if not SMOKE:
            torch.cuda.empty_cache()
    return rows


def tile_cases(args, device) -> list[dict]:
    """Decode (every batch and prefix) and short-prefix trees at several tiles x every split
    count: the data behind ``default_tile_config``'s big-batch and short-prefix rules
    (``kernels-h200-tiles.json``)."""
    short = min(args.prefix_lens)
    cases = [(m, b, p, 1) for m in args.models for b in args.batches for p in args.prefix_lens]
    cases += [(m, b, short, t) for m in args.models for b in args.batches for t in args.tree_sizes if t > 1]
    rows = []
    for model, b, p, t in shard_of(cases, args.shard):
        case = Case(model, b, p, t, torch.bfloat16, device)
        if t == 1:
            tiles = [TileConfig(16, 128, 4, 2), TileConfig(16, 64, 2, 2), TileConfig(16, 32, 4, 2),
                     TileConfig(16, 64, 4, 2), TileConfig(16, 128, 2, 2), TileConfig(16, 32, 2, 2)]
        else:
            tiles = [case.default_tile(), TileConfig(64, 64, 4, 3), TileConfig(64, 32, 4, 2),
                     TileConfig(64, 32, 4, 3, table_per_block=True), TileConfig(128, 64, 8, 2)]
        for tile in tiles:
            times = time_splits(case, tile, target_ms=6)
            rows.append({"model": model, "batch": b, "prefix_len": p, "tree_size": t, "tile": tile.as_list(),
                         "splits_us": {str(k): v for k, v in times.items()}})
            best = min(times, key=times.get)
            print(model, b, p, t, tile.as_list()[:4], f"best x{best} {times[best]:.1f}",
                  " ".join(f"{k}:{v:.1f}" for k, v in times.items()), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
        del case
        if not SMOKE:
            torch.cuda.empty_cache()
    return rows


def merge_sweeps(paths: list[Path], sweep_out: Path, configs_out: Path) -> None:
    rows, best = [], {}
    for path in paths:
        part = json.loads(path.read_text())
        for r in part["rows"]:
            r["shard"] = part["shard"]
        rows += part["rows"]
        best.update(part["best"])
    sweep_out.write_text(json.dumps({"best": best, "rows": rows}, indent=1))
    configs_out.write_text(json.dumps(best, indent=1))
    for key, b in sorted(best.items()):
        print(f"best {key:<22} {b['name']:<28} {b['tile']} {b['score_vs_default']:.3f}x default time")


def merge_finals(paths: list[Path], out: Path, args) -> None:
    """Join shard results; one bound for all: the best copy-bandwidth reading of any shard."""
    rows = []
    for path in paths:
        rows += json.loads(path.read_text())
    gbps = max(r["copy_bandwidth_gbps"] for r in rows)
    order = {c: i for i, c in enumerate(all_cases(args))}
    rows.sort(key=lambda r: order.get((r["model"], r["batch"], r["prefix_len"], r["tree_size"]), 1 << 30))
    missing = [c for c in all_cases(args) if c not in
               {(r["model"], r["batch"], r["prefix_len"], r["tree_size"]) for r in rows}]
    for r in rows:
        r["copy_bandwidth_gbps"] = gbps
        add_bounds(r, gbps, args.bf16_tflops)
    finish(rows, out)
    wins = {t: [0, 0, 0] for t in args.tree_sizes}
    for r in rows:
        w = wins.setdefault(r["tree_size"], [0, 0, 0])
        w[0] += 1
        w[1] += bool(r.get("sdpa") and r["sdpa"] > r["ours"])
        w[2] += bool(r.get("flex") and r["flex"] > r["ours"])
    for t, (n, ws, wf) in sorted(wins.items()):
        print(f"tree {t}: faster than sdpa in {ws}/{n}, than flex in {wf}/{n}")
    if missing:
        print(f"missing cases (budget or failure): {missing}")


def main() -> None:
    global SMOKE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels-h200.json"))
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--tree-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--block-order", nargs="+", choices=BLOCK_ORDERS, default=["random"],
                    help="where each sequence's blocks lie in the paged pool: random (default, as "
                         "after churn) and/or sequential (as in a fresh pool); with both, every "
                         "case runs under each, back to back (--phase final)")
    ap.add_argument("--phase", choices=["all", "sweep", "final", "splits", "tiles"], default="all",
                    help="all: (optional --sweep) then the cases; sweep: only the class sweep "
                         "(--sweep PATH); final: only the cases (with --configs); splits: every "
                         "case at each split count of SPLIT_CHOICES with its class tile (--out); tiles: "
                         "decode and short-prefix trees at several tiles x split counts (--out)")
    ap.add_argument("--sweep", type=Path, help="sweep kernel variants per case class, writing this JSON")
    ap.add_argument("--configs", type=Path, help="per-class best variants (from --merge-sweep) for the cases")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                    help="run the I-th of N disjoint slices of the classes / cases (one GPU each)")
    ap.add_argument("--merge-sweep", type=Path, nargs="+", metavar="SHARD_JSON",
                    help="join sweep shards into --sweep and their best variants into --configs")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="SHARD_JSON",
                    help="join result shards into --out (+ plot)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="this process: stop starting new cases after this many seconds of the case phase")
    ap.add_argument("--sweep-budget-s", type=float, default=150.0,
                    help="this process: seconds for the sweep (split over its classes)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU plumbing check under TRITON_INTERPRET=1: tiny shapes, wall-clock times, no flex")
    ap.add_argument("--bf16-tflops", type=float, default=790.0,
                    help="dense bf16 matmul rate measured on this H200 (KINDS.md), for compute_bound_us")
    ap.add_argument("--recompute", type=Path,
                    help="only recompute derived fields and the plot of an existing result JSON")
    args = ap.parse_args()
    SMOKE = args.smoke
    if args.block_order != ["random"] and args.phase not in ("all", "final"):
        ap.error(f"--block-order applies to --phase final (and all); --phase {args.phase} "
                 "always uses random blocks")
    args.models = args.models or (list(SMOKE_MODELS) if SMOKE else list(MODELS))
    args.prefix_lens = args.prefix_lens or ([40, 9] if SMOKE else [512, 4096, 32768])
    args.batches = args.batches or ([2] if SMOKE else [1, 8, 64])
    if SMOKE:
        args.tree_sizes = [t for t in args.tree_sizes if t <= 16] or [1]
        args.no_flex = True
    if args.recompute:
        finish(json.loads(args.recompute.read_text()), args.recompute)
        return
    if args.merge_sweep:
        merge_sweeps(args.merge_sweep, args.sweep, args.configs)
        return
    if args.merge:
        merge_finals(args.merge, args.out, args)
        return
    if SMOKE:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 in the environment")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on a GPU machine, or pass --smoke under TRITON_INTERPRET=1")
        device = torch.device("cuda")
    t_start = time.time()
    args.copy_gbps = copy_bandwidth_gbps(device)
    name = torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)"
    print(f"{name} torch {torch.__version__}; copy bandwidth {args.copy_gbps:.0f} GB/s; "
          f"shard {args.shard[0]}/{args.shard[1]}", flush=True)
    if args.phase in ("all", "sweep") and args.sweep:
        args.sweep.parent.mkdir(parents=True, exist_ok=True)
        result = sweep_classes(args, device)
        args.sweep.write_text(json.dumps(result, indent=1))
        if args.phase == "all" and not args.configs:
            args.configs = args.sweep.with_name(args.sweep.stem + "-configs.json")
            args.configs.write_text(json.dumps(result["best"], indent=1))
    if args.phase == "sweep":
        print(f"sweep done in {time.time() - t_start:.0f}s; wrote {args.sweep}", flush=True)
        return
    configs = json.loads(args.configs.read_text()) if args.configs else {}
    import triton

    meta = {"command": " ".join(["python"] + sys.argv), "device": name,
            "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_gbps": args.copy_gbps,
            "block_size": BLOCK_SIZE, "shard": list(args.shard)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.phase in ("splits", "tiles"):
        rows = split_cases(args, device, meta) if args.phase == "splits" else tile_cases(args, device)
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"{args.phase} done in {time.time() - t_start:.0f}s; wrote {args.out}", flush=True)
        return
    rows = final_cases(args, device, meta, configs)
    # Take the better of two bandwidth readings (start and end) as the bound for every case.
    end_gbps = copy_bandwidth_gbps(device)
    print(f"copy bandwidth at start {args.copy_gbps:.0f} GB/s, at end {end_gbps:.0f} GB/s", flush=True)
    for r in rows:
        r["copy_bandwidth_gbps"] = max(args.copy_gbps, end_gbps)
        add_bounds(r, r["copy_bandwidth_gbps"], args.bf16_tflops)
    if args.shard[1] > 1:  # a shard: plain rows, the merge derives the rest
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"shard done in {time.time() - t_start:.0f}s; wrote {args.out}", flush=True)
        return
    finish(rows, args.out)
    print(f"done in {time.time() - t_start:.0f}s; wrote {args.out} and {args.out.with_suffix('.png')}")


def finish(rows: list[dict], out: Path) -> None:
    add_read_ceiling(rows)
    out.write_text(json.dumps(rows, indent=1))
    print(f"read ceiling (fastest K/V read of any method) {rows[0]['read_ceiling_gbps']:.0f} GB/s")
    orders = len({r.get("block_order", "random") for r in rows}) > 1
    for r in rows:
        print(f"{r['model']:<13}{r['batch']:>3}{r['prefix_len']:>7}{r['tree_size']:>4} "
              f"{r['achieved_gbps']:7.0f} GB/s {r['pct_of_bound']:6.1f}% of copy bound "
              f"{r['pct_of_read_ceiling']:6.1f}% of read ceiling "
              f"{r['pct_of_read_roofline']:6.1f}% of read/compute roofline"
              f"{'  ' + r['block_order'] + ' blocks' if orders else ''}", flush=True)
    try:
        plot(rows, out.with_suffix(".png"))
    except ImportError as exc:  # the GPU machine may lack matplotlib: plot later with --recompute
        print(f"no plot ({exc}); run --recompute {out} where matplotlib is installed", flush=True)
    errs = {k: r[k] for r in rows for k in ("sdpa_error", "flex_error") if k in r}
    if errs:
        print("peer errors:", errs)


if __name__ == "__main__":
    main()
