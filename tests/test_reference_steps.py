"""The reference runner's graph-step body, compiled steps and divergence check, on CPU.

On CUDA every greedy step replays a captured graph whose only host inputs are one small
staged buffer (tokens, prefix, the previous step's accepted nodes, compacted inside the
graph). On CPU the runner can run the very same body eagerly (`use_cuda_graphs=True`),
so these tests cover it without a GPU; a tiny random Llama keeps them fast.
"""

import copy
import itertools

import pytest
import torch

from kernels.transformers_backend import PagedTreeCache
from proposers.reference.agreement import explain
from proposers.reference.cache import StaticKVCache
from proposers.reference.runner import GenerationConfig, ReferenceRunner
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over"


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(base_model_path):
    return tiny_llama(base_model_path, CPU)


def _cfg(method, template=None, n=20):
    return GenerationConfig(method=method, template=template, max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("backend", ["sdpa", "paged-torch"])
def test_staged_graph_steps_equal_eager_greedy(tiny_model_and_tokenizer, backend):
    model, tok = tiny_model_and_tokenizer
    eager = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=False,
                            attn_backend=backend)
    staged = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=True,
                             attn_backend=backend)
    prompt = eager.encode(TEXT)
    ar = eager.generate(prompt, _cfg("ar"))
    for method, template in (("ar", None), ("tr-jacobi", "tree-16"), ("pld", None), ("jacobi", None)):
        out = staged.generate(prompt, _cfg(method, template))
        assert out.token_ids == ar.token_ids, f"{backend} {method}"
        if method in ("tr-jacobi", "pld"):
            # Drafts were accepted, so rows were compacted inside the next step's body.
            assert out.num_steps < len(out.token_ids), method
    # One graph step per (step size, key bucket); pld's pruned trees share them by size.
    assert all(q <= 17 for q, _ in staged._graphs)
    # A second request on the same graph cache starts clean (no compaction left over).
    again = staged.generate(prompt, _cfg("pld"))
    assert again.token_ids == ar.token_ids
    # A sampled request runs eager steps on the same graph cache: what the graph steps
    # left there (on our paged cache, the packed tree) must not leak into them.
    sampled = GenerationConfig(method="tr-jacobi", template="tree-16", max_new_tokens=20,
                               temperature=0.8, seed=3, ignore_eos=True)
    fresh = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=True,
                            attn_backend=backend)
    assert staged.generate(prompt, sampled).token_ids == fresh.generate(prompt, sampled).token_ids


def test_compiled_steps_equal_eager_greedy(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    eager = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=False)
    compiled = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=True,
                               compile_steps=True)
    compiled.warm_up()  # what the server's reference engine runs before /ready
    assert {q for q, _ in compiled._graphs} == {1, 79}  # one-token and paper-68-r16 steps
    prompt = eager.encode(TEXT)
    ar = eager.generate(prompt, _cfg("ar", n=12))
    for method, template in (("ar", None), ("tr-jacobi", "tree-16")):
        assert compiled.generate(prompt, _cfg(method, template, n=12)).token_ids == ar.token_ids
    # Prefill and steps both go through the compiled wrapper.
    real, calls = compiled.compiled_model(), []
    assert real is not compiled.model
    compiled._compiled_model = lambda **kw: calls.append(kw["input_ids"].shape[1]) or real(**kw)
    compiled.generate(prompt, _cfg("ar", n=3))
    # The graph cache's prefill runs padded to its bucket (64 here), captured on CUDA.
    assert calls == [compiled.prefill_bucket(len(prompt) - 1), 1, 1, 1] == [64, 1, 1, 1]


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_compact_path_moves_the_accepted_rows(kind):
    torch.manual_seed(0)
    if kind == "static":
        a = StaticKVCache(2, 2, 8, capacity=40, dtype=torch.float32, device=CPU)
        a.keys.normal_(), a.values.normal_()
    else:
        a = PagedTreeCache(2, 2, 8, capacity=40, dtype=torch.float32, device=CPU,
                           use_triton=False, block_size=4)
        a.paged.key_cache.normal_(), a.paged.value_cache.normal_()
    b = copy.deepcopy(a)
    prefix, path = 9, [2, 3, 7]  # overlapping moves: row 2 -> 1, 3 -> 2, 7 -> 3
    a.compact(prefix + torch.tensor(path), prefix + 1 + torch.arange(len(path)))
    nodes = torch.full((16,), -1)
    nodes[: len(path)] = torch.tensor(path)
    b.compact_path(torch.tensor([prefix]), nodes)
    state = (lambda c: (c.keys, c.values)) if kind == "static" else (
        lambda c: (c.paged.key_cache, c.paged.value_cache))
    for x, y in zip(state(a), state(b)):
        assert torch.equal(x, y)
    # All pads: nothing moves.
    before = [t.clone() for t in state(b)]
    b.compact_path(torch.tensor([prefix]), torch.full((16,), -1))
    assert all(torch.equal(x, y) for x, y in zip(before, state(b)))


