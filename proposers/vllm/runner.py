"""The TR-Jacobi worker and model runner: every override of vLLM internals lives here.

vLLM 0.32's V1 runner verifies drafts as a chain and never shows a proposer the target's
logits. `TRJacobiRunnerMixin` overrides four private methods of vLLM's V1 runner
(vllm-integration.md sections 2-3; `tests/test_vllm_plugin.py` fails loudly if their
signatures move); `TRJacobiRunner` mixes it into the CPU runner, `TRJacobiGPURunner`
into the CUDA one (`GPUModelRunner`):

- `_update_states`: frees a request's proposer state when it finishes or is preempted.
- `_prepare_inputs`: for requests whose drafts are a tree, rewrites RoPE positions to
  prefix + depth and publishes the tree mask to the attention backend. The slot mapping
  stays sequential: node i's KV lands in slot i of the request's draft region.
- `_sample`: in a step where no request drafted, samples through vLLM's non-speculative
  sampler (vLLM 0.32 would run its rejection sampler over zero drafts); otherwise runs
  vLLM's sampler (chain rejection sampling for everything else), then for
  tree requests replaces its result with tree acceptance (longest matching root-to-leaf
  path + bonus), compacts the accepted path's KV into the slots of depths 1..a (vLLM then
  rolls back the rest, since it only counts the returned tokens), and keeps the top-K at
  the nodes below the accepted one as Jacobi feedback.
- `propose_draft_token_ids`: hands feedback, request ids and modes to the proposer
  before vLLM calls its `propose`, and feeds measured step costs to the planner.

The platforms differ in the tree step they publish for attention (`_publish_tree_step`):
the CPU runner builds the padded `tree_attention.TreeStep` and checks its key gather
against vLLM's slot mapping; the CUDA runner builds `kernels.tree_step.KernelTreeStep`
on the device (our Triton kernel reads vLLM's block table itself). The CPU runner also
extends the public `initialize_kv_cache`: once vLLM has allocated the KV cache, it
chooses per layer whether tree steps read vLLM's packed cache or need a plain mirror
(tree_attention.py), and allocates any mirror there, after checking it fits. The CUDA
runner needs neither: the Triton backend's cache layout is plain.

`TRJacobiWorker` installs the CPU runner (the CPU worker builds its runner inline in
`init_device`) and the tree-attention backend before the model is built;
`TRJacobiGPUWorker` does the same on CUDA through `Worker._make_model_runner`.

Never run: `TRJacobiGPURunner` and `TRJacobiGPUWorker` inside a vLLM engine. No GPU
build of vLLM exists on our machines, so the CUDA classes are untested end to end;
only their pieces are tested (kernel step and kernel: tests/test_vllm_tree_triton.py
on CPU, tests/test_tree_step_gpu.py on a GPU; the shared runner logic through the CPU
runner's tests).

On CPU the runner also takes the sampler's greedy kernel and its own per-node argmax from
`host_ops.py` (numpy's argmax: the same tokens, 2.6-6.6x faster over the vocabulary;
greedy output is unchanged, which the engine tests check against plain vLLM).

It also replaces one broken CPU kernel of vLLM 0.32.0 (`fix_cpu_expand_kernel`): the C++
stand-in for the rejection sampler's `expand_kernel` converts its float output to a new
int64 tensor, writes there and never copies back, so the per-draft-token temperatures
(and top-k/top-p) of sampled requests are uninitialised memory. Any speculation of a
sampled request (vLLM's own ngram included) then verifies against logits divided by
garbage temperatures, often negative ones that turn the least likely token into the
most likely one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker as GPUWorker

from kernels.tree_step import build_kernel_tree_step
from proposers.tree import TreeSpec
from proposers.verify import accept
from proposers.vllm.config import (
    EXECUTOR_PATH,
    KV_CACHE_SPACE_ENV,
    SCHEDULER_PATH,
    GiB,
    TRJacobiConfig,
    available_memory,
)
from proposers.vllm.executor import TRJacobiExecutor, attach_drafts
from proposers.vllm.host_ops import argmax_rows, fast_greedy_sample
from proposers.vllm.proposer import BatchFeedback, TRJacobiProposer
from proposers.vllm.scheduler import waiting_requests
from proposers.vllm.tree_attention import (
    MIRROR,
    PACKED,
    TreeCPUAttentionImpl,
    build_tree_step,
    packed_layout_readable,
    register_tree_backend,
)
from proposers.vllm.tree_attention_gpu import (
    TreeTritonAttentionImpl,
    register_tree_triton_backend,
)
from proposers.vllm.tree_runtime import RUNTIME, compact_kv
from proposers.vllm.version import check_vllm_version

logger = logging.getLogger(__name__)

SAMPLING_EPS = 1e-5
MIRROR_HEADROOM = GiB  # memory a KV mirror must leave free (step activations)
EXTRA_ARGS_KEY = "trjacobi"  # SamplingParams(extra_args={"trjacobi": "off"}) per request


# A longer pause between two steps is the engine idling (no request), not step overhead.
BUSY_GAP = 0.25


@dataclass
class _DraftedRow:
    """A request that carries drafts this step."""

    req_idx: int
    req_id: str
    query_start: int
    tree: TreeSpec  # chain-shaped unless the drafts are a tree we planned
    rung: str | None  # the planner's rung, None for drafts it did not plan
    feature: int
    is_tree: bool


class TRJacobiRunnerMixin:
    """The platform-neutral TR-Jacobi runner; mixed into vLLM's CPU or GPU V1 runner.

    Platform hooks: `tree_impl_cls` / `tree_backend_name` (the attention impl tree mode
    needs), `_publish_tree_step` (the per-step tree description that impl reads) and
    `_step_slot_mapping` (where compaction finds the slots of this step's rows)."""

    tree_impl_cls: type  # set by each platform's runner
    tree_backend_name: str

    def __init__(self, vllm_config, device):
        check_vllm_version()
        super().__init__(vllm_config, device)
        if not isinstance(getattr(self, "drafter", None), TRJacobiProposer):
            raise TypeError(
                "TRJacobiWorker needs speculative_config.method='custom_class' with "
                "model='proposers.vllm.TRJacobiProposer'; use proposers.vllm.engine_kwargs()"
            )
        self.trj: TRJacobiProposer = self.drafter
        self.tree_mode = self.trj.config.mode == "tree"
        self._rows: list[_DraftedRow] = []
        self._feedback: dict[str, torch.Tensor] = {}
        self._step_start = 0.0
        self._step_path = "kernel"
        self.tree_steps = 0
        self.compactions = 0
        # Drafts this worker verified (request-steps with drafts) and the draft tokens
        # they got accepted: this engine's own MAT (vLLM's metrics registry is per
        # process; with several engines in one process `LLM.get_metrics()` reads the
        # one built last).
        self.verified_drafts = 0
        self.accepted_tokens = 0
        # Steps sampled by vLLM's non-speculative sampler: no request drafted (`_sample`).
        self.undrafted_steps = 0
        # Per attention path: steps, scheduled tokens, seconds of the forward + sampling;
        # plus the seconds spent drafting (what the planner's cost lines do not see).
        # ("kernel" steps split into those with and without drafted chains.)
        self.path_stats = {"plain": [0, 0, 0.0], "chain": [0, 0, 0.0], "tree": [0, 0, 0.0]}
        self.draft_seconds = 0.0
        # Seconds between one step's drafts and the next step's start (the engine core's
        # scheduling and output handling, the worker's IPC), gaps of a busy engine only.
        self.between_seconds = 0.0
        self._step_end: float | None = None
        # Sampled requests served without speculation (config `sampled="off"`).
        self.sampled_unspeculated = 0
        self._unspeculated: set[str] = set()
        self._warned_sampled = False
        self._warned_no_waiting = False

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        if not self.tree_mode:
            return
        impls = [getattr(layer, "impl", None)
                 for layer in self.compilation_config.static_forward_context.values()]
        impls = [i for i in impls if i is not None]
        wrong = [type(i).__name__ for i in impls if not isinstance(i, self.tree_impl_cls)]
        if not impls or wrong:
            raise RuntimeError(
                f"TR-Jacobi tree mode needs the tree-attention {self.tree_backend_name} "
                "backend, but the model's "
                f"attention layers use {sorted(set(wrong)) or 'nothing'}; the backend must be "
                "registered before the model is built (MSN_TRJACOBI_TREE_ATTN=1)"
            )
        for impl in impls:
            impl.check_tree_support()

    # -- request lifecycle ---------------------------------------------------------
    def _update_states(self, scheduler_output):
        self.trj.finish(scheduler_output.finished_req_ids)  # outputs join the corpus
        self._unspeculated.difference_update(scheduler_output.finished_req_ids)
        self.trj.release(scheduler_output.preempted_req_ids or ())
        return super()._update_states(scheduler_output)

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self._step_start = time.perf_counter()
        if self._step_end is not None and self._step_start - self._step_end < BUSY_GAP:
            self.between_seconds += self._step_start - self._step_end
        return super().execute_model(scheduler_output, intermediate_tensors)

    def request_mode(self, req_id: str) -> str:
        """tree for plain greedy requests; greedy ones with logits processing get chains
        (vLLM's rejection sampler verifies greedy chains exactly, processors included).

        Sampled requests (temperature > 0) get `config.sampled`, by default "auto":
        chains the cost-aware planner drafts when they pay, verified by vLLM's rejection
        sampler (lossless with `fix_cpu_expand_kernel`; tests/test_vllm_plugin.py). A
        request may choose with `extra_args={"trjacobi": "chain" | "off" | ...}`."""
        mode = self.trj.config.mode
        params = self.requests[req_id].sampling_params
        if params is None:
            return "off"
        override = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if override not in ("off", "chain", "retrieval", "tree", "auto"):
            override = None  # unknown values: the engine's defaults
        greedy = params.temperature < SAMPLING_EPS
        if override == "auto" and greedy:
            override = None  # greedy "auto" is the engine's default (planned trees)
        if override is not None:
            mode = override if override != "tree" or self.tree_mode else mode
        if not greedy:
            if override is None:
                mode = self.trj.config.sampled
            elif mode == "tree":
                mode = "auto"
            if mode == "off":
                self._count_unspeculated(req_id)
        elif mode == "tree" and not _plain_greedy(params):
            mode = "chain"
        return mode

    def _count_unspeculated(self, req_id: str) -> None:
        if req_id in self._unspeculated:
            return
        self._unspeculated.add(req_id)
        self.sampled_unspeculated += 1
        if not self._warned_sampled:
            self._warned_sampled = True
            logger.warning(
                "TR-Jacobi: sampled requests (temperature > 0) run without speculation "
                "(config sampled='off' or extra_args={'trjacobi': 'off'}). Counted in "
                "trjacobi_stats()['sampled_unspeculated']; the default, sampled='auto', "
                "drafts cost-planned chains."
            )

    # -- step inputs ---------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._rows = []
        RUNTIME.step = None
        num_reqs = self.input_batch.num_reqs
        qsl = self.query_start_loc.np[: num_reqs + 1].tolist()
        trees: dict[int, torch.Tensor] = {}
        for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
            if not drafts:
                continue
            req_idx = self.input_batch.req_id_to_index[req_id]
            n = len(drafts)
            plan = self.trj.plan_for(req_id)
            planned = (
                plan is not None and num_scheduled_tokens[req_idx] == n + 1
                and tuple(drafts) == plan.tokens[:n]
            )
            if planned:
                tree = plan.tree if n == plan.tree.num_nodes else plan.tree.subtree(
                    torch.arange(n + 1))
            else:
                tree = self.trj.chain_tree(n)
            is_tree = planned and not tree.is_chain
            row = _DraftedRow(req_idx, req_id, qsl[req_idx], tree,
                              plan.rung if planned else None,
                              plan.feature if planned else 0, is_tree)
            self._rows.append(row)
            if is_tree:
                s = row.query_start
                depth = tree.depth.to(self.positions.device)
                self.positions[s: s + n + 1] = self.positions[s] + depth
                trees[req_idx] = tree.ancestors
        if trees:
            if len(self.input_batch.block_table.block_tables) != 1:
                raise NotImplementedError("TR-Jacobi trees support one KV cache group")
            RUNTIME.step = self._publish_tree_step(qsl, num_reqs, trees)
            self.tree_steps += 1
        self._step_path = "tree" if trees else "kernel"
        return out

    def _publish_tree_step(self, qsl: list[int], num_reqs: int,
                           trees: dict[int, torch.Tensor]):
        """The tree step this platform's attention impl reads (set in `RUNTIME`)."""
        raise NotImplementedError(f"{type(self).__name__} must define _publish_tree_step")

    def _step_slot_mapping(self) -> torch.Tensor:
        """This step's slot of each flat token row, where vLLM computed it."""
        raise NotImplementedError(f"{type(self).__name__} must define _step_slot_mapping")

    # -- verification --------------------------------------------------------------
    def _sample(self, logits, spec_decode_metadata):
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            # No request drafted this step. vLLM 0.32 still builds spec-decode metadata
            # for every step of an engine with a drafter and samples through its
            # rejection sampler (a bonus-token sampler that keeps a copy of the raw
            # logits, and a rejection pass over zero drafts): ~0.5 ms a step at batch 8
            # on 2 cores, ~1% of the step, measured against plain vLLM's sampler. With
            # nothing to verify, vLLM's own non-speculative path samples the same rows
            # (the logits rows are the same: one per request), exactly as plain vLLM.
            self.undrafted_steps += 1
            spec_decode_metadata = None
        rows, self._rows = self._rows, []
        feedback: dict[str, torch.Tensor] = {}
        plans = {}
        if spec_decode_metadata is not None and rows:
            num_sampled = np.asarray(spec_decode_metadata.num_draft_tokens) + 1
            offsets = np.concatenate([[0], np.cumsum(num_sampled)])
            # Before vLLM's sampler runs: it may process logits in place.
            for row in rows:
                lo = int(offsets[row.req_idx])
                block = logits[lo: lo + row.tree.num_nodes + 1]
                # On the host (a no-op on CPU): acceptance and feedback run there.
                target = argmax_rows(block) if self.trj.config.host_ops else block.argmax(-1)
                plans[row.req_id] = (target.cpu(),
                                     block.topk(self.trj.feedback_k, -1).indices.cpu())
        output = super()._sample(logits, spec_decode_metadata)
        step = RUNTIME.step
        RUNTIME.step = None
        if not plans:
            self._feedback = feedback
            return output
        sampled = output.sampled_token_ids
        src_rows: list[int] = []
        dst_rows: list[int] = []
        for row in rows:
            target, topk = plans[row.req_id]
            n = row.tree.num_nodes
            if row.is_tree:
                drafts = self.input_ids.cpu[row.query_start: row.query_start + n + 1].long()
                result = accept(row.tree, drafts, target)
                node, num_accepted = result.node, result.num_accepted
                sampled[row.req_idx].fill_(-1)
                sampled[row.req_idx, : num_accepted + 1] = torch.tensor(result.tokens,
                                                                      dtype=sampled.dtype)
                for depth, idx in enumerate(result.path, start=1):
                    if idx != depth:
                        src_rows.append(row.query_start + idx)
                        dst_rows.append(row.query_start + depth)
            else:
                num_accepted = int((sampled[row.req_idx] != -1).sum()) - 1
                node = max(num_accepted, 0)
            chain = row.tree.feedback_chain(node)
            feedback[row.req_id] = topk[chain] if chain else topk[:0]
            self.verified_drafts += 1
            self.accepted_tokens += max(num_accepted, 0)
            if row.rung is not None:
                self.trj.record_outcome(row.req_id, row.rung, row.feature, n,
                                        max(num_accepted, 0))
        if src_rows:
            assert step is not None
            dst_slots = self._step_slot_mapping()[torch.tensor(dst_rows)]
            compact_kv(step, torch.tensor(src_rows), dst_slots)
            self.compactions += 1
        self._feedback = feedback
        return output

    # -- drafting ------------------------------------------------------------------
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        now = time.perf_counter()
        seconds = now - self._step_start
        tokens = scheduler_output.total_num_scheduled_tokens
        batch = len(scheduler_output.num_scheduled_tokens)
        prefill = prefill_tokens(scheduler_output)
        if not prefill:
            self.trj.planner.record_step(self._step_path, tokens, seconds, batch=batch)
        self.trj.trace_step(self._step_path, batch, tokens, prefill, seconds)
        kind = "tree" if self._step_path == "tree" else (
            "chain" if scheduler_output.scheduled_spec_decode_tokens else "plain")
        stats = self.path_stats[kind]
        stats[0], stats[1], stats[2] = stats[0] + 1, stats[1] + tokens, stats[2] + seconds
        req_ids = list(self.input_batch.req_ids)
        modes = [self.request_mode(r) for r in req_ids]
        self.trj.set_target_feedback(BatchFeedback(req_ids, modes, self._feedback,
                                                   self._closed_batch(scheduler_output),
                                                   [self._remaining(r) for r in req_ids]))
        self._feedback = {}
        drafts = super().propose_draft_token_ids(scheduler_output, sampled_token_ids,
                                                 *args, **kwargs)
        self._step_end = time.perf_counter()
        self.draft_seconds += self._step_end - now
        return drafts

    def _remaining(self, req_id: str) -> int:
        """Tokens the request may still produce: its max_tokens, or the model length."""
        state = self.requests[req_id]
        produced = len(state.output_token_ids)
        left = self.max_model_len - len(state.prompt_token_ids or ()) - produced
        params = state.sampling_params
        if params is not None and params.max_tokens is not None:
            left = min(left, params.max_tokens - produced)
        return max(left, 0)

    def _closed_batch(self, scheduler_output) -> bool:
        """Whether no request waits for a slot (planner.py: the batch then drafts all
        together or not at all). Without `TRJacobiScheduler` the count is unknown: said
        once in the log, and every step is planned for throughput."""
        waiting = waiting_requests(scheduler_output)
        if waiting is None:
            if not self._warned_no_waiting:
                self._warned_no_waiting = True
                logger.warning(
                    "TR-Jacobi: the engine's scheduler does not report waiting requests "
                    "(scheduler_cls is not %s), so the drafting planner cannot tell a "
                    "closed batch and plans every step for throughput", SCHEDULER_PATH)
            return False
        return waiting == 0

    def trjacobi_stats(self) -> dict:
        return {
            "tree_steps": self.tree_steps,
            "compactions": self.compactions,
            "verified_drafts": self.verified_drafts,
            "accepted_tokens": self.accepted_tokens,
            "undrafted_steps": self.undrafted_steps,
            "proposals": self.trj.num_proposals,
            "feedback_proposals": self.trj.num_feedback_proposals,
            "shadow_outcomes": self.trj.num_shadow_outcomes,
            # Steps that skipped planning where it did not pay (proposer.PlanValue).
            "idle_steps": self.trj.idle_steps,
            # The shared corpus (retrieval.CorpusIndex): what it holds, request-steps
            # whose retrieval chain came from it, and of those the ones that drafted.
            "corpus": {"tokens": len(self.trj.corpus) if self.trj.corpus else 0,
                       "docs": self.trj.corpus.num_docs if self.trj.corpus else 0,
                       "lookups": self.trj.num_corpus_lookups,
                       "drafts": self.trj.num_corpus_drafts},
            "sampled_unspeculated": self.sampled_unspeculated,
            # Requests whose proposer state is alive (freed when vLLM reports them finished
            # or preempted, with the step after).
            "live_requests": len(self.trj.states),
            "rungs": dict(self.trj.planner.history),
            "closed_batch_steps": self.trj.planner.closed_steps,
            "probes": self.trj.planner.probes,
            "paths": {p: {"steps": n, "tokens": t, "seconds": round(sec, 4)}
                      for p, (n, t, sec) in self.path_stats.items()},
            "draft_seconds": round(self.draft_seconds, 4),
            # Of those, the proposer's own host time by phase (proposer.HOST_PHASES).
            "propose_seconds": {k: round(v, 4) for k, v in self.trj.host_seconds.items()},
            "between_steps_seconds": round(self.between_seconds, 4),
            # The planner's fitted step cost per path (and batch bucket, "kernel@8"):
            # (seconds, seconds per token).
            "cost_lines": self.trj.planner.cost_lines(),
        }

    def trjacobi_clear_corpus(self) -> None:
        self.trj.clear_corpus()


class TRJacobiRunner(TRJacobiRunnerMixin, CPUModelRunner):
    """The CPU runner: tree steps read K/V with PyTorch (tree_attention.py)."""

    tree_impl_cls = TreeCPUAttentionImpl
    tree_backend_name = "CPU"

    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        # vLLM's CPU greedy kernel, replaced by the same argmax in numpy (host_ops: the
        # same token on ties, NaN and -inf rows; ~0.10 -> ~0.04 ms a step at batch 8).
        # The rejection sampler samples its bonus tokens through this same sampler.
        if self.trj.config.host_ops:
            self.sampler.greedy_sample = fast_greedy_sample

    def initialize_kv_cache(self, kv_cache_config, is_profiling=False,
                            kv_cache_allocation_context=None) -> None:
        super().initialize_kv_cache(kv_cache_config, is_profiling,
                                    kv_cache_allocation_context=kv_cache_allocation_context)
        if self.tree_mode:
            self._choose_tree_kv_sources()

    def _choose_tree_kv_sources(self) -> None:
        """Per attention layer, where tree steps read K/V (tree_attention.py): vLLM's
        packed cache where `packed_layout_readable` passes for the layer's shape, dtype
        and ISA (known only now: the metadata builders set `layer.isa`), else a plain
        mirror, allocated here and not on the first step. vLLM-CPU sizes its cache to
        most of RAM unless VLLM_CPU_KVCACHE_SPACE is set, and a mirror of that size
        allocated mid-run got the worker OOM-killed without a message; so the mirror is
        checked against the free memory first, with an error that says what fits."""
        mirrored: dict[tuple, list[TreeCPUAttentionImpl]] = {}  # per distinct cache tensor
        caches: dict[tuple, torch.Tensor] = {}
        isas: set[str] = set()
        packed = 0
        for layer in self.compilation_config.static_forward_context.values():
            impl, kv_cache = getattr(layer, "impl", None), getattr(layer, "kv_cache", None)
            if not (isinstance(impl, TreeCPUAttentionImpl) and impl._decoder()
                    and isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 4):
                continue
            impl.kv_source, impl.mirror = None, None
            if packed_layout_readable(impl, layer, kv_cache):
                impl.kv_source = PACKED
                packed += 1
                continue
            # Layers sharing a cache (vLLM's cross-layer KV sharing) share its mirror.
            key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.dtype)
            mirrored.setdefault(key, []).append(impl)
            caches[key] = kv_cache
            isas.add(f"{layer.isa} {str(kv_cache.dtype).removeprefix('torch.')}")
        if not mirrored:
            logger.info("TR-Jacobi tree attention reads vLLM's packed KV cache directly "
                        "in all %d layers (no mirror)", packed)
            return
        need = sum(c.numel() * c.element_size() for c in caches.values())
        free, _ = available_memory()
        if need + MIRROR_HEADROOM > free:
            cache = sum(t.size for t in self.kv_cache_config.kv_cache_tensors)
            fits = (free + cache - MIRROR_HEADROOM) * cache / (cache + need) // GiB
            advice = (f"Set {KV_CACHE_SPACE_ENV}={int(fits)} (GiB) or less" if fits >= 1 else
                      f"Free memory: even {KV_CACHE_SPACE_ENV}=1 leaves no room for it")
            raise RuntimeError(
                f"TR-Jacobi tree attention cannot read vLLM's packed KV layout for "
                f"{', '.join(sorted(isas))} and needs a plain mirror of the KV cache: "
                f"{need / GiB:.2f} GiB more, but {free / GiB:.2f} GiB is free (keeping "
                f"{MIRROR_HEADROOM / GiB:.1f} GiB for activations; the KV cache takes "
                f"{cache / GiB:.2f} GiB). {advice}."
            )
        for key, impls in mirrored.items():
            num_blocks, num_kv_heads, block_size, two_head = caches[key].shape
            mirror = torch.zeros(num_blocks * block_size, 2, num_kv_heads, two_head // 2,
                                 dtype=caches[key].dtype)
            for impl in impls:
                impl.kv_source, impl.mirror = MIRROR, mirror
        logger.info(
            "TR-Jacobi tree attention cannot read vLLM's packed KV layout for %s: %d "
            "layers mirror their K/V into a plain cache (%.2f GiB more memory, one more "
            "K/V write per layer every step); %d layers read the packed cache",
            ", ".join(sorted(isas)), sum(map(len, mirrored.values())), need / GiB, packed)

    def _step_slot_mapping(self) -> torch.Tensor:
        return self.input_batch.block_table[0].slot_mapping.cpu

    def _publish_tree_step(self, qsl: list[int], num_reqs: int,
                           trees: dict[int, torch.Tensor]):
        table = self.input_batch.block_table[0]
        step = build_tree_step(
            qsl, self.input_batch.num_computed_tokens_cpu[:num_reqs].tolist(),
            table.block_table.cpu[:num_reqs], table.block_size, trees,
        )
        # Our key gather must agree with vLLM's own slot mapping for the new tokens.
        slots = table.slot_mapping.cpu[: qsl[-1]].long()
        got = step.key_slots.gather(
            1, (torch.tensor(self.input_batch.num_computed_tokens_cpu[:num_reqs],
                             dtype=torch.long)[:, None]
                + step.query_index - torch.tensor(qsl[:-1])[:, None]).clamp(min=0)
        )
        if not torch.equal(got[step.query_valid], slots[step.query_index[step.query_valid]]):
            raise RuntimeError("TR-Jacobi tree step: key slots disagree with vLLM's slot "
                               "mapping (block table layout changed?)")
        return step


