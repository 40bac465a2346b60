"""A template compiled to the tensors one TR-Jacobi step needs.

Node 0 is the root (the last accepted token); nodes 1..N follow in BFS order (by depth),
so every parent precedes its children. That order is what makes two things safe: any
prefix of the node list is still a valid subtree (a scheduler may truncate it), and KV
compaction can copy accepted rows in increasing depth without overwriting a pending
source (node index >= node depth).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from proposers.templates import RETRIEVAL, TreeTemplate


@dataclass(frozen=True, eq=False)
class TreeSpec:
    template: TreeTemplate
    depth: torch.Tensor  # [N+1] long, root 0
    parent: torch.Tensor  # [N+1] long, root -1
    column: torch.Tensor  # [N+1] long, root -1, retrieval = top_k
    ancestors: torch.Tensor  # [N+1, N+1] bool, ancestor-or-self (row attends to column)
    path_nodes: torch.Tensor  # [N+1, D] long: nodes of depth 1..depth(i) on i's path, -1 pad
    first_child: torch.Tensor  # [N+1] long, lowest-index child or -1
    _subtrees: dict = field(default_factory=dict, repr=False)
    _chains: dict = field(default_factory=dict, repr=False)  # feedback_chain memo

    @property
    def num_nodes(self) -> int:
        """Draft nodes (excluding the root)."""
        return self.depth.numel() - 1

    @property
    def max_depth(self) -> int:
        return self.path_nodes.shape[1]

    @functools.cached_property
    def max_node_depth(self) -> int:
        """Depth of the deepest node present (0 for a root-only tree); `max_depth` is
        the template's."""
        return int(self.depth.max())

    @property
    def retrieval_column(self) -> int:
        return self.template.top_k

    @property
    def is_chain(self) -> bool:
        """Every node's parent is the node before it (plain Jacobi / retrieval chains)."""
        return bool((self.parent[1:] == torch.arange(self.num_nodes,
                                                     device=self.parent.device)).all())

    def to(self, device: torch.device | str) -> TreeSpec:
        return TreeSpec(
            self.template,
            *(t.to(device) for t in (self.depth, self.parent, self.column, self.ancestors,
                                     self.path_nodes, self.first_child)),
        )

    def subtree(self, keep: torch.Tensor) -> TreeSpec:
        """The tree restricted to `keep` (root + an ancestor-closed set, BFS order)."""
        key = tuple(keep.tolist())
        if len(key) == self.num_nodes + 1:
            return self
        if key not in self._subtrees:
            paths = tuple(self.template.paths[i - 1] for i in key[1:])
            t = self.template
            sub = TreeTemplate(f"{t.name}[{len(paths)}]", t.top_k, t.max_depth, paths)
            self._subtrees[key] = compile_tree(sub).to(self.depth.device)
        return self._subtrees[key]

    def positions(self, root_position: int | torch.Tensor) -> torch.Tensor:
        """RoPE positions of root + nodes: a node sits at prefix length + its depth."""
        return root_position + self.depth

    def feedback_chain(self, node: int) -> list[int]:
        """Nodes below `node` whose logits predict the next step's depths 1, 2, ...

        After accepting up to `node`, its children hold wrong guesses for the bonus
        token's slot; their outputs still predict the tokens after it (Jacobi
        feedback). We follow lowest-index children, i.e. the top-1 branch. (Memoized:
        the runners ask every step.)
        """
        if node not in self._chains:
            chain = []
            child = int(self.first_child[node])
            while child >= 0:
                chain.append(child)
                child = int(self.first_child[child])
            self._chains[node] = chain
        return list(self._chains[node])


def compile_tree(template: TreeTemplate) -> TreeSpec:
    # Stable sort by depth: BFS order, and spec.template.paths[i - 1] is node i's path.
    paths = sorted(template.paths, key=len)
    template = dataclasses.replace(template, paths=tuple(paths))
    index = {(): 0}
    for i, path in enumerate(paths, start=1):
        index[path] = i
    n = len(paths) + 1
    depth_max = max((len(p) for p in paths), default=0)
    depth = torch.zeros(n, dtype=torch.long)
    parent = torch.full((n,), -1, dtype=torch.long)
    column = torch.full((n,), -1, dtype=torch.long)
    ancestors = torch.eye(n, dtype=torch.bool)
    path_nodes = torch.full((n, max(depth_max, 1)), -1, dtype=torch.long)
    first_child = torch.full((n,), -1, dtype=torch.long)
    for path, i in ((p, index[p]) for p in paths):
        depth[i] = len(path)
        parent[i] = index[path[:-1]]
        col = path[-1]
        column[i] = template.top_k if col == RETRIEVAL else col
        for d in range(len(path) + 1):
            ancestors[i, index[path[:d]]] = True
        for d in range(1, len(path) + 1):
            path_nodes[i, d - 1] = index[path[:d]]
        p = int(parent[i])
        if first_child[p] < 0:
            first_child[p] = i
    return TreeSpec(template, depth, parent, column, ancestors, path_nodes, first_child)
