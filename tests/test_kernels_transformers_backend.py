"""The reference runner on our paged cache + kernels decodes exactly like on SDPA.

A tiny random Llama (2 layers, GQA 3, float32) keeps the Triton interpreter fast on
CPU; random models repeat themselves quickly, so retrieval drafts get accepted and
the KV compaction path runs on most steps.
"""

import copy

import pytest
import torch

from kernels.transformers_backend import PagedTreeCache
from proposers.reference.runner import ReferenceRunner
from tests.conftest import tiny_llama

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(base_model_path):
    return tiny_llama(base_model_path, DEVICE)


@pytest.mark.parametrize("backend", ["paged-triton", "paged-torch"])
def test_tr_jacobi_on_paged_kernels_equals_sdpa_greedy(tiny_model_and_tokenizer, backend):
    from proposers.reference.runner import GenerationConfig

    model, tok = tiny_model_and_tokenizer
    plain = ReferenceRunner(model, tok, DEVICE, use_cuda_graphs=False)
    paged = ReferenceRunner(copy.deepcopy(model), tok, DEVICE, attn_backend=backend,
                                 use_cuda_graphs=False)
    prompt = plain.encode("The quick brown fox jumps over the lazy dog. The quick brown")
    ar = plain.generate(prompt, GenerationConfig(method="ar", max_new_tokens=16, ignore_eos=True))
    # The interpreter is slow: one method through the Triton kernels, both through the references.
    methods = [("tr-jacobi", "tree-16")] + ([("pld", None)] if backend == "paged-torch" else [])
    for method, template in methods:
        cfg = GenerationConfig(method=method, template=template, max_new_tokens=16, ignore_eos=True)
        ours = paged.generate(prompt, cfg)
        assert ours.token_ids == ar.token_ids, f"{backend} {method} diverged from plain greedy"
        assert ours.num_steps < len(ours.token_ids), "no draft was ever accepted: compaction untested"


@pytest.mark.parametrize("graph_steps", [False, True])
def test_paged_runner_is_exact_on_a_shuffled_block_table(tiny_model_and_tokenizer, monkeypatch,
                                                          graph_steps):
    """The cache maps positions to pool slots once (`_slot_of`) for KV writes and for
    both compactions; a fresh pool hands blocks out in order, which would hide a mapping
    that ignores the table. Here the sequence owns the same blocks in shuffled order:
    still plain greedy, eager steps and the staged graph-step body (run uncaptured on
    CPU) alike."""
    from kernels.paged_cache import PagedKVCache
    from proposers.reference.runner import GenerationConfig

    real = PagedKVCache.block_tables

    def shuffled(self, seq_ids):
        table = real(self, seq_ids)
        order = torch.randperm(table.shape[1], generator=torch.Generator().manual_seed(0))
        return table[:, order.to(table.device)].contiguous()

    model, tok = tiny_model_and_tokenizer
    plain = ReferenceRunner(model, tok, DEVICE, use_cuda_graphs=False)
    monkeypatch.setattr(PagedKVCache, "block_tables", shuffled)
    paged = ReferenceRunner(copy.deepcopy(model), tok, DEVICE, attn_backend="paged-torch",
                            use_cuda_graphs=graph_steps and DEVICE.type == "cpu")
    prompt = plain.encode("The quick brown fox jumps over the lazy dog. The quick brown")
    ar = plain.generate(prompt, GenerationConfig(method="ar", max_new_tokens=16, ignore_eos=True))
    cfg = GenerationConfig(method="tr-jacobi", template="tree-16", max_new_tokens=16,
                           ignore_eos=True)
    ours = paged.generate(prompt, cfg)
    cache = paged._graph_cache if paged.use_cuda_graphs else None
    if cache is not None:
        assert not torch.equal(cache.block_table[0].sort().values, cache.block_table[0])
    assert ours.token_ids == ar.token_ids
    assert ours.num_steps < len(ours.token_ids), "no draft was ever accepted: compaction untested"


