"""Argument parsing and summaries of the vLLM benchmark scripts (no engine runs here)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.vllm.ab_revisions import summarise
from benchmarks.vllm.bench_interleaved import plugin_variant


def test_plugin_variant_parses_name_and_settings():
    name, overrides = plugin_variant('small={"templates": ["tree-8"], "cost_aware": false}')
    assert name == "small"
    assert overrides == {"templates": ["tree-8"], "cost_aware": False}


@pytest.mark.parametrize("text,why", [
    ("noequals", "NAME=JSON"),
    ("=", "NAME=JSON"),
    ('plain={"mode": "chain"}', "new engine name"),  # would replace an engine of the run
    ("x={bad json", "x:"),
    ('x={"no_such_setting": 1}', "no_such_setting"),
    ('x={"mode": "sideways"}', "mode must be one of"),
])
def test_plugin_variant_rejects_bad_input(text, why):
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        plugin_variant(text)


def test_ab_summary_is_the_geometric_mean_ratio_per_cell():
    def run(side, tok_s, mat):
        return {"side": side, "summary": {"tree": {"1": {"qa": {"tok_s": tok_s, "mat": mat}}}}}

    runs = [run("A", 10.0, 2.0), run("B", 20.0, 2.0), run("B", 5.0, 2.0), run("A", 10.0, 2.0)]
    cell = summarise(runs)["tree"]["1"]["qa"]
    assert cell["A"] == [10.0, 10.0] and cell["B"] == [20.0, 5.0]
    assert cell["ratio_b_over_a"] == pytest.approx(1.0)  # sqrt(20 * 5) / 10
    assert cell["mat"] == {"A": [2.0, 2.0], "B": [2.0, 2.0]}


def test_geo_interval_brackets_the_geometric_mean():
    from benchmarks.vllm.bench_interleaved import geo_interval, geomean

    ratios = [0.9, 1.1, 1.0, 0.95, 1.05]
    lo, hi = geo_interval(ratios)
    assert min(ratios) <= lo <= geomean(ratios) <= hi <= max(ratios)
    assert geo_interval([1.2]) == (1.2, 1.2)  # one repeat: no spread to resample
    assert geo_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert geo_interval(ratios) == (lo, hi)  # fixed seed: the report is reproducible


def test_step_split_accounts_for_the_whole_wall_time():
    from benchmarks.vllm.bench_step_split import delta, summarise

    def stats(steps, seconds, draft, between, rungs):
        return {"paths": {"plain": {"steps": steps, "tokens": 8 * steps, "seconds": seconds},
                          "chain": {"steps": 0, "tokens": 0, "seconds": 0.0},
                          "tree": {"steps": 0, "tokens": 0, "seconds": 0.0}},
                "draft_seconds": draft, "between_steps_seconds": between, "rungs": rungs}

    s0 = stats(10, 1.0, 0.1, 0.2, {"none": 5})
    s1 = stats(30, 3.0, 0.2, 0.5, {"none": 9, "chain": 1})
    d = delta(s0, s1, wall=2.5)
    assert d["steps"] == 20 and d["steps_seconds"] == 2.0
    assert d["draft_seconds"] == 0.1 and d["between_seconds"] == 0.3
    assert d["other_seconds"] == 0.1  # 2.5 - 2.0 - 0.1 - 0.3
    assert d["rungs"] == {"none": 4, "chain": 1}
    rows = [{"group": "qa", "on": d, "off": {**d, "wall": 5.0}}]
    assert summarise(rows)["qa"]["speedup_on_over_off"] == 2.0
