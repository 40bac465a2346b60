"""TR-Jacobi settings for vLLM, and the engine arguments that switch the plugin on.

Settings travel inside vLLM's own config (`additional_config["trjacobi"]`), so every
process (engine core, workers) sees the same values without extra plumbing.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from proposers.templates import load_template
from proposers.vllm.planner import (
    CLOSED_VALUE,
    CLOSED_VALUES,
    MAX_NGRAM,
    MIN_GAIN,
    PRIOR_WEIGHT,
    PROBE_SHARE,
)

PROPOSER_PATH = "proposers.vllm.TRJacobiProposer"
WORKER_PATH = "proposers.vllm.runner.TRJacobiWorker"  # vLLM-CPU
SCHEDULER_PATH = "proposers.vllm.scheduler.TRJacobiScheduler"  # reports waiting requests
GPU_WORKER_PATH = "proposers.vllm.runner.TRJacobiGPUWorker"  # CUDA (never run in an engine)
EXECUTOR_PATH = "proposers.vllm.executor.TRJacobiExecutor"  # vLLM-CPU: drafts ride the output
TREE_BACKEND_CUDA = "TRITON_ATTN"  # the backend tree_attention_gpu.py overrides
CONFIG_KEY = "trjacobi"
MODES = ("tree", "chain", "retrieval", "off")
SAMPLED_MODES = ("auto", "off", "chain", "retrieval")
KV_CACHE_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # vLLM-CPU's KV cache size, GiB
GiB = 1 << 30


@dataclass(frozen=True)
class TRJacobiConfig:
    """`mode`: tree = TR-Jacobi trees (plain greedy requests; other greedy ones get chains);
    chain = Jacobi chain with feedback, retrieval chain when the context repeats;
    retrieval = prompt lookup only; off = no drafts (plumbing only).

    `sampled` is what requests with temperature > 0 get: "auto" (default) = chains
    (retrieval, else Jacobi) drafted when the cost-aware planner expects them to pay,
    "chain" / "retrieval" = always draft chains, "off" = no speculation. Sampled chains
    are verified by vLLM's rejection sampler: lossless with the TR-Jacobi worker, which
    replaces a broken vLLM 0.32-cpu kernel (`runner.fix_cpu_expand_kernel`; measured in
    tests/test_vllm_plugin.py). A request can also choose with
    `SamplingParams(extra_args={"trjacobi": mode})`.

    `templates` is the ladder of tree templates, smallest first; with `chain_rung` the
    ladder starts with the chain (retrieval chain when the context repeats, else the
    Jacobi chain) and its cuts to `chain_cuts` tokens, which run on vLLM's own attention
    kernel. The tree ladder exists in
    tree mode only: in the other modes no request gets a tree, so its templates are
    neither compiled nor counted in `num_speculative_tokens`, and the planned sampled
    ("auto") requests choose between the chain and no speculation. With `cost_aware`,
    each step gives each request the rung (or no speculation) with the best expected
    tokens per second for the whole step, from measured step costs and acceptance
    (`planner.py`); otherwise every request drafts the largest rung.
    """

    mode: str = "tree"
    sampled: str = "auto"
    templates: tuple[str, ...] = ("tree-8", "tree-16", "tree-32", "paper-68")
    chain_template: str = "chain-5"
    retrieval_template: str = "retrieval-10"
    cost_aware: bool = True
    chain_rung: bool = True
    fill_noise: bool = False  # noise nodes pay off only for MSN-trained models
    # Plan a batch with no request waiting as one job that ends with its last request
    # (planner.py: it drafts all together or not at all). Right for offline batches
    # (`vllm.LLM.generate`), where the batch's finish time is what counts; a server
    # keeps planning for throughput, i.e. every user's own speed. None: `engine_kwargs`
    # decides from its usage context (LLM_CLASS: on; OPENAI_API_SERVER: off).
    closed_batches: bool | None = None
    # A step drafts only if its expected rate beats not drafting by this fraction
    # (planner.MIN_GAIN): the estimates are noisy, and a plan picked for looking best
    # is on average overestimated.
    min_gain: float = MIN_GAIN
    # How a closed batch values a drafting plan (planner.CLOSED_VALUES): "laggards"
    # (default) only the requests with the most tokens left draft, valued by the least of
    # them; "least" everyone, valued by the least-advanced; "sum" every accepted token.
    closed_value: str = CLOSED_VALUE
    # Probes (drafts the planner makes to keep its estimates fresh) may cost at most
    # this share of the expected step time (planner.PROBE_SHARE).
    probe_share: float = PROBE_SHARE
    # Shorter chain rungs: the chain rung cut to these many tokens. A draft token costs
    # about 2% of a step on 2 cores and the first ones are the likeliest accepted, so a
    # short chain can pay where the full one does not; its estimates come exactly from
    # longer drafts and shadows (`proposer.chain_cut`). Empty: the full chain only.
    chain_cuts: tuple[int, ...] = (2, 4)
    # Pseudo-outcomes of a rung's pooled acceptance per draft token that lift a (rung,
    # feature) estimate of fewer than 10 outcomes below it (planner.PRIOR_WEIGHT); 0: the
    # estimates as recorded.
    estimate_prior: float = PRIOR_WEIGHT
    # Fit the step-cost lines per batch-size bucket (1, 2, 4, 8, ...; planner.batch_bucket)
    # as well as over all batches; False: one line per attention path for every batch.
    cost_buckets: bool = True
    # Price a plan at its cost line plus the measured residual of steps of its exact size
    # (planner.RESIDUAL_ALPHA): at batch 1 on 2 cores short drafts cost no more than none.
    # Measured side by side (MSN model, benchmarks/results/vllm_cpu_msn_interleaved_b1-sized
    # and -b8-sized): 1.77x against 1.69x of plain vLLM at batch 1, 1.03x against 1.02x at 8.
    size_costs: bool = True
    # Where planning does not pay at a batch size (its expected saving below its host
    # time: proposer.PlanValue), plan only every 4th step; the others draft nothing.
    # False: plan every step.
    idle_planning: bool = True
    # On CPU, the greedy argmax of vLLM's sampler and of tree acceptance in numpy
    # (host_ops.py; the same tokens); False: vLLM's and torch's own (side-by-side runs).
    host_ops: bool = True
    max_ngram: int = 3
    # Retrieval across requests (retrieval.CorpusIndex, algorithm.md section 5): the
    # outputs of finished requests, up to this many tokens (oldest dropped first; ~300
    # bytes a token with its index), serve requests whose own context has no match for its
    # last tokens, or whose corpus match runs back 6+ tokens (a repeat). Matches shorter
    # than `corpus_min_ngram` (>= 2) tokens are not used. 0: off.
    # It makes a request's speed depend on what others generated (never its text): an
    # engine shared by mutually untrusted users should turn it off.
    corpus_tokens: int = 1 << 16
    corpus_min_ngram: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"trjacobi mode must be one of {MODES}, got {self.mode!r}")
        if self.sampled not in SAMPLED_MODES:
            raise ValueError(
                f"trjacobi sampled must be one of {SAMPLED_MODES}, got {self.sampled!r}")
        if not self.templates:
            raise ValueError("trjacobi templates: give at least one template")
        if self.closed_value not in CLOSED_VALUES:
            raise ValueError(f"trjacobi closed_value must be one of {CLOSED_VALUES}, "
                             f"got {self.closed_value!r}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"trjacobi min_gain must be in [0, 1), got {self.min_gain!r}")
        if not 0.0 <= self.probe_share <= 1.0:
            raise ValueError(f"trjacobi probe_share must be in [0, 1], got {self.probe_share!r}")
        if not 1 <= self.max_ngram <= MAX_NGRAM:
            raise ValueError(f"trjacobi max_ngram must be in [1, {MAX_NGRAM}] (the planner's "
                             f"feature holds the match length in 2 bits), got {self.max_ngram!r}")
        if not isinstance(self.corpus_tokens, int) or self.corpus_tokens < 0:
            raise ValueError(f"trjacobi corpus_tokens must be an int >= 0 (0: no shared "
                             f"corpus), got {self.corpus_tokens!r}")
        if self.corpus_tokens and not 2 <= self.corpus_min_ngram <= self.max_ngram:
            raise ValueError(f"trjacobi corpus_min_ngram must be in [2, max_ngram="
                             f"{self.max_ngram}], got {self.corpus_min_ngram!r}")
        if not self.estimate_prior >= 0.0:
            raise ValueError(
                f"trjacobi estimate_prior must be >= 0, got {self.estimate_prior!r}")
        object.__setattr__(self, "templates", tuple(self.templates))
        cuts = tuple(self.chain_cuts)
        full = max(load_template(n).num_nodes
                   for n in (self.chain_template, self.retrieval_template))
        if any(not isinstance(k, int) or not 0 < k < full for k in cuts) or (
                list(cuts) != sorted(set(cuts))):
            raise ValueError(f"trjacobi chain_cuts must be increasing token counts in "
                             f"[1, {full - 1}] (the full chain has {full}), got {self.chain_cuts!r}")
        object.__setattr__(self, "chain_cuts", cuts)

    @classmethod
    def from_vllm(cls, vllm_config) -> TRJacobiConfig:
        extra = getattr(vllm_config, "additional_config", None) or {}
        data = dict(extra.get(CONFIG_KEY, {})) if isinstance(extra, dict) else {}
        return cls(**data)

    def draft_templates(self) -> tuple[str, ...]:
        """The templates this mode can draft: the chain and retrieval ones, plus the tree
        ladder in tree mode only (in the other modes no request ever gets a tree)."""
        names = (self.chain_template, self.retrieval_template)
        return names + self.templates if self.mode == "tree" else names

    def max_draft_tokens(self) -> int:
        return max(load_template(n).num_nodes for n in self.draft_templates())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["templates"] = list(self.templates)
        data["chain_cuts"] = list(self.chain_cuts)
        return data


def available_memory() -> tuple[int, int]:
    """(available, total) bytes of the memory vLLM-CPU allocates from, counted as vLLM
    counts them: the NUMA node of the first CPU this process may run on, clamped to the
    cgroup limit."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    info = get_memory_node_info(get_allowed_cpu_list()[0].numa_node)
    return info.available_memory, info.total_memory


