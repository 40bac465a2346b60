"""The candidate table: which token each (depth, column) slot of the tree holds.

Row d-1 holds depth d. Columns 0..K-1 are the top-K tokens the model predicted for that
depth at the previous step (Jacobi feedback), column K the retrieval chain. Empty slots
(-1) are filled with noise drawn from the context, as in MSN training, so that every
template node always carries a real token; `fill_noise=False` instead prunes empty
nodes (prompt lookup drafts only what it found).
"""

from __future__ import annotations

import torch

from proposers.retrieval import ngram_lookup
from proposers.tree import TreeSpec

EMPTY = -1


class CandidateTable:
    def __init__(self, tree: TreeSpec, generator: torch.Generator | None = None,
                 max_ngram: int = 3, fill_noise: bool = True):
        self.tree = tree
        self.top_k = tree.template.top_k
        self.depth = tree.max_depth
        self.max_ngram = max_ngram
        self.fill_noise = fill_noise
        self.generator = generator
        self.table = torch.full((self.depth, self.top_k + 1), EMPTY, dtype=torch.long)
        self._slot = None  # node -> flat table slot (numpy), built on first use
        self._all: torch.Tensor | None = None

    def reset(self) -> None:
        self.table.fill_(EMPTY)

    def set_feedback(self, topk_ids: torch.Tensor) -> None:
        """Top-K token ids predicting depths 1..m (rows of `topk_ids`, best first).

        `topk_ids` is [m, >=K] for the nodes of the feedback chain; deeper rows empty.
        """
        self.table[:, : self.top_k] = EMPTY
        m = min(topk_ids.shape[0], self.depth)
        if m:
            k = min(self.top_k, topk_ids.shape[-1])
            self.table[:m, :k] = topk_ids[:m, :k].cpu()

    def set_retrieval(self, context: torch.Tensor, found=None) -> None:
        """The retrieval column: the chain `found` when the caller looked it up (the vLLM
        proposer's per-request index, or a shared corpus: retrieval.CorpusIndex), else
        the prompt-lookup continuation of `context`."""
        column = self.table.numpy()[:, self.top_k]  # a view: numpy, not torch, per step
        column[:] = EMPTY
        if self.tree.template.uses_retrieval:
            if found is None:
                found = ngram_lookup(context, self.depth, self.max_ngram).numpy()
            found = found[: self.depth]
            column[: len(found)] = found

    def node_tokens(self, root_token: int, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of root + nodes, and the node indices kept (all, unless pruning).

        Noise comes from the context (prompt + output), the distribution MSN trained on.
        Runs every step of every request, so it works on numpy views (a few small torch
        ops cost more than the whole lookup).
        """
        tree = self.tree
        if self._slot is None:
            # Flat (depth - 1, column) slot of every node; the root's entry is unused.
            self._slot = ((tree.depth - 1) * (self.top_k + 1) + tree.column).numpy()
            self._slot[0] = 0
            self._all = torch.arange(tree.num_nodes + 1)
        tokens = self.table.numpy().ravel()[self._slot]  # a copy: fancy indexing
        tokens[0] = root_token
        empty = tokens[1:] == EMPTY
        keep = self._all
        if empty.any():
            if self.fill_noise:
                pick = torch.randint(context.numel(), (int(empty.sum()),), generator=self.generator)
                tokens[1:][empty] = context[pick].numpy()
            else:
                keep = prune_empty(tree, torch.from_numpy(empty))
                return torch.from_numpy(tokens)[keep], keep
        return torch.from_numpy(tokens), keep


def prune_empty(tree: TreeSpec, empty: torch.Tensor) -> torch.Tensor:
    """Root plus the nodes whose own slot and all ancestors' slots are filled.

    `empty` is [N] over nodes 1..N. The result stays in BFS order, so it is itself a
    valid (sub)tree in the same node order.
    """
    bad = torch.cat([torch.tensor([False]), empty])
    dead = (tree.ancestors & bad.unsqueeze(0)).any(dim=1)
    return (~dead).nonzero().flatten()