class TRJacobiGPURunner(TRJacobiRunnerMixin, GPUModelRunner):
    """The CUDA runner: tree steps run our Triton kernel (tree_attention_gpu.py).

    Built and unit-tested pieces only: no GPU build of vLLM exists on our machines, so this
    class has never run inside an engine (see the module docstring)."""

    tree_impl_cls = TreeTritonAttentionImpl
    tree_backend_name = "CUDA (Triton)"

    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        if self.use_async_scheduling:
            raise RuntimeError(
                "TR-Jacobi on CUDA needs async_scheduling=False: the runner reads this "
                "step's draft tokens and plans on the host (proposers.vllm.engine_kwargs "
                "sets it)")
        if self.tree_mode and self.uses_mrope:
            raise NotImplementedError("TR-Jacobi tree mode on CUDA: M-RoPE models (the "
                                      "depth positions rewrite only `positions`)")

    def _step_slot_mapping(self) -> torch.Tensor:
        return self.input_batch.block_table[0].slot_mapping.gpu  # computed on the device

    def _publish_tree_step(self, qsl: list[int], num_reqs: int,
                           trees: dict[int, torch.Tensor]):
        """The kernel's step, built on the host and copied to the device. The kernel reads
        vLLM's block table itself, so unlike on CPU there is no slot gather to check."""
        return build_kernel_tree_step(
            qsl, self.input_batch.num_computed_tokens_cpu[:num_reqs].tolist(), trees,
            self.device)