def default_kv_cache_space() -> int:
    """GiB of KV cache when the user sets none: a quarter of the memory available now, at
    least 1. The cache plus a tree-attention mirror of its size (tree_attention.py) then
    take at most half, leaving the rest to the model weights and activations."""
    return max(1, available_memory()[0] // (4 * GiB))


def engine_kwargs(config: TRJacobiConfig | None = None, max_num_seqs: int = 16,
                  usage_context: str = "LLM_CLASS", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` / `AsyncEngineArgs(...)` that enable TR-Jacobi.

    `max_num_batched_tokens` fits every running request's largest tree and is never below
    vLLM's own default for `usage_context` (`default_batched_tokens`; the server passes
    OPENAI_API_SERVER). The usage context also decides `closed_batches` when the config
    leaves it open: on for the LLM class (offline batches), off for the server.

    Also sets `MSN_TRJACOBI_TREE_ATTN=1` in this process's environment, so the
    general plugin installs the tree-attention backend in every process vLLM spawns.

    On vLLM's CPU platform in tree mode it also sets `VLLM_CPU_KVCACHE_SPACE` (GiB of KV
    cache) when the user left it unset, to `default_kv_cache_space()`. Unset, vLLM-CPU
    gives its KV cache most of the RAM ("Auto set (20.23/23.54) GiB for KV cache"), and
    where the tree attention cannot read vLLM's packed KV layout (which depends on the
    ISA and dtype, known only in the worker) it needs a plain mirror of the same size:
    the worker would then stop with an error (`TRJacobiRunner.initialize_kv_cache`). An
    explicit setting wins. On CPU this variable also overrides vLLM's
    `kv_cache_memory_bytes`: to choose the size, set the variable.

    On CUDA the worker is `runner.TRJacobiGPUWorker` (V1 GPU runner), with synchronous
    scheduling (the runner reads each step's drafts on the host), and in tree mode the
    `TRITON_ATTN` backend (overridden by `tree_attention_gpu.py`) with CUDA graphs at
    most `PIECEWISE`: attention and the KV write then run eagerly, where tree steps can
    switch to our kernel (a full graph would replay vLLM's stock kernel). These CUDA
    settings have never run in an engine: no GPU build of vLLM exists on our machines.
    """
    config = config or TRJacobiConfig(**overrides)
    if config.closed_batches is None:
        config = replace(config, closed_batches=usage_context == "LLM_CLASS")
    num_spec = config.max_draft_tokens()
    cuda = _cuda_platform()
    if config.mode == "tree":
        os.environ["MSN_TRJACOBI_TREE_ATTN"] = "1"
        if not os.environ.get(KV_CACHE_SPACE_ENV) and _cpu_platform():
            os.environ[KV_CACHE_SPACE_ENV] = str(default_kv_cache_space())
    kwargs = {
        "speculative_config": {
            "method": "custom_class",
            "model": PROPOSER_PATH,
            "num_speculative_tokens": num_spec,
            # One flat batch-size schedule: no per-batch change, but it switches off
            # vLLM's uniform-decode padding (`no_uniform_decode_padding`).
            "num_speculative_tokens_per_batch_size": no_uniform_decode_padding(
                max_num_seqs, num_spec),
        },
        "worker_cls": GPU_WORKER_PATH if cuda else WORKER_PATH,
        "scheduler_cls": SCHEDULER_PATH,
        "additional_config": {CONFIG_KEY: config.to_dict()},
        "max_num_seqs": max_num_seqs,
        # Budget for every running request's full tree, or the scheduler truncates trees;
        # never below vLLM's own default (fewer prompt tokens a step = slower prefill).
        "max_num_batched_tokens": max(default_batched_tokens(usage_context),
                                      max_num_seqs * (num_spec + 1)),
    }
    if cuda:
        kwargs.update(cuda_engine_kwargs(config))
    else:
        # vLLM-CPU always runs the multiprocess executor; ours saves its per-step draft RPC.
        kwargs["distributed_executor_backend"] = EXECUTOR_PATH
    return kwargs


def no_uniform_decode_padding(max_num_seqs: int, num_spec: int) -> list[tuple[int, int, int]]:
    """A `num_speculative_tokens_per_batch_size` schedule that keeps `num_spec` at every
    batch size, so that vLLM's scheduler does not pad admissions to full draft width.

    vLLM 0.32's scheduler (`Scheduler.schedule`, waiting queue) pads a request admitted
    with a single new token (a prefix-cache hit that covers all but the last prompt
    token, or a resumed request) to `1 + num_speculative_tokens` query rows of
    placeholder drafts, so that decode steps stay uniform for full CUDA graphs; only
    with no dynamic schedule set. For us that is a verification of 67 junk draft tokens
    (paper-68's width), rejected in full: on CPU at batch 8 such a row costs more than
    the decode step it rides on. Measured on summarization at batch 8 (its first prompt,
    769 tokens, is 1 mod the block size, so each repeat hit the cache with one token
    left): the plugin's engine with drafting off for every request drafted 402 junk
    tokens a batch and ran 8.9% behind plain vLLM (a diagnostic run: two engines in one
    process, median of 6 paired batches; 2.6% after). We never capture full graphs
    (CPU: none; CUDA: at most PIECEWISE), and the custom_class proposer ignores the
    per-step draft count the schedule passes, so a flat schedule changes nothing else
    (`tests/test_vllm_units.py::test_engine_kwargs_turn_off_uniform_decode_padding`
    guards both facts; `tests/test_vllm_plugin.py` checks that
    such an admission drafts nothing in the engine)."""
    return [(1, max(1, max_num_seqs), num_spec)]


def cuda_engine_kwargs(config: TRJacobiConfig) -> dict[str, Any]:
    """The CUDA-only engine arguments of `engine_kwargs` (vLLM 0.32 `EngineArgs` names)."""
    kwargs: dict[str, Any] = {"async_scheduling": False}
    if config.mode == "tree":
        kwargs["attention_backend"] = TREE_BACKEND_CUDA
        kwargs["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    return kwargs


def default_batched_tokens(usage_context: str = "LLM_CLASS") -> int:
    """vLLM's default `max_num_batched_tokens` on this platform for `usage_context` (a
    `vllm.usage.usage_lib.UsageContext` name: LLM_CLASS for `vllm.LLM`, OPENAI_API_SERVER
    for the server), one GPU / CPU socket. Our engines set the value explicitly (to fit
    every running request's tree), and a value below vLLM's default prefills long
    prompts in more, slower steps: on this CPU vLLM's LLM class uses 4096, and at 2048
    the plugin's engine with drafting off ran summarization at batch 8 at 0.95x of plain
    vLLM (benchmarks/results/vllm_cpu_msn_interleaved_b8-contested.json; that run
    was also hit by the admission padding `no_uniform_decode_padding` removes, likely the
    larger share)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    try:
        context = UsageContext[usage_context]
    except KeyError:
        raise ValueError(f"unknown vLLM usage context {usage_context!r}; one of "
                         f"{', '.join(c.name for c in UsageContext)}") from None
    defaults, _ = EngineArgs.get_batch_defaults(world_size=1)
    return int(defaults.get(context, 2048))


def _cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _cuda_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()
