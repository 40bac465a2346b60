"""Acceptance: which drafted path the model agrees with, and the tokens it yields.

`target[i]` is the model's own next token at node i (argmax for greedy, a sample from
the processed distribution otherwise). Node i is accepted when its token equals the
target at its parent and its parent is accepted. Emitting the targets along the deepest
accepted path, root first, yields the accepted drafts plus the bonus token.

Why this is exact for greedy and lossless for sampling: every emitted token is the
model's target at a node whose context equals the true prefix (all its ancestors were
accepted), i.e. exactly the token plain decoding would emit (greedy) or a fresh draw from
the same conditional distribution (sampling; drafts here are deterministic given the
context, so accepting on equality with an independent draw does not bias it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from proposers.tree import TreeSpec


@dataclass(frozen=True, slots=True)
class Acceptance:
    node: int  # deepest accepted node (0 = only the root)
    num_accepted: int  # accepted draft tokens (= depth of `node`)
    path: list[int]  # accepted nodes, depth 1..num_accepted
    tokens: list[int]  # emitted tokens: accepted drafts + bonus (num_accepted + 1)


def accepted_mask(tree: TreeSpec, node_tokens: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[N+1] bool: node and all its ancestors match (host arrays: this runs every step
    of every request, where a few small torch ops cost more than the whole test)."""
    match = node_tokens == target[tree.parent.numpy().clip(min=0)]
    match[0] = True  # the root is given
    # A node is accepted iff no ancestor-or-self fails to match.
    return ~(tree.ancestors.numpy() & ~match).any(axis=1)


def accept(tree: TreeSpec, node_tokens: torch.Tensor, target: torch.Tensor) -> Acceptance:
    """Greedy/sampled acceptance of one request's tree (1-D tensors of length N+1)."""
    target = target.cpu().numpy()
    ok = accepted_mask(tree, node_tokens.cpu().numpy(), target)
    depth = tree.depth.numpy()
    # argmax returns the first maximum: ties go to the lowest-index (top-1 first) node.
    node = int(np.argmax(np.where(ok, depth, -1)))
    n_acc = int(depth[node])
    path = tree.path_nodes.numpy()[node, :n_acc].tolist()
    tokens = target[[0, *path]].tolist()
    return Acceptance(node, n_acc, path, tokens)


def sample_targets(logits: torch.Tensor, temperature: float, top_p: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-node target tokens: argmax at temperature 0, else a top-p sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
