"""KV write and KV compaction kernels vs their PyTorch references."""

import pytest
import torch

from kernels.kv_compact import compaction_slots, kv_compact, kv_compact_reference
from kernels.kv_write import kv_write, kv_write_reference
from kernels.paged_cache import PagedKVCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def filled_cache(num_layers, num_kv_heads, head_dim, dtype, block_size=4, num_blocks=24, seed=0):
    cache = PagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, DEVICE)
    gen = torch.Generator().manual_seed(seed)
    cache.key_cache.copy_(torch.randn(cache.key_cache.shape, generator=gen).to(dtype))
    cache.value_cache.copy_(torch.randn(cache.value_cache.shape, generator=gen).to(dtype))
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(3, 64), (1, 128)])
def test_kv_write_matches_reference(dtype, num_kv_heads, head_dim):
    cache = filled_cache(1, num_kv_heads, head_dim, dtype)
    expected = (cache.key_cache.clone(), cache.value_cache.clone())
    for seq, n in [(0, 5), (1, 1), (0, 3), (2, 9)]:  # interleaved: scattered blocks
        if seq not in cache.sequences:
            cache.add_sequence(seq)
        cache.append_slots(seq, n)
    slots = torch.cat([cache.slot_mapping(s, 0, cache.sequences[s].num_tokens) for s in (0, 1, 2)])
    slots[3] = -1  # padding token: must not be written anywhere
    gen = torch.Generator().manual_seed(1)
    key = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    # A strided view (as a fused QKV projection would give) must work too.
    value = torch.randn(len(slots), num_kv_heads, 2 * head_dim, generator=gen).to(dtype)
    value = value.to(DEVICE)[..., :head_dim]
    kv_write(key, value, cache.key_cache[0], cache.value_cache[0], slots)
    kv_write_reference(key, value, expected[0][0], expected[1][0], slots)
    assert torch.equal(cache.key_cache, expected[0])
    assert torch.equal(cache.value_cache, expected[1])


def run_compaction(cache, prefix_lens, accepted):
    seqs = list(range(len(prefix_lens)))
    tables = cache.block_tables(seqs)
    src, dst = compaction_slots(
        tables, torch.tensor(prefix_lens, device=DEVICE),
        torch.tensor(accepted, device=DEVICE), cache.block_size,
    )
    expected = (cache.key_cache.clone(), cache.value_cache.clone())
    kv_compact(cache.key_cache, cache.value_cache, src, dst)
    kv_compact_reference(expected[0], expected[1], src, dst)
    assert torch.equal(cache.key_cache, expected[0])
    assert torch.equal(cache.value_cache, expected[1])
    return tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_compact_many_sequences_all_layers(dtype):
    cache = filled_cache(num_layers=3, num_kv_heads=2, head_dim=64, dtype=dtype, block_size=2)
    prefix_lens = [3, 0, 5, 2]
    tree_lens = [9, 6, 1, 8]
    for b, (p, t) in enumerate(zip(prefix_lens, tree_lens)):
        cache.add_sequence(b)
        cache.append_slots(b, p + t)
    original = cache.key_cache.clone()
    # Paths (node index per depth, -1 padded): the tree is deeper than a block,
    # consecutive moves chain (row 2 -> 1 while row 3 -> 2), one sequence accepts
    # nothing, one accepts a path already in place.
    accepted = [[2, 3, 7, -1], [-1, -1, -1, -1], [-1, -1, -1, -1], [1, 2, 5, 7]]
    tables = run_compaction(cache, prefix_lens, accepted)
    for b, path in enumerate(accepted):
        for depth, node in enumerate(path, start=1):
            if node < 0:
                continue
            pos_src, pos_dst = prefix_lens[b] + node, prefix_lens[b] + depth
            blk = tables[b].long()
            src_row = original[:, blk[pos_src // 2], pos_src % 2]
            assert torch.equal(cache.key_cache[:, blk[pos_dst // 2], pos_dst % 2], src_row)


def test_kv_compact_single_layer_view_and_bfs_check():
    cache = filled_cache(num_layers=1, num_kv_heads=1, head_dim=128, dtype=torch.float16)
    cache.add_sequence(0)
    cache.append_slots(0, 12)
    src, dst = compaction_slots(cache.block_tables([0]), torch.tensor([4], device=DEVICE),
                                torch.tensor([[3, 5]], device=DEVICE), cache.block_size)
    expected = (cache.key_cache[0].clone(), cache.value_cache[0].clone())
    kv_compact(cache.key_cache[0], cache.value_cache[0], src, dst)
    kv_compact_reference(expected[0], expected[1], src, dst)
    assert torch.equal(cache.key_cache[0], expected[0])
    with pytest.raises(ValueError):
        compaction_slots(cache.block_tables([0]), torch.tensor([4], device=DEVICE),
                         torch.tensor([[1, 1]], device=DEVICE), cache.block_size)
