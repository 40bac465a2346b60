"""Tree templates: which (depth, column) candidates a TR-Jacobi step verifies.

A template is data (JSON under `proposers/templates/`): a list of nodes, each a path of
column indices from depth 1 down to the node. Column `c < top_k` is the c-th best token
the model predicted for that depth at the previous step; column "R" is the retrieval
chain. A node's token depends only on its depth and column (algorithm.md section 4), so
the same column at the same depth carries the same token under every parent.

Validation on load makes a bad template fail with one clear line instead of producing a
tree that silently verifies garbage: paths must be prefix-closed (every node's parent is
a node), unique, within `max_depth`, with columns below `top_k` or "R".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

RETRIEVAL = "R"
TEMPLATE_DIR = "templates"


class TemplateError(ValueError):
    """A template file or definition that cannot be used."""


@dataclass(frozen=True, slots=True)
class TreeTemplate:
    """A validated template. `paths[i]` is node i+1's column path (root is implicit)."""

    name: str
    top_k: int
    max_depth: int
    paths: tuple[tuple[int | str, ...], ...]
    description: str = ""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise TemplateError(f"template {self.name!r}: top_k must be >= 1, got {self.top_k}")
        if self.max_depth < 1:
            raise TemplateError(f"template {self.name!r}: max_depth must be >= 1")
        seen: set[tuple] = set()
        for path in self.paths:
            if not path:
                raise TemplateError(f"template {self.name!r}: empty path (the root is implicit)")
            if len(path) > self.max_depth:
                raise TemplateError(
                    f"template {self.name!r}: path {list(path)} deeper than max_depth "
                    f"{self.max_depth}"
                )
            for col in path:
                if col != RETRIEVAL and not (isinstance(col, int) and 0 <= col < self.top_k):
                    raise TemplateError(
                        f"template {self.name!r}: column {col!r} in {list(path)} is neither "
                        f"0..{self.top_k - 1} nor {RETRIEVAL!r}"
                    )
            if path in seen:
                raise TemplateError(f"template {self.name!r}: duplicate path {list(path)}")
            seen.add(path)
        for path in self.paths:
            if len(path) > 1 and path[:-1] not in seen:
                raise TemplateError(
                    f"template {self.name!r}: path {list(path)} has no parent node "
                    f"{list(path[:-1])} (templates must be prefix-closed)"
                )

    @property
    def num_nodes(self) -> int:
        """Draft nodes, not counting the root."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def uses_retrieval(self) -> bool:
        return any(RETRIEVAL in p for p in self.paths)

    @classmethod
    def from_dict(cls, data: dict, name: str | None = None) -> TreeTemplate:
        try:
            paths = tuple(
                tuple(c if isinstance(c, str) else int(c) for c in p) for p in data["paths"]
            )
            return cls(
                name=name or data.get("name", "custom"),
                top_k=int(data["top_k"]),
                max_depth=int(data.get("max_depth", max((len(p) for p in paths), default=1))),
                paths=paths,
                description=data.get("description", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, TemplateError):
                raise
            raise TemplateError(f"template {name or data.get('name')!r}: malformed: {exc}") from None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "top_k": self.top_k,
            "max_depth": self.max_depth,
            "paths": [list(p) for p in self.paths],
        }


def chain(length: int, column: int | str = 0, top_k: int = 1, name: str | None = None) -> TreeTemplate:
    """A single chain: plain Jacobi (column 0) or prompt lookup (column R)."""
    paths = tuple((column,) * d for d in range(1, length + 1))
    kind = "retrieval" if column == RETRIEVAL else "jacobi"
    return TreeTemplate(
        name=name or f"{kind}-chain-{length}", top_k=top_k, max_depth=max(length, 1), paths=paths
    )


def available() -> list[str]:
    folder = resources.files("proposers") / TEMPLATE_DIR
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_template(name_or_path: str) -> TreeTemplate:
    """A bundled template by name (see `available()`), or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text, name = path.read_text(), path.stem
    else:
        res = resources.files("proposers") / TEMPLATE_DIR / f"{name_or_path}.json"
        if not res.is_file():
            raise TemplateError(
                f"unknown template {name_or_path!r}; bundled: {', '.join(available())} "
                "(or give a path to a .json file)"
            )
        text, name = res.read_text(), name_or_path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"template {name!r} is not valid JSON: {exc}") from None
    return TreeTemplate.from_dict(data, name=name)
