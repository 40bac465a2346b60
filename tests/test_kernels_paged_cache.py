"""Block allocator and paged KV cache bookkeeping (no kernels involved)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kernels.paged_cache import BlockAllocator, OutOfBlocks, PagedKVCache

NUM_BLOCKS = 12


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / fork / free sequences against a model of who owns what."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS)
        self.owners: list[list[int]] = []  # each entry: the blocks one owner references

    @rule(n=st.integers(0, NUM_BLOCKS + 2))
    def allocate(self, n: int) -> None:
        free_before = self.alloc.num_free_blocks
        if n > free_before:
            with pytest.raises(OutOfBlocks):
                self.alloc.allocate(n)
            assert self.alloc.num_free_blocks == free_before  # all or nothing
            return
        blocks = self.alloc.allocate(n)
        assert len(set(blocks)) == n
        held = {b for owner in self.owners for b in owner}
        assert not held & set(blocks), "a block was handed out twice"
        self.owners.append(blocks)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def fork(self, data) -> None:
        owner = data.draw(st.sampled_from(self.owners))
        self.alloc.fork(owner)
        self.owners.append(list(owner))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data) -> None:
        i = data.draw(st.integers(0, len(self.owners) - 1))
        self.alloc.free(self.owners.pop(i))

    @invariant()
    def counts_match_owners(self) -> None:
        expected = [0] * NUM_BLOCKS
        for owner in self.owners:
            for b in owner:
                expected[b] += 1
        assert [self.alloc.ref_count(b) for b in range(NUM_BLOCKS)] == expected
        assert self.alloc.num_free_blocks == expected.count(0)

    def teardown(self) -> None:
        # Whatever happened, once every owner lets go the whole pool is reusable.
        for owner in self.owners:
            self.alloc.free(owner)
        assert sorted(self.alloc.allocate(NUM_BLOCKS)) == list(range(NUM_BLOCKS))


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_double_free_and_fork_of_free_block_are_errors() -> None:
    alloc = BlockAllocator(2)
    (b,) = alloc.allocate(1)
    alloc.free([b])
    with pytest.raises(ValueError):
        alloc.free([b])
    with pytest.raises(ValueError):
        alloc.fork([b])


@settings(max_examples=40, deadline=None)
@given(
    block_size=st.integers(1, 6),
    growth=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 9)), min_size=1, max_size=12),
)
def test_slot_mapping_follows_block_tables(block_size, growth) -> None:
    # room for the worst case (12 appends of 9 tokens, 1-token blocks, 3 sequences):
    # running out of blocks is test_out_of_blocks_is_atomic_and_truncate_frees's subject
    cache = PagedKVCache(1, 12 * 9 + 3, block_size, num_kv_heads=1, head_dim=2,
                         dtype=torch.float32)
    slots: dict[int, list[int]] = {}
    for seq, n in growth:  # interleaved growth scatters each sequence over the pool
        if seq not in cache.sequences:
            cache.add_sequence(seq)
            slots[seq] = []
        slots[seq] += cache.append_slots(seq, n).tolist()
    all_slots = [s for v in slots.values() for s in v]
    assert len(all_slots) == len(set(all_slots)), "two tokens share a slot"
    for seq, got in slots.items():
        table = cache.sequences[seq].block_table
        assert got == [table[t // block_size] * block_size + t % block_size for t in range(len(got))]
        assert len(table) == -(-len(got) // block_size)


def test_out_of_blocks_is_atomic_and_truncate_frees() -> None:
    cache = PagedKVCache(2, 4, 4, num_kv_heads=1, head_dim=2, dtype=torch.float16)
    cache.add_sequence("a")
    cache.append_slots("a", 10)  # 3 blocks
    with pytest.raises(OutOfBlocks) as err:
        cache.append_slots("a", 7)  # needs 2 more, 1 free
    assert err.value.requested == 2 and err.value.free == 1
    assert cache.sequences["a"].num_tokens == 10 and len(cache.sequences["a"].block_table) == 3
    cache.truncate("a", 5)
    assert len(cache.sequences["a"].block_table) == 2 and cache.allocator.num_free_blocks == 2
    cache.append_slots("a", 11)
    cache.free_sequence("a")
    assert cache.allocator.num_free_blocks == 4


def test_fork_shares_blocks_until_both_are_freed() -> None:
    cache = PagedKVCache(1, 3, 2, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    cache.add_sequence(0)
    cache.append_slots(0, 3)
    cache.fork_sequence(0, 1)
    assert cache.block_tables([0]).tolist() == cache.block_tables([1]).tolist()
    cache.free_sequence(0)
    assert cache.allocator.num_free_blocks == 1
    cache.free_sequence(1)
    assert cache.allocator.num_free_blocks == 3


def test_pool_layout_is_vllm_per_layer() -> None:
    cache = PagedKVCache(3, 5, 16, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    assert cache.key_cache[1].shape == (5, 16, 2, 8) and cache.key_cache[1].is_contiguous()
    cache.add_sequence(7)
    cache.append_slots(7, 20)
    tables = cache.block_tables([7], max_blocks=4)
    assert tables.dtype == torch.int32 and tables.shape == (1, 4)
    assert cache.seq_lens([7]).tolist() == [20]