def test_cache_packs_the_runner_mask_into_the_tree_bitmask():
    cache = PagedTreeCache(1, 1, 16, capacity=40, dtype=torch.float32, device=DEVICE,
                           use_triton=False, block_size=4)
    prefix, q = 9, 5
    ancestors = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                              [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    mask = torch.ones(q, prefix + q, dtype=torch.bool)
    mask[:, prefix:] = ancestors
    cache.slots = prefix + torch.arange(q, device=DEVICE)
    cache.kv_len = prefix + q
    meta = cache.step_meta(mask[None, None].to(DEVICE))
    bits = meta.tree_mask[:, 0].long().cpu()
    unpacked = ((bits[:, None] >> torch.arange(q)) & 1).bool()
    assert torch.equal(unpacked, ancestors)
    assert meta.seq_lens.tolist() == [prefix + q] and not meta.prefill
    # The block table maps logical positions to the pool's slots, block by block.
    table = cache.block_table[0].long().cpu()
    pos = torch.tensor([0, 5, 13])
    assert cache.physical_slots(pos).cpu().tolist() == (table[pos // 4] * 4 + pos % 4).tolist()


def test_graph_buckets_bound_the_kernel_launch_by_prefix(tiny_model_and_tokenizer):
    """CUDA graphs on the paged kernels are keyed by a power-of-two key bound, which the
    cache hands the kernel as its max_seq_len instead of the whole capacity."""
    from proposers.reference.cache import StaticKVCache

    model, tok = tiny_model_and_tokenizer
    runner = ReferenceRunner(copy.deepcopy(model), tok, DEVICE, attn_backend="paged-torch",
                             use_cuda_graphs=False)
    cache = PagedTreeCache(1, 1, 16, capacity=3000, dtype=torch.float32, device=DEVICE,
                           use_triton=False)
    assert [runner._key_bound(n, cache) for n in (1, 512, 513, 2048, 2049)] == \
        [512, 512, 1024, 2048, 3000]
    static = StaticKVCache.for_model(model.config, 64, torch.float32, DEVICE)
    assert runner._key_bound(40, static) == 0  # SDPA reads the whole static cache anyway
    cache.slots = torch.arange(2990, 2995, device=DEVICE)
    cache.kv_len = None
    assert cache.step_meta(None).max_seq_len == 3000
    cache.key_bound, cache._meta = 1024, None
    assert cache.step_meta(None).max_seq_len == 1024
    cache.kv_len, cache._meta = 700, None  # an eager step knows its exact length
    assert cache.step_meta(None).max_seq_len == 700


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_attention_step_replays_in_a_cuda_graph():
    """The runner captures whole steps: the backend must do no host work that a replay skips."""
    from types import SimpleNamespace

    from kernels.transformers_backend import paged_tree_attention_forward

    dev, dtype, q, capacity = torch.device("cuda"), torch.bfloat16, 5, 256
    cache = PagedTreeCache(1, 2, 64, capacity=capacity, dtype=dtype, device=dev)
    cache.paged.key_cache.normal_()
    cache.paged.value_cache.normal_()
    ancestors = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                              [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.bool, device=dev)
    slots = torch.zeros(q, dtype=torch.long, device=dev)
    mask = torch.zeros(q, capacity, dtype=torch.bool, device=dev)
    query = torch.empty(1, 6, q, 64, dtype=dtype, device=dev)
    key = torch.empty(1, 2, q, 64, dtype=dtype, device=dev)
    value = torch.empty(1, 2, q, 64, dtype=dtype, device=dev)
    module = SimpleNamespace(layer_idx=0)

    def set_inputs(prefix: int) -> None:
        slots.copy_(prefix + torch.arange(q, device=dev))
        col = torch.arange(capacity, device=dev)
        rel = (col - prefix).clamp(0, q - 1)
        mask.copy_((col < prefix) | (ancestors[:, rel] & (col >= prefix) & (col < prefix + q)))
        for t in (query, key, value):
            t.normal_()

    def step() -> torch.Tensor:
        cache.update(key, value, 0)
        return paged_tree_attention_forward(module, query, key, value, mask[None, None],
                                            scaling=0.125)[0]

    cache.kv_len, cache.slots = None, slots
    set_inputs(37)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for prefix in (3, 100, 200):
        set_inputs(prefix)
        graph.replay()
        replayed = out.clone()
        torch.testing.assert_close(replayed, step(), atol=0, rtol=0)


def test_twin_prefill_stores_what_a_prefill_through_the_paged_cache_stores(tiny_model_and_tokenizer):
    """The paged runner prefills through an SDPA twin into a static cache and copies the
    K/V into the pool (`write_prompt`); a prefill through the paged cache itself (the
    backend's own causal path) must leave the same rows in the same pool slots, on a
    shuffled block table, and give the same next-token logits. The twin shares the
    model's parameter tensors."""
    model, tok = tiny_model_and_tokenizer
    runner = ReferenceRunner(copy.deepcopy(model), tok, DEVICE, attn_backend="paged-torch",
                             use_cuda_graphs=False)
    twin = runner._prefill_twin
    assert all(a is b for a, b in zip(twin.parameters(), runner.model.parameters()))
    assert twin.config._attn_implementation == "sdpa"
    assert runner.model.config._attn_implementation != "sdpa"
    ids = torch.tensor(runner.encode("The quick brown fox jumps over the lazy dog."))
    n = ids.numel()
    caches, logits = [], []
    for twin_prefill in (True, False):
        cache = runner._make_cache(runner.config, n + 8, runner.dtype, DEVICE)
        order = torch.randperm(cache.block_table.shape[1], generator=torch.Generator().manual_seed(1))
        cache.block_table = cache.block_table[:, order.to(cache.block_table.device)].contiguous()
        positions = torch.arange(cache._slot_of.numel(), device=cache._slot_of.device)
        cache._slot_of = (cache.block_table[0].long()[positions // cache.block_size] * cache.block_size
                          + positions % cache.block_size)
        if twin_prefill:
            logits.append(runner._prefill(cache, ids))
        else:
            cache.slots = torch.arange(n, device=DEVICE)
            cache.kv_len = n
            mask = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
            with torch.inference_mode():
                logits.append(runner._forward(cache, ids.to(DEVICE), cache.slots, mask,
                                              logits_to_keep=1, eager=True)[-1])
        caches.append(cache)
    slots = caches[0]._slot_of[:n]
    for pool in ("key_cache", "value_cache"):
        a, b = (getattr(c.paged, pool) for c in caches)
        flat = [t.view(t.shape[0], -1, *t.shape[-2:])[:, slots] for t in (a, b)]
        torch.testing.assert_close(flat[0], flat[1])
    torch.testing.assert_close(logits[0], logits[1])
