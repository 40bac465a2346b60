"""TR-Jacobi settings for vLLM, and the engine arguments that switch the plugin on.

Settings travel inside vLLM's own config (`additional_config["trjacobi"]`), so every
process (engine core, workers) sees the same values without extra plumbing.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from proposers.templates import load_template

PROPOSER_PATH = "proposers.vllm.TRJacobiProposer"
WORKER_PATH = "proposers.vllm.runner.TRJacobiWorker"
CONFIG_KEY = "trjacobi"
MODES = ("tree", "chain", "retrieval", "off")
SAMPLED_MODES = ("auto", "off", "chain", "retrieval")


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
    Jacobi chain), which runs on vLLM's own attention kernel. With `cost_aware`, each
    step gives each request the rung (or no speculation) with the best expected tokens
    per second for the whole step, from measured step costs and acceptance
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
    max_ngram: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"trjacobi mode must be one of {MODES}, got {self.mode!r}")
        if self.sampled not in SAMPLED_MODES:
            raise ValueError(
                f"trjacobi sampled must be one of {SAMPLED_MODES}, got {self.sampled!r}")
        if not self.templates:
            raise ValueError("trjacobi templates: give at least one template")
        object.__setattr__(self, "templates", tuple(self.templates))

    @classmethod
    def from_vllm(cls, vllm_config) -> TRJacobiConfig:
        extra = getattr(vllm_config, "additional_config", None) or {}
        data = dict(extra.get(CONFIG_KEY, {})) if isinstance(extra, dict) else {}
        return cls(**data)

    def max_draft_tokens(self) -> int:
        names = [self.chain_template, self.retrieval_template]
        if self.mode == "tree":
            names += list(self.templates)
        return max(load_template(n).num_nodes for n in names)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["templates"] = list(self.templates)
        return data


def engine_kwargs(config: TRJacobiConfig | None = None, max_num_seqs: int = 16,
                  **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` / `AsyncEngineArgs(...)` that enable TR-Jacobi.

    Also sets `MSN_TRJACOBI_TREE_ATTN=1` in this process's environment, so the
    general plugin installs the tree-attention backend in every process vLLM spawns.
    """
    config = config or TRJacobiConfig(**overrides)
    num_spec = config.max_draft_tokens()
    if config.mode == "tree":
        os.environ["MSN_TRJACOBI_TREE_ATTN"] = "1"
    return {
        "speculative_config": {
            "method": "custom_class",
            "model": PROPOSER_PATH,
            "num_speculative_tokens": num_spec,
        },
        "worker_cls": WORKER_PATH,
        "additional_config": {CONFIG_KEY: config.to_dict()},
        "max_num_seqs": max_num_seqs,
        # Budget for every running request's full tree, or the scheduler truncates trees.
        "max_num_batched_tokens": max(2048, max_num_seqs * (num_spec + 1)),
    }
