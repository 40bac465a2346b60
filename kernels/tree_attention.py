"""Tree attention over a paged KV cache (the TR-Jacobi verify step), plus its reference.

Queries of many sequences are packed: sequence ``b`` owns query rows
``[cu_seqlens_q[b], cu_seqlens_q[b + 1])``, row 0 the root (last accepted token)
and the rest the tree nodes in topological (BFS) order. Their K/V have already
been written to the cache right after the prefix, so sequence ``b`` has
``seq_lens[b]`` keys: ``prefix_len = seq_lens[b] - query_len`` prefix tokens,
then one key per query row. Query row ``i`` sees every prefix key and, among
the query keys, exactly its ancestors and itself (algorithm.md section 4).

The tree mask is an ancestor-or-self bitmask, one bit per query row of the
same sequence, packed into int32 words: ``tree_mask[row, j // 32] >> (j % 32) & 1``.
That is ``ceil(T / 32)`` words a row instead of a dense ``B x T x T`` tensor,
and a chain (parent = previous row) gives plain causal attention, so the same
kernel also serves chunked prefill of a paged sequence.

Kernel design (a flash-decoding variant written for this layout):

* one program per (query block, sequence x kv head, key split); the query
  block packs ``BLOCK_Q`` tokens x the ``GROUP`` query heads that share one kv
  head into the ``BLOCK_M`` rows of a tile, so each K/V tile read from memory
  feeds all heads of its group (GQA) and all tree nodes of the block;
* the query block index varies fastest in the grid, so the programs that read
  the same K/V tiles run together and share them through the L2;
* key tiles are gathered through the block table per key, so ``BLOCK_N`` is
  independent of the cache's ``block_size`` and prefixes may end mid-block;
* only tiles that reach into the tree region pay for the bitmask lookup;
* split-K: with few (sequence, head, query block) programs and a long prefix,
  the key range is cut into ``num_splits`` pieces whose partial (unnormalised
  output, row max, row sum) are merged by a second small kernel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _qk(q, k, USE_DOT: tl.constexpr, IEEE_DOT: tl.constexpr):
    """Scores ``q @ k.T`` of one tile: tensor cores, or (tiny row counts) broadcast FMAs + a row sum."""
    if USE_DOT:
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
    return s


@triton.jit
def _pv(p, v, USE_DOT: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """``p @ v`` of one tile, in a tile of its own (``_pv_into`` from zero); the dot path
    rounds ``p`` to the cache dtype first (tensor cores)."""
    return _pv_into(tl.zeros([p.shape[0], v.shape[1]], dtype=tl.float32), p, v,
                    USE_DOT, IEEE_DOT, UPCAST_BF16)


@triton.jit
def _pv_into(acc, p, v, USE_DOT: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """``acc + p @ v`` with the tensor cores accumulating into ``acc`` itself (no second
    fp32 tile for the product); the FMA path adds its row sums."""
    if USE_DOT:
        p = p.to(v.dtype)
        if UPCAST_BF16:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc)
    else:
        acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
    return acc


@triton.jit
def _key_rows(block_tables_ptr, bt_row, tile, key_end, stride_b, stride_s,
              BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, TABLE_PER_BLOCK: tl.constexpr,
              MASKED: tl.constexpr):
    """Pool offsets (int64) of the ``BLOCK_N`` keys of ``tile``, through the block table.

    ``TABLE_PER_BLOCK`` reads one table entry per cache block of the tile (it needs
    ``BLOCK_N % BLOCK_SIZE == 0``); otherwise one (cached) entry per key.
    """
    if TABLE_PER_BLOCK:
        bi = tile * (BLOCK_N // BLOCK_SIZE) + tl.arange(0, BLOCK_N // BLOCK_SIZE)
        if MASKED:
            blk = tl.load(block_tables_ptr + bt_row + bi, mask=bi * BLOCK_SIZE < key_end, other=0)
        else:
            blk = tl.load(block_tables_ptr + bt_row + bi)
        off = blk.to(tl.int64)[:, None] * stride_b + (tl.arange(0, BLOCK_SIZE) * stride_s)[None, :]
        rows = tl.reshape(off, [BLOCK_N])
    else:
        kpos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            blk = tl.load(block_tables_ptr + bt_row + kpos // BLOCK_SIZE, mask=kpos < key_end, other=0)
        else:
            blk = tl.load(block_tables_ptr + bt_row + kpos // BLOCK_SIZE)
        rows = blk.to(tl.int64) * stride_b + (kpos % BLOCK_SIZE) * stride_s
    return rows


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
    tree_mask_ptr, out_ptr, part_out_ptr, part_ml_ptr,
    qk_scale, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_mask,
    stride_ot, stride_oh,
    stride_ps, stride_pt, stride_ph,
    stride_mls, stride_mlt, stride_mlh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_PACK: tl.constexpr, HEAD_GROUPS: tl.constexpr, ROWS_PER_TOK: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IS_CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr,
    UPCAST_BF16: tl.constexpr, USE_DOT: tl.constexpr, TABLE_PER_BLOCK: tl.constexpr,
    ACC_IN_DOT: tl.constexpr, FMA_SCALE: tl.constexpr,
):
    q_block = tl.program_id(0)
    seq = tl.program_id(1) // HEAD_GROUPS
    kv_head0 = (tl.program_id(1) % HEAD_GROUPS) * HEAD_PACK
    split = tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    # Row r of the tile: token r // ROWS_PER_TOK of the block, kv head (of the pack)
    # r % ROWS_PER_TOK // GROUP, query head r % GROUP of that kv head's group.
    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // ROWS_PER_TOK
    head = kv_head0 * GROUP + rows % ROWS_PER_TOK
    row_ok = (rows < BLOCK_Q * ROWS_PER_TOK) & (tok < q_len)
    # Columns: HEAD_PACK kv heads x HEAD_DIM side by side (one head unless packed). A
    # packed row keeps zeros outside its own head's columns, so one dot over all the
    # columns scores each row against its own kv head only.
    c = tl.arange(0, BLOCK_D)
    if HEAD_PACK == 1:
        k_col = kv_head0 * stride_kh + c
        v_col = kv_head0 * stride_vh + c
        o_col = c
        col_ok = c < HEAD_DIM
        rc_ok = row_ok[:, None] & col_ok[None, :]
    else:
        c_head = c // HEAD_DIM
        o_col = c % HEAD_DIM
        k_col = (kv_head0 + c_head) * stride_kh + o_col
        v_col = (kv_head0 + c_head) * stride_vh + o_col
        col_ok = c < HEAD_PACK * HEAD_DIM
        own = c_head[None, :] == ((rows % ROWS_PER_TOK) // GROUP)[:, None]
        rc_ok = row_ok[:, None] & col_ok[None, :] & own
    q_row = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + o_col[None, :],
                mask=rc_ok, other=0.0)
    if UPCAST_BF16:
        q = q.to(tl.float32)

    # Ancestors precede their descendants (topological order), so no row of this
    # block sees a key past its own last token.
    key_end = prefix_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(key_end, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    # Tiles wholly inside the prefix: every row sees every key, so no mask, no bounds
    # checks and no guard against all-masked rows (padding rows score 0, finite).
    full_hi = tl.maximum(tl.minimum(tile_hi, prefix_len // BLOCK_N), tile_lo)
    bt_row = seq * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile in range(tile_lo, full_hi):
        k_rows = _key_rows(block_tables_ptr, bt_row, tile, key_end, stride_kb, stride_ks,
                           BLOCK_N, BLOCK_SIZE, TABLE_PER_BLOCK, False)
        v_rows = _key_rows(block_tables_ptr, bt_row, tile, key_end, stride_vb, stride_vs,
                           BLOCK_N, BLOCK_SIZE, TABLE_PER_BLOCK, False)
        if EVEN_D:
            k = tl.load(k_cache_ptr + k_rows[:, None] + k_col[None, :])
            v = tl.load(v_cache_ptr + v_rows[:, None] + v_col[None, :])
        else:
            k = tl.load(k_cache_ptr + k_rows[:, None] + k_col[None, :], mask=col_ok[None, :], other=0.0)
            v = tl.load(v_cache_ptr + v_rows[:, None] + v_col[None, :], mask=col_ok[None, :], other=0.0)
        if UPCAST_BF16:
            k = k.to(tl.float32)
        qk = _qk(q, k, USE_DOT, IEEE_DOT)
        if FMA_SCALE:  # scale inside the exponent's FMA (qk_scale > 0 keeps the max)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        else:
            s = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if ACC_IN_DOT:
            acc = _pv_into(acc * alpha[:, None], p, v, USE_DOT, IEEE_DOT, UPCAST_BF16)
        else:
            acc = acc * alpha[:, None] + _pv(p, v, USE_DOT, IEEE_DOT, UPCAST_BF16)
        m_i = m_new

    n = tl.arange(0, BLOCK_N)
    for tile in range(full_hi, tile_hi):
        kpos = tile * BLOCK_N + n
        k_ok = kpos < key_end
        k_rows = _key_rows(block_tables_ptr, bt_row, tile, key_end, stride_kb, stride_ks,
                           BLOCK_N, BLOCK_SIZE, TABLE_PER_BLOCK, True)
        v_rows = _key_rows(block_tables_ptr, bt_row, tile, key_end, stride_vb, stride_vs,
                           BLOCK_N, BLOCK_SIZE, TABLE_PER_BLOCK, True)
        kv_mask = k_ok[:, None] & col_ok[None, :]
        k = tl.load(k_cache_ptr + k_rows[:, None] + k_col[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + v_rows[:, None] + v_col[None, :], mask=kv_mask, other=0.0)
        if UPCAST_BF16:
            k = k.to(tl.float32)
        s = _qk(q, k, USE_DOT, IEEE_DOT) * qk_scale
        allowed = row_ok[:, None] & k_ok[None, :]
        if (tile + 1) * BLOCK_N > prefix_len:
            in_tree = kpos >= prefix_len
            j = tl.maximum(kpos - prefix_len, 0)
            if IS_CAUSAL:
                visible = j[None, :] <= tok[:, None]
            else:
                word = tl.load(tree_mask_ptr + q_row[:, None] * stride_mask + (j // 32)[None, :],
                               mask=row_ok[:, None] & in_tree[None, :] & k_ok[None, :], other=0)
                visible = ((word >> (j % 32)[None, :]) & 1) != 0
            allowed = allowed & (~in_tree[None, :] | visible)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see no key of a tile (or of a whole split); keep exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if ACC_IN_DOT:
            acc = _pv_into(acc * alpha[:, None], p, v, USE_DOT, IEEE_DOT, UPCAST_BF16)
        else:
            acc = acc * alpha[:, None] + _pv(p, v, USE_DOT, IEEE_DOT, UPCAST_BF16)
        m_i = m_new

    o_off = q_row[:, None] * stride_ot + head[:, None] * stride_oh + o_col[None, :]
    if SPLIT:
        tl.store(part_out_ptr + split * stride_ps + q_row[:, None] * stride_pt
                 + head[:, None] * stride_ph + o_col[None, :], acc, mask=rc_ok)
        ml = part_ml_ptr + split * stride_mls + q_row * stride_mlt + head * stride_mlh
        tl.store(ml, m_i, mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)
    else:
        # Padding rows have l_i = 0; they are masked out of the store.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=rc_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_ml_ptr, out_ptr, num_splits,
    stride_ps, stride_pt, stride_ph,
    stride_mls, stride_mlt, stride_mlh,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    ml = part_ml_ptr + s * stride_mls + row * stride_mlt + head * stride_mlh
    m = tl.load(ml, mask=s_ok, other=float("-inf"))
    l = tl.load(ml + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    # Every row sees at least itself, so some split has a finite max; an empty split
    # (m = -inf, l = 0, acc = 0) gets weight 0.
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l, 0)
    acc = tl.load(part_out_ptr + s[:, None] * stride_ps + row * stride_pt + head * stride_ph
                  + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / denom
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def device_num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@dataclass(frozen=True, slots=True)
class TileConfig:
    """Launch shape and variant of the attention kernel.

    ``block_m`` rows (tokens x packed kv heads x group heads) by ``block_n`` keys;
    ``head_pack`` kv heads share one program (their K/V rows are adjacent in the
    pool, so one key reads ``head_pack * head_dim`` contiguous elements, and a
    decode step with a small GQA group fills more of the 16 rows that tl.dot
    needs); ``use_dot=False`` scores and sums with broadcast FMAs instead of
    tensor cores, for tiles of a few rows (``block_m`` may then go below 16);
    ``table_per_block`` reads one block-table entry per cache block of a key tile
    instead of one per key; ``programs_per_sm`` overrides the split model's
    saturation (programs an SM needs to run at full rate; 0: the model's,
    ``choose_num_splits``).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    head_pack: int = 1
    use_dot: bool = True
    table_per_block: bool = False
    programs_per_sm: int = 0

    def as_list(self) -> list:
        return [self.block_m, self.block_n, self.num_warps, self.num_stages, self.head_pack,
                int(self.use_dot), int(self.table_per_block), self.programs_per_sm]

    @classmethod
    def from_list(cls, v: Sequence) -> TileConfig:
        v = list(v)
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), *(int(x) for x in v[4:5]),
                   *(bool(x) for x in v[5:7]), *(int(x) for x in v[7:8]))