def test_divergence_check_runs_on_the_paged_backend(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    sdpa = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=False)
    paged = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=False,
                            attn_backend="paged-torch")
    prompt = sdpa.encode(TEXT)
    assert torch.allclose(sdpa.next_token_logits(prompt), paged.next_token_logits(prompt),
                          atol=1e-4)
    ar = paged.generate(prompt, _cfg("ar", n=6)).token_ids
    other = ar[:3] + [(ar[3] + 1) % len(tok)] + ar[4:]
    div = explain(paged, prompt, ar, other)
    assert div.position == 3 and div.ar_token == ar[3] and div.ar_margin >= 0
    assert explain(paged, prompt, ar, list(ar)) is None


@pytest.mark.parametrize("backend", ["sdpa", "paged-torch"])
def test_compiled_prefill_and_steps_do_not_recompile_per_prompt_length(
        tiny_model_and_tokenizer, backend):
    """What a server with `--reference-compile` relies on: after `warm_up` (which it
    runs before /ready), new prompt lengths, padded prefill lengths and prefixes reuse
    the compiled code (no compile per request)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compile from scratch here, not reuse another test's code
    model, tok = tiny_model_and_tokenizer
    runner = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=True,
                             attn_backend=backend, compile_steps=True)
    texts = ["The quick brown fox jumps over the lazy dog.", TEXT, "one two three " * 30,
             "a b c d e f g h i j k l m n o p " * 9, "x " * 200]
    before = counters["stats"]["unique_graphs"]
    runner.warm_up()
    graphs = [counters["stats"]["unique_graphs"]]
    buckets = set()
    for text in texts:
        ids = runner.encode(text)
        buckets.add(runner.prefill_bucket(len(ids) - 1))
        for method, template in (("ar", None), ("tr-jacobi", "tree-16")):
            runner.generate(ids, _cfg(method, template, n=4))
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(buckets) >= 4, buckets  # prompts of several padded prefill lengths
    assert graphs[0] > before and graphs[0] == graphs[-1], graphs  # warm_up compiled all


def test_prefill_buckets_pad_at_most_half():
    runner = object.__new__(ReferenceRunner)
    runner.graph_capacity = 4096
    sizes = [runner.prefill_bucket(n) for n in range(1, 4097)]
    assert sizes[:64] == [64] * 64 and sizes[-1] == 4096
    assert all(a <= b for a, b in itertools.pairwise(sizes))  # monotone
    assert all(n <= s <= max(64, 1.5 * n) for n, s in enumerate(sizes, 1))
    assert sorted(set(sizes)) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
                                  3072, 4096]
    runner.graph_capacity = 1000
    assert runner.prefill_bucket(900) == 1000  # capped at the graph cache
    with pytest.raises(ValueError, match="exceeds the graph cache"):
        runner.prefill_bucket(1001)


@pytest.mark.parametrize("backend", ["sdpa", "paged-torch"])
def test_padded_graph_prefill_writes_the_eager_prefills_rows(tiny_model_and_tokenizer, backend):
    """The graph cache's prefill (captured on CUDA, the same padded body here) leaves the
    prompt's K/V rows the eager prefill writes; the padding only writes rows after them."""
    model, tok = tiny_model_and_tokenizer
    runner = ReferenceRunner(copy.deepcopy(model), tok, CPU, use_cuda_graphs=True,
                             attn_backend=backend)
    prompt = torch.tensor(runner.encode(TEXT + " " + TEXT), dtype=torch.long)
    n = prompt.numel()
    assert runner.prefill_bucket(n) == 64 > n  # padded

    def rows(cache):
        if backend == "sdpa":
            return cache.keys[:, :, :, :n], cache.values[:, :, :, :n]
        slots = cache.physical_slots(torch.arange(n))
        flat = [p.view(p.shape[0], -1, *p.shape[-2:])[:, slots]
                for p in (cache.paged.key_cache, cache.paged.value_cache)]
        return tuple(flat)

    eager = runner._make_cache(runner.config, n, runner.dtype, CPU)
    runner._prefill(eager, prompt)  # not the graph cache: the eager prefill
    graph_cache = runner._cache_for(n + 8)
    assert runner._prefill(graph_cache, prompt) is None
    assert set(runner._prefill_graphs) == {64}
    for a, b in zip(rows(eager), rows(graph_cache)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # A shorter prompt next reuses the bucket; its rows are its own, not the last one's.
    short = prompt[:9]
    runner._prefill(graph_cache, short)
    fresh = runner._make_cache(runner.config, 9, runner.dtype, CPU)
    runner._prefill(fresh, short)
    n = 9
    for a, b in zip(rows(fresh), rows(graph_cache)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert set(runner._prefill_graphs) == {64}