def prefill_tokens(scheduler_output) -> int:
    """Prompt tokens in a step: scheduled tokens past each request's one sampled token
    and its drafts.

    The planner's cost lines model decode steps (one token a request plus drafts) and
    skip steps with prompt tokens: a prompt token is much cheaper than a decode or draft
    token (no LM head over the vocabulary, batched matmuls), and prefill steps lie far
    out on the token axis, so a few of them flatten the fitted slope. Measured at batch 8
    on 2 cores: a decode step ~128 ms, a chain step of ~12 more tokens ~176 ms (+4 ms a
    draft token), while 8 prompts of a few hundred tokens prefill at well under 1 ms a
    token (per-path step times of bench_interleaved)."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    return sum(max(0, n - 1 - len(spec.get(req_id, ())))
               for req_id, n in scheduler_output.num_scheduled_tokens.items())


def _plain_greedy(params) -> bool:
    """Greedy with nothing that changes the argmax of raw logits (tree acceptance uses it)."""
    return (
        params.temperature < SAMPLING_EPS
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and not params.logit_bias
        and not params.allowed_token_ids
        and not params.bad_words
        and params.min_tokens == 0
        and params.logprobs is None
        and params.structured_outputs is None
    )


EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to,
                       MAX_NUM_TOKENS=None):
    """What `rejection_sampler.expand_kernel` computes: request i's value (with
    `replace_from` replaced by `replace_to`) for each of its tokens, in `output`'s dtype."""
    cu = cu_num_tokens.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    vals = torch.where(input_val == replace_from,
                       torch.full_like(input_val, replace_to), input_val)
    n = int(cu[-1]) if cu.numel() else 0
    output[:n] = torch.repeat_interleave(vals.to(output.dtype), counts, dim=0)


