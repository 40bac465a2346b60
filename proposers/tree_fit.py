"""Tree templates fitted to measured acceptance (algorithm.md section 5, ours).

A TR-Jacobi step accepts the deepest node whose whole path holds the tokens the model
goes on to emit. Which (depth, column) slots of the candidate table hold those tokens
does not depend on the tree that is verified: record the table at every step of greedy
generations (`ReferenceRunner.stream(observe=...)`), compare it with the tokens that
followed, and the accepted length of *any* template on those steps is known without
running it. The correct nodes of a step are prefix-closed (a node is correct only if its
parent is), so a template's accepted length on a step is the number of depths at which
some node of it is correct, and its expected accepted length is the sum over depths of
the share of steps where one is (`expected_accepted`).

`fit_template` grows a template greedily: each round adds the node, or the node and one
child of it, that adds the most expected accepted tokens per node (a node right only on
steps that other nodes at its depth already cover adds nothing by itself but can still
lead somewhere: the look-ahead of one child sees that). The candidate table itself
depends a little on the tree (Jacobi feedback comes from the chosen path's nodes), and
calibration prompts are not the benchmark's, so a fitted template is checked by running
it (`bench_methods --methods ar,tr-jacobi@FILE.json`); `benchmarks/reference/fit_tree.py`
records, fits and scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from proposers.candidates import EMPTY
from proposers.templates import RETRIEVAL, TemplateError, TreeTemplate


def slot_hits(table: np.ndarray, truth: Sequence[int]) -> np.ndarray:
    """[D, C] bool: slot (d, c) of one step's candidate table (`EMPTY` where noise went)
    holds the token emitted at depth d + 1. `truth` holds the tokens that followed the
    root, as many as are known (depths past its end count as misses)."""
    depth = table.shape[0]
    known = np.full(depth, EMPTY, dtype=np.int64)
    tail = np.asarray(truth[:depth], dtype=np.int64)
    known[: tail.size] = tail
    return (table == known[:, None]) & (table != EMPTY)  # an unknown depth is EMPTY too


class AcceptanceRecord:
    """Slot hits of many steps. Pass `observe` to `ReferenceRunner.stream`, then `close`
    with the request's prompt + output once it is done."""

    def __init__(self) -> None:
        self._pending: list[tuple[np.ndarray, int]] = []
        self._hits: list[np.ndarray] = []

    def observe(self, table: np.ndarray, position: int) -> None:
        self._pending.append((table, position))

    def close(self, sequence: Sequence[int]) -> None:
        seq = np.asarray(sequence, dtype=np.int64)
        self._hits += [slot_hits(t, seq[pos + 1:]) for t, pos in self._pending]
        self._pending = []

    def __len__(self) -> int:
        return len(self._hits)

    @property
    def hits(self) -> np.ndarray:
        """[steps, depth, top_k + 1] bool; the last column is the retrieval chain."""
        if not self._hits:
            raise ValueError("no steps recorded")
        return np.stack(self._hits)


def save_hits(path: Path, hits: np.ndarray) -> None:
    np.savez_compressed(path, hits=hits)


def load_hits(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["hits"]


def _column(col: int | str, top_k: int) -> int:
    return top_k if col == RETRIEVAL else int(col)


def path_hits(hits: np.ndarray, path: Sequence[int | str]) -> np.ndarray:
    """[steps] bool: every node of `path` (columns per depth) holds the emitted token."""
    top_k = hits.shape[2] - 1
    ok = np.ones(hits.shape[0], dtype=bool)
    for d, col in enumerate(path):
        ok &= hits[:, d, _column(col, top_k)]
    return ok


def expected_accepted(hits: np.ndarray, template: TreeTemplate) -> float:
    """Mean draft tokens a step of `template` accepts on the recorded steps (MAT - 1)."""
    steps, depth, width = hits.shape
    if template.depth > depth or template.top_k > width - 1:
        raise TemplateError(
            f"template {template.name!r} ({template.depth} deep, top-{template.top_k}) needs "
            f"a record at least as deep and wide; this one is {depth} deep, top-{width - 1}")
    covered = np.zeros((depth + 1, steps), dtype=bool)
    for path in template.paths:
        covered[len(path)] |= path_hits(hits, path)
    return float(covered.mean(axis=1).sum())


def fit_template(hits: np.ndarray, num_nodes: int, *, name: str, max_depth: int | None = None,
                 top_k: int | None = None, description: str = "") -> TreeTemplate:
    """The template of at most `num_nodes` draft nodes the greedy fit finds on `hits`
    (columns: the first `top_k` Jacobi columns and the retrieval chain; at most
    `max_depth` deep). Stops early when no node adds anything."""
    steps, depth, width = hits.shape
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    depth = min(depth, max_depth or depth)
    jacobi = min(width - 1, top_k or width - 1)
    cols = [*range(jacobi), width - 1]  # table columns the template may use
    labels: list[int | str] = [*range(jacobi), RETRIEVAL]
    table = hits[:, :depth][:, :, cols]  # [S, D, len(cols)]
    covered = np.zeros((depth + 2, steps), dtype=bool)
    chosen: dict[tuple, np.ndarray] = {(): np.ones(steps, dtype=bool)}
    children: dict[tuple, set[int]] = {(): set()}
    order: list[tuple] = []
    while len(order) < num_nodes:
        best = (0.0, None, None)  # (gain per node, path, child path or None)
        for parent, ok in chosen.items():
            d = len(parent) + 1
            if d > depth:
                continue
            right = ok[:, None] & table[:, d - 1]  # [S, cols]: the child's path is right
            gain = (right & ~covered[d][:, None]).mean(axis=0)
            for j in range(len(cols)):
                if j in children[parent]:
                    continue
                if gain[j] > best[0]:
                    best = (float(gain[j]), parent + (labels[j],), None)
                if d < depth and len(order) + 2 <= num_nodes:
                    deeper = right[:, j, None] & table[:, d] & ~covered[d + 1][:, None]
                    k = int(deeper.mean(axis=0).argmax())
                    pair = (gain[j] + deeper[:, k].mean()) / 2
                    if pair > best[0]:
                        best = (float(pair), parent + (labels[j],), parent + (labels[j], labels[k]))
        if best[1] is None:
            break
        for path in (best[1], best[2]):
            if path is None:
                continue
            parent, j = path[:-1], labels.index(path[-1])
            ok = chosen[parent] & table[:, len(path) - 1, j]
            chosen[path], children[path] = ok, set()
            children[parent].add(j)
            covered[len(path)] |= ok
            order.append(path)
    if not order:
        raise ValueError("no node of any tree is ever right on these steps: nothing to fit")
    used = [c for p in order for c in p if c != RETRIEVAL]
    return TreeTemplate(
        name=name, top_k=max(used, default=0) + 1, max_depth=max(len(p) for p in order),
        paths=tuple(sorted(order, key=len)), description=description)
