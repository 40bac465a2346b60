"""Local-text task prompts and data-set helpers (training/data.py), without a model."""

from __future__ import annotations

import random

import pytest

from training.data import (
    BuildConfig,
    _split,
    assert_not_benchmark,
    doc_passages,
    scan_stdlib,
    stdlib_files,
    task_prompts,
    user_turn_prefix,
)

FEW = ("textwrap", "shlex", "fnmatch", "glob", "bisect")


@pytest.fixture(scope="module")
def few_files():
    files = [p for p in stdlib_files() if p.stem in FEW and p.parent.name != "test"]
    assert files
    return files


def test_stdlib_scan_finds_code_and_prose(few_files):
    found = scan_stdlib(few_files)
    assert found.code and found.passages
    unit = found.code[0]
    assert unit.source.lstrip().startswith(("def ", "async def ")) and unit.doc


def test_task_prompts_are_deterministic_and_mixed(few_files, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text(("A paragraph about servers and caches. " * 12 + "\n\n") * 3)
    a = task_prompts(40, [docs], random.Random(3), few_files)
    b = task_prompts(40, [docs], random.Random(3), few_files)
    assert a == b and len(a) == 40
    assert {s for s, _, _ in a} >= {"code", "summarize", "qa", "rewrite", "translate", "math"}
    assert any(o == "docs:guide.md" for _, o, _ in a)


def test_benchmark_files_are_refused(tmp_path):
    with pytest.raises(ValueError):
        assert_not_benchmark(tmp_path / "specbench-dev.jsonl")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "mt_bench_questions.md").write_text("x " * 400)
    with pytest.raises(ValueError):
        list(doc_passages([folder]))


def test_split_is_stable_and_near_the_fraction():
    prompts = [f"prompt number {i}" for i in range(4000)]
    held = [p for p in prompts if _split(p, 0.05) == "heldout"]
    assert [_split(p, 0.05) for p in held] == ["heldout"] * len(held)
    assert 120 < len(held) < 280  # binomial(4000, 0.05): mean 200, sd 14


def test_user_turn_prefix_from_template():
    from tests.test_training_collator import CHATML

    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
            from jinja2 import Template
            return Template(CHATML).render(messages=messages,
                                           add_generation_prompt=add_generation_prompt)

    assert user_turn_prefix(Tok()).endswith("<|im_start|>user\n")


def test_build_config_validation(tmp_path):
    with pytest.raises(ValueError):
        BuildConfig(output=tmp_path / "x.jsonl", model_path=tmp_path, num_magpie=0, num_tasks=0)
    with pytest.raises(ValueError):
        BuildConfig(output=tmp_path / "x.jsonl", model_path=tmp_path, shard=(1, 1))