@dataclass(frozen=True, slots=True)
class KernelVariant:
    """Code variants of the key loop, for side-by-side benchmarks
    (``benchmarks/kernels/ab_kernel_variant.py``); ``default_variant`` picks per launch.

    ``acc_in_dot``: ``p @ v`` accumulates into the output tile inside the dot (one
    fp32 tile fewer in registers) instead of a product tile added afterwards;
    ``fma_scale``: the softmax scale is applied inside the exponent's FMA instead of
    a separate multiply of every score.
    """

    acc_in_dot: bool = True
    fma_scale: bool = True


def default_variant(tile: TileConfig, head_dim: int) -> KernelVariant:
    """The key loop's code for a launch, from the H200 A/B of all 36 cases at prefixes
    of 4k and 32k keys (``benchmarks/results/kernels-h200-variants.json``): the product
    in the dot everywhere (0.950-1.005x the time of the separate add); on top of it, the
    scale in the FMA except on 128-row tiles of head dim 128 (Llama-3-8B trees of 64
    nodes: 1.015-1.031x the time there, 0.977-1.001x on the other tree cases,
    0.996-1.004x on decode)."""
    return KernelVariant(acc_in_dot=True, fma_scale=not (tile.block_m >= 128 and head_dim >= 128))


def estimate_programs_per_sm(tile: TileConfig, head_dim: int, elt: int,
                             smem_bytes: int = 227 * 1024, regs: int = 65536) -> int:
    """Rough resident programs per SM of a launch shape (H100/H200 limits).

    Shared memory: ``num_stages`` buffers of a K and a V tile (the pipeliner's
    copies). Registers: the fp32 accumulator and score tile (and the broadcast
    product of the FMA path) over the program's threads, plus ~40 a thread.
    Threads: at most 64 warps an SM.
    """
    cols = triton.next_power_of_2(tile.head_pack * head_dim)
    threads = 32 * tile.num_warps
    smem = max(1, tile.num_stages) * 2 * tile.block_n * cols * elt + tile.block_m * cols * elt
    per_thread = 40 + (tile.block_m * cols + 2 * tile.block_m * tile.block_n + 2 * tile.block_n * cols) // threads
    if not tile.use_dot:
        per_thread += tile.block_m * tile.block_n * cols // threads
    per_thread = min(per_thread, 255)
    return max(1, min(smem_bytes // smem, regs // (per_thread * threads), 64 // tile.num_warps, 32))


SPLIT_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def choose_num_splits(
    num_programs: int,
    max_seq_len: int,
    num_sms: int,
    block_n: int,
    *,
    kv_bytes: int,
    partial_bytes: int,
    flops: float = 0.0,
    saturation: float = 2.0,
    bandwidth: float = 4.0e12,
    flop_rate: float = 4.0e14,
    merge_s: float = 2.0e-6,
    wave_s: float = 1.0e-6,
    choices: Sequence[int] = SPLIT_CHOICES,
) -> int:
    """Key splits (flash-decoding) for a launch of ``num_programs`` programs: the split
    count of ``choices`` with the least modelled time.

    The model, fitted to every split count of the 54 benchmark cases on the H200
    (``benchmarks/results/kernels-h200-splits.json``: 3% above the best split count on
    average, against 20% for the occupancy model it replaces):

    * the work is the K/V read (``kv_bytes`` at ``bandwidth``) or, when longer, the
      matmuls (``flops`` at ``flop_rate``): trees with many query rows per kv head
      are compute-bound;
    * an SM runs at full rate with ``saturation`` programs, so ``n`` programs use
      ``n / (num_sms * saturation)`` of the machine, and past that they run in
      whole waves (the last one partly idle), each costing ``wave_s`` more;
    * every split writes and re-reads fp32 partial outputs (``partial_bytes``) and
      needs the merge launch (``merge_s``). Each split gets at least one key tile.
    """
    num_programs = max(num_programs, 1)
    work_s = max(kv_bytes / bandwidth, flops / flop_rate)
    full = max(1.0, num_sms * saturation)
    best, best_cost = 1, math.inf
    for s in choices:
        if s > max(1, -(-max_seq_len // block_n)):
            break
        n = num_programs * s
        waves = math.ceil(n / full)
        t = work_s * max(1.0, waves * full / n) + waves * wave_s
        if s > 1:
            t += 2 * s * partial_bytes / bandwidth + merge_s
        if t < best_cost:
            best, best_cost = s, t
    return best


# float32 trees of up to 64 rows over at most this many keys take 16 x 16 tiles: faster at
# 272 and 528 keys, 32 x 32 faster from 1040 (kernels-h200-fp32-tiles-*.json).
FP32_SHORT_PREFIX = 768
SHORT_PREFIX = 1024  # keys; at or below, the tiles of kernels-h200-tiles.json's short cases


def plan_num_splits(tile: TileConfig, num_seqs: int, total_q: int, num_heads: int, num_kv_heads: int,
                    head_dim: int, max_query_len: int, max_seq_len: int, elt: int, num_sms: int,
                    **model: float) -> int:
    """The split count ``tree_attention`` picks for ``tile`` when the caller gives none
    (``model``: overrides of ``choose_num_splits``' constants). A tile's
    ``programs_per_sm`` overrides the model's saturation (benchmark sweeps).

    Tiles of 128 rows split prefixes longer than ``SHORT_PREFIX`` at least in 2: their
    single-split variant (which normalises and stores in the kernel) ran 1.17-1.45x
    slower than 2 splits in all four B=64 tree-64 cases of
    ``kernels-h200-splits-trees.json``, where the model, seeing enough programs already,
    would not split (at 512 keys one split was fastest: ``kernels-h200-splits.json``)."""
    group = num_heads // num_kv_heads
    q_blocks = -(-max_query_len // (tile.block_m // (tile.head_pack * group)))
    if tile.programs_per_sm:
        model.setdefault("saturation", tile.programs_per_sm)
    if tile.block_m >= 128 and tile.use_dot and max_seq_len > SHORT_PREFIX:
        model.setdefault("choices", tuple(s for s in SPLIT_CHOICES if s >= 2))
    # Tensor-core rate for half precision; fp32 runs exact (IEEE) dots, about 8x slower.
    model.setdefault("flop_rate", 4.0e14 if elt <= 2 else 5.0e13)
    return choose_num_splits(
        q_blocks * num_seqs * (num_kv_heads // tile.head_pack), max_seq_len, num_sms, tile.block_n,
        kv_bytes=2 * num_seqs * max_seq_len * num_kv_heads * head_dim * elt,
        partial_bytes=total_q * num_heads * (head_dim + 2) * 4,
        flops=4.0 * total_q * num_heads * max_seq_len * head_dim,
        **model,
    )


def default_tile_config(max_query_len: int, group: int, head_dim: int, dtype: torch.dtype,
                        num_seqs: int = 1, num_kv_heads: int = 1, max_seq_len: int | None = None,
                        num_sms: int = 132) -> TileConfig:
    """Launch shape for a step, from H200 measurements.

    The rows of a tile are tokens x heads of one kv group (16 is tl.dot's minimum);
    more rows re-read each K/V tile less often, until the fp32 accumulator crowds the
    registers. Every half-precision tile reads the block table once per key: reading it
    once per cache block (``table_per_block``) reshapes the key offsets, and Triton then
    loads K/V into registers without ``cp.async`` pipelining (no ``cp.async`` in the
    PTX, 255 registers and spills: ``benchmarks/results/kernels-h200-probe.json``).

    * decode (16 rows): 128-key tiles (the class sweep, ``kernels-h200-configs.json``);
      with at least two programs per SM before any split (Llama-3-8B at B=64), 64-key
      tiles on 2 warps (``kernels-h200-tiles.json``: 0.81-0.99x the 128-key tile);
    * trees up to 64 rows (about 16 nodes): 64 rows x 64 keys, 2 stages (head dim 128)
      or x 128 keys, 3 stages (64): within 1% of the probe's fastest tile in its 6 tree-16
      cases, 0.51-0.86x the time of the per-block-table tile the class sweep had chosen;
    * bigger trees: 128 rows x 64 keys, 2 stages (head dim 128; 0.81-0.84x the 64-row
      tile in the probe's 3 Llama tree-64 cases), or 128 x 64, 3 stages (64);
    * prefixes of at most ``SHORT_PREFIX`` keys: decode with fewer programs than SMs
      on 32-key tiles (more key tiles to split: B=1, 512 keys, 6.8 vs 8.9 us), trees
      on 64 rows x 64 keys with 3 stages (0.71-1.05x; ``kernels-h200-tiles.json``).

    ``num_seqs``, ``num_kv_heads``, ``max_seq_len`` and ``num_sms`` describe the launch.
    The split count is a separate model (``choose_num_splits``).
    """
    wide = head_dim > 64
    if dtype == torch.float32:
        # IEEE fp32 dots run on the CUDA cores, where registers set the speed: the
        # 128 x 64 tile this rule gave a 79-node tree took 1078 us (SmolLM2, B=1, 512
        # keys) against 28 us on the 32 x 32 tile below, 21 on the fastest of 54
        # (kernels-h200-fp32-tiles-1.json; -2 and -3: Llama-3-8B shapes, 256-2048 keys).
        # Decode, and trees of up to 64 rows over short prefixes: 16 x 16 tiles (7.5 us
        # against 12.2; a 16-node tree 9.8 against 37.7); other trees 32 x 32 (the
        # fastest or within 33% of it in every case swept).
        block_m = triton.next_power_of_2(group)
        rows = max_query_len * group
        short = max_seq_len is not None and max_seq_len <= FP32_SHORT_PREFIX
        if rows <= 16 or (rows <= 64 and short):
            return TileConfig(max(16, block_m), 16, num_warps=4, num_stages=2)
        return TileConfig(max(32, block_m), 32, num_warps=4, num_stages=2)
    block_m = max(16, min(128, triton.next_power_of_2(max_query_len * group)),
                  triton.next_power_of_2(group))
    short = max_seq_len is not None and max_seq_len <= SHORT_PREFIX
    if block_m <= 16:
        programs = num_seqs * num_kv_heads
        if programs >= 2 * num_sms:
            return TileConfig(block_m, 64, num_warps=2, num_stages=2)
        return TileConfig(block_m, 32 if short and programs < num_sms else 128, num_warps=4,
                          num_stages=2)
    if short:
        return TileConfig(min(block_m, 64), 64, num_warps=4, num_stages=3)
    if block_m <= 64:
        return TileConfig(block_m, 64, 4, 2) if wide else TileConfig(block_m, 128, 4, 3)
    return TileConfig(block_m, 64, num_warps=4, num_stages=2 if wide else 3)


def tree_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    max_query_len: int,
    max_seq_len: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    tile: TileConfig | None = None,
    variant: KernelVariant | None = None,
) -> torch.Tensor:
    """Attention of packed tree queries over paged prefixes plus their own tree.

    Shapes: ``query`` ``[total_q, num_heads, head_dim]``; pools ``[num_blocks,
    block_size, num_kv_heads, head_dim]``; ``block_tables`` ``[num_seqs,
    max_blocks]`` int32; ``cu_seqlens_q`` ``[num_seqs + 1]`` int32; ``seq_lens``
    ``[num_seqs]`` int32 (prefix + query rows, all already in the cache);
    ``tree_mask`` ``[total_q, num_words]`` int32 ancestor-or-self bits, or None for
    causal. ``max_query_len``/``max_seq_len`` are host-side upper bounds that size
    the grid (static under CUDA graphs); ``tile`` overrides the launch shape and
    kernel variant (benchmark sweeps), ``variant`` the key loop's code
    (``KernelVariant``). Returns ``[total_q, num_heads, head_dim]``.
    """
    assert query.dim() == 3 and key_cache.dim() == 4 and key_cache.shape == value_cache.shape
    total_q, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, kv_head_dim = key_cache.shape
    assert kv_head_dim == head_dim, (key_cache.shape, query.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query.dtype == key_cache.dtype == value_cache.dtype, (query.dtype, key_cache.dtype)
    assert query.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    num_seqs = seq_lens.shape[0]
    assert cu_seqlens_q.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert cu_seqlens_q.dtype == torch.int32 and seq_lens.dtype == torch.int32
    if tree_mask is not None:
        assert tree_mask.dtype == torch.int32 and tree_mask.dim() == 2
        assert tree_mask.shape[0] == total_q and tree_mask.shape[1] * 32 >= max_query_len
        assert tree_mask.stride(1) == 1
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.stride(-1) == 1
    if total_q == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if scale <= 0:
        raise ValueError(f"tree_attention: scale must be positive, got {scale}")

    tile = tile or default_tile_config(max_query_len, group, head_dim, query.dtype, num_seqs, num_kv_heads,
                                       max_seq_len, device_num_sms(query.device))
    variant = variant or default_variant(tile, head_dim)
    pack = tile.head_pack
    assert pack >= 1 and num_kv_heads % pack == 0, (pack, num_kv_heads)
    rows_per_tok = pack * group
    block_m, block_n = tile.block_m, tile.block_n
    assert block_m >= rows_per_tok, (block_m, rows_per_tok)
    if tile.use_dot:
        assert block_m >= 16 and block_n >= 16, tile
    block_q = block_m // rows_per_tok
    block_d = triton.next_power_of_2(pack * head_dim)
    q_blocks = triton.cdiv(max_query_len, block_q)
    if num_splits is None:
        num_splits = plan_num_splits(tile, num_seqs, total_q, num_heads, num_kv_heads, head_dim,
                                     max_query_len, max_seq_len, query.element_size(),
                                     device_num_sms(query.device))
    if num_splits > 1:
        part_out = torch.empty((num_splits, total_q, num_heads, head_dim), dtype=torch.float32,
                               device=query.device)
        part_ml = torch.empty((num_splits, total_q, num_heads, 2), dtype=torch.float32,
                              device=query.device)
    else:
        part_out = part_ml = out  # unused: the kernel's single-split branch never touches them
    mask_arg = tree_mask if tree_mask is not None else cu_seqlens_q
    stride_mask = tree_mask.stride(0) if tree_mask is not None else 0
    # Triton's interpreter multiplies bf16 as raw uint16 in tl.dot. A bf16 x bf16
    # product is exact in fp32, so an fp32 dot of the upcast operands computes
    # what the tensor cores do; only the interpreter takes this path.
    upcast_bf16 = query.dtype == torch.bfloat16 and _interpreting()
    table_per_block = (tile.table_per_block and block_n % block_size == 0
                       and block_size & (block_size - 1) == 0)
    grid = (q_blocks, num_seqs * (num_kv_heads // pack), num_splits)
    _tree_attention_kernel[grid](
        query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens,
        mask_arg, out, part_out, part_ml,
        scale * _LOG2E, num_splits,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), stride_mask,
        out.stride(0), out.stride(1),
        *(part_out.stride()[:3] if num_splits > 1 else (0, 0, 0)),
        *(part_ml.stride()[:3] if num_splits > 1 else (0, 0, 0)),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        HEAD_PACK=pack, HEAD_GROUPS=num_kv_heads // pack, ROWS_PER_TOK=rows_per_tok,
        EVEN_D=block_d == pack * head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        SPLIT=num_splits > 1, IS_CAUSAL=tree_mask is None,
        IEEE_DOT=query.dtype == torch.float32 or upcast_bf16,
        UPCAST_BF16=upcast_bf16, USE_DOT=tile.use_dot, TABLE_PER_BLOCK=table_per_block,
        ACC_IN_DOT=variant.acc_in_dot, FMA_SCALE=variant.fma_scale,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(total_q, num_heads)](
            part_out, part_ml, out, num_splits,
            *part_out.stride()[:3], *part_ml.stride()[:3],
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_S=triton.next_power_of_2(num_splits),
        )
    return out


# --- tree masks ---------------------------------------------------------------


def tree_mask_from_parents(parents: torch.Tensor, cu_seqlens_q: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self bitmask ``[total_q, ceil(max_q / 32)]`` int32 from parent indices.

    ``parents[row]`` is the parent's index *within the row's sequence* (``-1`` for
    the root) and must be smaller than the row's own index (topological order).
    Runs on the tensors' device, ``max depth`` vectorised steps.
    """
    device = parents.device
    cu = cu_seqlens_q.to(device=device, dtype=torch.long)
    total_q = parents.shape[0]
    lens = cu[1:] - cu[:-1]
    max_q = int(lens.max()) if lens.numel() else 0
    num_words = max(1, -(-max_q // 32))
    seq_of_row = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)
    start = cu[:-1][seq_of_row]
    local = torch.arange(total_q, device=device) - start
    parents = parents.to(torch.long)
    if bool(((parents >= local) | (parents < -1)).any()):
        raise ValueError("tree rows must be in topological order: parent index < own index")
    visible = torch.zeros((total_q, num_words * 32), dtype=torch.bool, device=device)
    rows = torch.arange(total_q, device=device)
    cur = local.clone()
    while bool((cur >= 0).any()):
        alive = cur >= 0
        visible[rows[alive], cur[alive]] = True
        cur = torch.where(alive, parents[(start + cur).clamp(min=0)], cur)
    return pack_visibility(visible)


def pack_visibility(visible: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows, num_words * 32]`` visibility -> the kernel's int32 ``[rows, num_words]``
    bitmask (bit ``j % 32`` of word ``j // 32`` is column ``j``)."""
    rows, cols = visible.shape
    assert cols % 32 == 0, cols
    bits = visible.view(rows, cols // 32, 32).to(torch.long) << torch.arange(32, device=visible.device)
    words = bits.sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def tree_mask_from_template(parents: Sequence[int], num_seqs: int) -> torch.Tensor:
    """The bitmask of ``num_seqs`` sequences that share one tree (a TR-Jacobi template)."""
    t = len(parents)
    cu = torch.arange(0, (num_seqs + 1) * t, t, dtype=torch.int32)
    return tree_mask_from_parents(torch.tensor(list(parents) * num_seqs), cu)


def tree_mask_to_dense(tree_mask: torch.Tensor, cu_seqlens_q: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence, the ``[q_len, q_len]`` bool visibility among its query rows."""
    dense = []
    bits = torch.arange(32, device=tree_mask.device)
    unpacked = ((tree_mask.to(torch.long)[..., None] >> bits) & 1).bool().flatten(1)
    for b in range(cu_seqlens_q.numel() - 1):
        lo, hi = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        dense.append(unpacked[lo:hi, : hi - lo])
    return dense


# --- reference -----------------------------------------------------------------


def gather_paged_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first ``seq_len`` rows ``[seq_len, num_kv_heads, head_dim]`` of one sequence."""
    block_size = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    blocks = block_table.long()[pos // block_size]
    return cache[blocks, pos % block_size]


def tree_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch ``tree_attention`` (fp32 math, one sequence at a time)."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(query)
    dense = tree_mask_to_dense(tree_mask, cu_seqlens_q) if tree_mask is not None else None
    for b in range(seq_lens.numel()):
        lo, hi = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        q_len, seq_len = hi - lo, int(seq_lens[b])
        if q_len == 0:
            continue
        prefix_len = seq_len - q_len
        k = gather_paged_kv(key_cache, block_tables[b], seq_len).float()
        v = gather_paged_kv(value_cache, block_tables[b], seq_len).float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        visible = torch.ones((q_len, seq_len), dtype=torch.bool, device=query.device)
        if dense is not None:
            visible[:, prefix_len:] = dense[b]
        else:
            visible[:, prefix_len:] = torch.ones(
                q_len, q_len, dtype=torch.bool, device=query.device
            ).tril()
        q = query[lo:hi].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.softmax(-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