def fix_cpu_expand_kernel() -> bool:
    """Register `expand_kernel_impl` over vLLM 0.32-cpu's broken C++ override (see the
    module docstring). Returns whether vLLM uses kernel overrides here at all."""
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON:
        return False  # real Triton kernels, nothing to fix
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({EXPAND_KERNEL: expand_kernel_impl})
    return True


class TRJacobiWorker(CPUWorker):
    def init_device(self):
        check_vllm_version()
        fix_cpu_expand_kernel()  # after the platform's overrides (WorkerWrapperBase)
        if TRJacobiConfig.from_vllm(self.vllm_config).mode == "tree":
            register_tree_backend()  # before the model (and its attention) is built
        super().init_device()
        self.model_runner = TRJacobiRunner(self.vllm_config, torch.device("cpu"))
        # Our executor takes each step's drafts from its output (executor.py); under
        # another executor vLLM's own RPC fetches them.
        self._carry_drafts = (self.vllm_config.parallel_config.distributed_executor_backend
                              in (EXECUTOR_PATH, TRJacobiExecutor))
        self._carried_steps = 0

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        if self._carry_drafts and isinstance(output, ModelRunnerOutput):
            output = attach_drafts(output, self.model_runner.take_draft_token_ids())
            self._carried_steps += 1
        return output

    def trjacobi_stats(self) -> dict:
        # Steps whose drafts rode their output (no take_draft_token_ids RPC).
        return {**self.model_runner.trjacobi_stats(), "carried_draft_steps": self._carried_steps}

    def trjacobi_clear_corpus(self) -> None:
        """`collective_rpc("trjacobi_clear_corpus")`: forget earlier requests' outputs."""
        self.model_runner.trjacobi_clear_corpus()


class TRJacobiGPUWorker(GPUWorker):
    """vLLM's CUDA worker with the TR-Jacobi runner and the Triton tree backend.

    Never run: no GPU build of vLLM exists on our machines (module docstring)."""

    def init_device(self):
        check_vllm_version()
        if TRJacobiConfig.from_vllm(self.vllm_config).mode == "tree":
            register_tree_triton_backend()  # before the model (and its attention) is built
        super().init_device()

    def _make_model_runner(self) -> TRJacobiGPURunner:
        if self.use_v2_model_runner:
            raise RuntimeError(
                "TR-Jacobi subclasses vLLM's V1 GPU model runner, but this engine selected "
                "Model Runner V2; set VLLM_USE_V2_MODEL_RUNNER=0 (custom_class speculation "
                "normally makes vLLM pick V1 by itself)")
        return TRJacobiGPURunner(self.vllm_config, self.device)

    def trjacobi_stats(self) -> dict:
        return self.model_runner.trjacobi_stats()

    def trjacobi_clear_corpus(self) -> None:
        self.model_runner.trjacobi_clear_corpus()
