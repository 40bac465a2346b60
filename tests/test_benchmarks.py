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
