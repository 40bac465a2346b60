"""The Spec-Bench dev set shared with the project (never used for training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

TASK_GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
_DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "specbench-dev.jsonl"


def dev_set_path() -> Path:
    return Path(os.environ.get("MSN_DEV_SET", _DEFAULT))


def task_group(category: str) -> str:
    """Spec-Bench reports the eight MT-bench categories as one group."""
    return category if category in TASK_GROUPS else "mt_bench"


def load_questions(per_group: int | None = None, path: Path | None = None) -> list[dict]:
    """The first `per_group` questions of each task group in file order (all if None),
    grouped in TASK_GROUPS order; each row gains a `group` field."""
    path = path or dev_set_path()
    if not path.is_file():
        raise FileNotFoundError(f"Spec-Bench dev set not found at {path} (set MSN_DEV_SET)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    picked: dict[str, list[dict]] = {g: [] for g in TASK_GROUPS}
    for row in rows:
        group = picked[task_group(row["category"])]
        if per_group is None or len(group) < per_group:
            group.append({**row, "group": task_group(row["category"])})
    return [q for g in TASK_GROUPS for q in picked[g]]
