"""The reference runner on CUDA: graph-captured steps stay exact in float32."""

import pytest
import torch

from proposers.reference.runner import GenerationConfig, ReferenceRunner
from tests.conftest import dev_questions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def gpu_runner(base_model_path):
    return ReferenceRunner.load(base_model_path, device="cuda", dtype="float32")


def test_cuda_graph_steps_are_exact_in_float32(gpu_runner):
    assert gpu_runner.use_cuda_graphs
    prompts = [gpu_runner.encode_chat(q["turns"][0]) for q in dev_questions(1)]
    for prompt in prompts:
        ref = gpu_runner.generate(prompt, GenerationConfig(method="ar", max_new_tokens=48))
        for method in ("jacobi", "tr-jacobi", "pld"):
            out = gpu_runner.generate(prompt, GenerationConfig(method=method, max_new_tokens=48))
            assert out.token_ids == ref.token_ids, method


def test_graph_and_eager_paths_agree(gpu_runner, base_model_path):
    eager = ReferenceRunner.load(base_model_path, device="cuda", dtype="float32",
                                 use_cuda_graphs=False)
    prompt = gpu_runner.encode_chat("Explain what a hash map is.")
    cfg = GenerationConfig(method="tr-jacobi", max_new_tokens=40)
    assert gpu_runner.generate(prompt, cfg).token_ids == eager.generate(prompt, cfg).token_ids


def test_paged_kernel_graphs_across_prefix_buckets_are_exact(base_model_path):
    """Our kernels under CUDA graphs, one graph per (step size, prefix bucket): a prompt
    that crosses the 512-key bucket while decoding gives plain greedy's tokens."""
    paged = ReferenceRunner.load(base_model_path, device="cuda", dtype="float32",
                                 attn_backend="paged-triton")
    text = " ".join(q["turns"][0] for q in dev_questions(4))
    prompt = paged.encode_chat(text)[:480]
    ar = paged.generate(prompt, GenerationConfig(method="ar", max_new_tokens=64, ignore_eos=True))
    tr = paged.generate(prompt, GenerationConfig(method="tr-jacobi", max_new_tokens=64,
                                                 ignore_eos=True))
    assert tr.token_ids == ar.token_ids
    assert {bound for _, bound in paged._graphs} >= {512, 1024}


def test_compiled_graph_steps_on_our_kernels_are_exact_in_float32(base_model_path):
    """torch.compile'd steps over the paged kernels, captured with the staged inputs and
    in-graph compaction: every method gives plain greedy's tokens."""
    runner = ReferenceRunner.load(base_model_path, device="cuda", dtype="float32",
                                  attn_backend="paged-triton", compile_steps=True)
    prompt = runner.encode_chat(dev_questions(1)[0]["turns"][0])
    ref = runner.generate(prompt, GenerationConfig(method="ar", max_new_tokens=48))
    for method in ("jacobi", "tr-jacobi", "pld"):
        out = runner.generate(prompt, GenerationConfig(method=method, max_new_tokens=48))
        assert out.token_ids == ref.token_ids, method
