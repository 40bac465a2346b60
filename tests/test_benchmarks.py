"""Argument parsing and summaries of the vLLM benchmark scripts (no engine runs here)."""

from __future__ import annotations

import argparse
import math

import pytest

from benchmarks.vllm.ab_revisions import summarise
from benchmarks.vllm.bench_interleaved import plugin_variant, spec_variant


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


def test_spec_variant_parses_a_vllm_speculative_config():
    name, config = spec_variant('ngram64={"method": "ngram", "num_speculative_tokens": 4, '
                                '"prompt_lookup_min": 64, "prompt_lookup_max": 64}')
    assert name == "ngram64"
    assert config["method"] == "ngram" and config["prompt_lookup_min"] == 64


@pytest.mark.parametrize("text,why", [
    ("noequals", "NAME=JSON"),
    ('ngram={"method": "ngram"}', "new engine name"),  # the --ngram engine's name
    ("x={bad json", "x:"),
    ('x=[1, 2]', "method"),
    ('x={"num_speculative_tokens": 4}', "method"),
])
def test_spec_variant_rejects_bad_input(text, why):
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        spec_variant(text)


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
    assert d["propose_seconds"] == {}  # counters without the proposer's phases
    s0["propose_seconds"] = {"lookup": 0.01, "plan": 0.02}
    s1["propose_seconds"] = {"lookup": 0.04, "plan": 0.05}
    assert delta(s0, s1, wall=2.5)["propose_seconds"] == {"lookup": 0.03, "plan": 0.03}
    rows = [{"group": "qa", "on": d, "off": {**d, "wall": 5.0}}]
    assert summarise(rows)["qa"]["speedup_on_over_off"] == 2.0
    assert "plain" not in summarise(rows)["qa"]
    # --plain: plain vLLM's row, from the timing worker's counters, in the same split.
    rows[0]["plain"] = {**d, "wall": 4.0}
    cell = summarise(rows)["qa"]
    assert cell["plain"]["wall"] == 4.0 and cell["speedup_off_over_plain"] == 0.8


def test_timing_worker_counts_steps_and_the_gaps_between_them(monkeypatch):
    """The plain engine's step clock (`--plain`): a step runs from execute_model to the
    end of sample_tokens; a short gap before the next step counts, an idle one not."""
    from types import SimpleNamespace

    from vllm.v1.worker.cpu_worker import CPUWorker

    from benchmarks.vllm import timing_worker
    from benchmarks.vllm.timing_worker import TimingCPUWorker

    clock = iter([0.0, 0.05, 0.06, 0.11, 5.0, 5.05])
    monkeypatch.setattr(timing_worker.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(CPUWorker, "init_device", lambda self: None)
    monkeypatch.setattr(CPUWorker, "execute_model", lambda self, so: None)
    monkeypatch.setattr(CPUWorker, "sample_tokens", lambda self, go: "output")
    worker = object.__new__(TimingCPUWorker)
    worker.init_device()
    for _ in range(3):
        worker.execute_model(SimpleNamespace(total_num_scheduled_tokens=8))
        assert worker.sample_tokens(None) == "output"
    stats = worker.trjacobi_stats()
    assert stats["paths"]["plain"]["steps"] == 3 and stats["paths"]["plain"]["tokens"] == 24
    assert abs(stats["paths"]["plain"]["seconds"] - 0.15) < 1e-9
    assert abs(stats["between_steps_seconds"] - 0.01) < 1e-9  # 0.05 -> 0.06; 0.11 -> 5.0 idle


def test_interleaved_markdown_reports_every_engine_and_group():
    from benchmarks.vllm.bench_interleaved import TWIN, markdown, paired_summary

    engines = ["plain", "plugin", TWIN]
    rows = [{"repeat": rep, "group": g, "batch": 8,
             "tokens": {n: 100 for n in engines},
             "seconds": {"plain": 1.0, "plugin": 0.5 if g == "translation" else 1.0, TWIN: 1.0},
             "tok_s": {"plain": 100.0, "plugin": 200.0 if g == "translation" else 100.0,
                       TWIN: 100.0},
             # drafted request-steps, accepted draft tokens (plain engines: no drafter)
             "spec": {"plugin": [10, 30] if g == "translation" else [0, 0]}}
            for rep in range(2) for g in ("qa", "translation")]
    summary = paired_summary(rows, engines)
    assert summary["8"]["plugin"]["translation"]["mat"] == 4.0
    assert summary["8"]["plugin"]["qa"]["mat"] is None  # never drafted
    assert summary["8"]["plugin"]["overall"]["mat"] == 4.0  # 60 accepted in 20 steps
    assert summary["8"][TWIN]["overall"]["mat"] is None
    text = markdown(summary)
    lines = text.splitlines()
    assert lines[0].startswith("batch 8, ratio to plain vLLM (both plain engines)")
    assert "| engine | translation | qa | overall (tok/s) |" in lines
    plugin = next(line for line in lines if line.startswith("| plugin"))
    assert "2.00 (2.00-2.00)" in plugin and "1.00 (1.00-1.00)" in plugin
    assert plugin.endswith("| 1.33 (133.3) |")  # 400 tokens in 3 s against 4 s
    mats = lines[lines.index(next(x for x in lines if x.startswith("batch 8, MAT"))):]
    assert "| plugin (TR-Jacobi, planned) | 4.00 | - | 4.00 |" in mats
    assert not any(x.startswith("| plain vLLM") for x in mats)  # no drafter, no MAT row


def test_spec_counts_read_vllms_per_request_acceptance():
    from types import SimpleNamespace

    stats = pytest.importorskip("vllm.v1.metrics.stats")

    from benchmarks.vllm.bench_interleaved import spec_counts

    def out(metrics):
        return SimpleNamespace(outputs=[SimpleNamespace(spec_decode_metrics=metrics)])

    a, b = stats.RequestSpecDecodeMetrics.new(4), stats.RequestSpecDecodeMetrics.new(4)
    a.observe(4, 3)
    a.observe(4, 0)
    b.observe(2, 2)
    assert spec_counts([out(a), out(b)]) == [3, 5]
    assert spec_counts([out(None), out(None)]) is None  # plain engine


def test_step_costs_groups_decode_steps_by_size():
    from benchmarks.vllm.step_costs import summarise

    lines = [{"step": 1, "path": "kernel", "batch": 1, "tokens": 1, "prefill": 0, "seconds": s}
             for s in (0.030, 0.040, 0.050)]
    lines += [{"step": 2, "path": "kernel", "batch": 1, "tokens": 40, "prefill": 39, "seconds": 0.2},
              {"step": 2, "path": "kernel", "batch": 1, "tokens": 5, "prefill": 0, "seconds": 0.033},
              {"step": 3, "features": [1], "lines": {"kernel": [0.03, 0.002],
                                                     "kernel@1": [0.035, 0.001], "tree": None}}]
    out = summarise(lines)
    assert out["lines"]["kernel@1"] == [0.035, 0.001]
    one, five = out["rows"]  # the prefill step is left out
    assert (one["tokens"], one["steps"], one["median_ms"], one["mean_ms"]) == (1, 3, 40.0, 40.0)
    assert one["line_ms"] == 36.0 and five["line_ms"] == 40.0  # the batch bucket's own line


def test_generate_workload_runs_batch_one_sequentially_and_batches_cycling():
    from benchmarks.vllm.bench_vllm import generate_workload

    calls = []

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            calls.append(list(prompts))
            return [f"out:{p}" for p in prompts]

    assert generate_workload(FakeLLM(), ["a", "b"], None, 1) == ["out:a", "out:b"]
    assert calls == [["a"], ["b"]]
    calls.clear()
    assert len(generate_workload(FakeLLM(), ["a", "b", "c"], None, 8)) == 8
    assert calls == [["a", "b", "c", "a", "b", "c", "a", "b"]]


def test_generate_workload_rounds_and_a_fresh_corpus():
    """`rounds` repeats the whole workload in a row (the second round is the repeated
    request the shared corpus serves); `fresh_corpus` clears a plugin engine's corpus
    before anything runs."""
    from benchmarks.vllm.bench_vllm import generate_workload

    calls = []

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            calls.append(list(prompts))
            return [f"out:{p}" for p in prompts]

        def collective_rpc(self, method):
            calls.append(method)

    outs = generate_workload(FakeLLM(), ["a", "b"], None, 1, fresh_corpus=True, rounds=2)
    assert outs == ["out:a", "out:b"] * 2
    assert calls == ["trjacobi_clear_corpus", ["a"], ["b"], ["a"], ["b"]]
    calls.clear()
    assert len(generate_workload(FakeLLM(), ["a", "b", "c"], None, 4, rounds=2)) == 8
    assert calls == [["a", "b", "c", "a"]] * 2


def test_retrieval_sources_replays_both_sources():
    """The offline replay behind the proposer's choice of retrieval source: the second
    request of a group finds the first one's answer in the corpus where its own context
    has no match, and counts what that chain would have had accepted."""
    from benchmarks.vllm.retrieval_sources import matched, simulate

    assert matched([4, 5, 6], [4, 5, 7]) == 2 and matched([4], []) == 0
    groups = {"g": [{"prompt": [1, 2, 3], "output": [10, 11, 12, 13]},
                    {"prompt": [7, 2, 3], "output": [10, 11, 12, 99]}]}
    run = simulate(groups, clear_every=2)
    assert run["positions"] == 6
    # Second request: "2 3 10" continues 11 12 13 in the corpus; the answer went on
    # 11 12 99, so 2 tokens, then 1 ("12 13" against "12 99"), then 0.
    cell = next(c for c in run["pairs"] if (c["own_n"], c["corpus_m"]) == (0, 3))
    assert cell["positions"] == 3 and cell["corpus_accepted"] == 1.0 and not cell["long"]
    assert run["rules"]["own only"] == 0.0
    assert run["rules"]["corpus if no own match"] == 0.5
    alone = simulate(groups, clear_every=1)  # the corpus is cleared before each request
    assert alone["rules"]["corpus if no own match"] == 0.0
    # Asked again: in the second round (the only one counted) the corpus holds the first
    # round's answer, led in by the prompt's end, so its matches run back CORPUS_LONG
    # tokens and its chains are the answer itself.
    one = {"g": [{"prompt": [1, 2, 3, 4, 5, 6], "output": [10, 11, 12, 13, 14, 15]}]}
    again = simulate(one, clear_every=2, rounds=2)
    assert again["positions"] == 5 and any(c["long"] for c in again["pairs"])
    assert again["rules"]["own only"] == 0.0
    # t = 1..5: chains 11-15, 12-15, 13-15, 14-15, 15: 5 + 4 + 3 + 2 + 1 tokens.
    assert again["rules"]["default: corpus if no own match or long"] == 3.0


def test_kernel_variant_ab_smoke(tmp_path):
    """The key-loop A/B script end to end on tiny shapes under the Triton interpreter:
    every variant and an extra tile timed per case, ratios to the baseline written."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "ab.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "benchmarks/kernels/ab_kernel_variant.py", "--smoke",
                    "--tree-sizes", "4", "--rounds", "1", "--variants", "old", "new",
                    "--extra-tiles", "[[16, 32, 4, 2]]", "--out", str(out)],
                   check=True, env=env, capture_output=True, text=True)
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2  # the two smoke models
    for row in data["rows"]:
        assert set(row["us"]) >= {"old", "new"} and row["ratio_to_old"]["old"] == 1.0
        assert any(name.startswith("new@") for name in row["us"])
    assert out.with_suffix(".png").stat().st_size > 0  # the plot beside the JSON


def test_fp32_tile_sweep_smoke(tmp_path):
    """The float32 launch-shape sweep end to end on tiny shapes under the Triton
    interpreter: the default tile, each grid tile (checked against it) and SDPA timed per
    case, the fastest tile named; a malformed --grid is a one-line usage error (exit 2)."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "fp32.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "benchmarks/kernels/bench_fp32_tiles.py", "--smoke",
                    "--grid", "[[16, 16, 2, 2]]", "--out", str(out)],
                   check=True, env=env, capture_output=True, text=True)
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4  # two smoke models x decode and a 4-node tree
    for row in data["rows"]:
        assert row["dtype"] == "float32" and {"default", "sdpa"} <= set(row["us"])
        assert row["best"] in row["us"] or row["best"] is None
        assert not row["errors"], row["errors"]
    assert out.with_suffix(".png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "benchmarks/kernels/bench_fp32_tiles.py", "--smoke",
                          "--grid", "[[16, 16]]", "--out", str(out)],
                         check=False, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--grid" in bad.stderr.strip().splitlines()[-1]


def test_tree_attention_bench_block_orders(tmp_path):
    """The kernel benchmark under both paged-pool layouts, end to end on a tiny shape
    under the Triton interpreter: each case once per order, back to back, the order in
    each row; a sequential pool hands each sequence consecutive blocks."""
    import json
    import os
    import subprocess
    import sys

    import torch

    from benchmarks.kernels.bench_tree_attention import Case

    seq = Case("tiny-gqa4", 2, 40, 1, torch.float32, torch.device("cpu"), block_order="sequential")
    blocks = seq.tables.shape[-1]
    assert torch.equal(seq.tables.flatten(), torch.arange(seq.tables.numel(), dtype=torch.int32))
    assert blocks == 3  # 41 positions in blocks of 16
    with pytest.raises(ValueError, match="block_order"):
        Case("tiny-gqa4", 2, 40, 1, torch.float32, torch.device("cpu"), block_order="shuffled")
    out = tmp_path / "bo.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "benchmarks/kernels/bench_tree_attention.py", "--smoke",
                    "--phase", "final", "--models", "tiny-gqa4", "--prefix-lens", "40",
                    "--tree-sizes", "1", "--block-order", "random", "sequential",
                    "--out", str(out)], check=True, env=env, capture_output=True, text=True)
    rows = json.loads(out.read_text())
    assert [r["block_order"] for r in rows] == ["random", "sequential"]
    assert all(r["ours"] > 0 and r["sdpa"] > 0 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 0
    # The other phases lay out random blocks only: asking otherwise is a usage error.
    bad = subprocess.run([sys.executable, "benchmarks/kernels/bench_tree_attention.py",
                          "--phase", "splits", "--block-order", "sequential"],
                         check=False, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--block-order applies to --phase final" in bad.stderr


def test_proposer_host_replay(tmp_path):
    """The proposer's host-time replay on the committed greedy answers: two configs side
    by side, every step timed by phase, the planner fed outcomes judged on the real text;
    a bad config is a one-line usage error."""
    import json
    import subprocess
    import sys

    from benchmarks.vllm.bench_proposer_host import accepted_tokens, main

    out = tmp_path / "host"
    main(["--repeats", "1", "--batch", "4", "--groups", "rag", "--configs",
          "{}", '{"chain_cuts": [2]}', "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    cells = data["groups"]["rag"]
    assert list(cells) == ["{}", '{"chain_cuts": [2]}']
    for cell in cells.values():
        assert cell["steps"] > 0 and cell["propose_us"] > 0
        assert set(cell["phases_us"]) == {"lookup", "shadows", "plan", "draft"}
    assert cells["{}"]["model_ratio_to_first"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "benchmarks.vllm.bench_proposer_host",
                          "--configs", '{"max_ngram": 9}'], check=False,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "max_ngram" in bad.stderr.strip().splitlines()[-1]

    # Acceptance as greedy verification: the deepest node spelling the real text.
    from proposers.templates import chain
    from proposers.tree import compile_tree
    from proposers.vllm.proposer import DraftPlan

    plan = DraftPlan("chain", compile_tree(chain(3)), (7, 8, 9))
    assert accepted_tokens(plan, [7, 8, 1]) == 2 and accepted_tokens(plan, [1]) == 0
    assert accepted_tokens(plan, [7, 8, 9, 4]) == 3 and accepted_tokens(plan, [7]) == 1


def test_planner_shortcuts_change_no_decision():
    """The planner's host-time shortcuts (memoized estimates and rung options, the
    bounds that skip plans which cannot pay) plan exactly what the plain computation
    does: replayed on real answers, every step's rungs are the same."""
    import json

    from benchmarks.vllm.bench_proposer_host import STEP_COST, STREAMS, make_proposer, replay
    from proposers.vllm.planner import CostPlanner

    class NoMemo(dict):
        def __setitem__(self, key, value):  # stores nothing: every lookup computed afresh
            pass

    class Plain(CostPlanner):
        def _dinkelbach(self, *a, **kw):
            self._options_memo = NoMemo()
            return super()._dinkelbach(*a, **kw)

        def _rate_bounds(self, *a):
            return float("inf"), float("inf")  # every plan built and priced

    streams = json.loads(STREAMS.read_text())["groups"]

    def decisions(shortcuts: bool, group: str, batch: int, cost: dict) -> list:
        # Every step planned: idle planning (proposer.PlanValue) picks the steps to
        # plan from measured host time, which the plain computation's is not.
        p = make_proposer(idle_planning=False)
        planner = p.planner
        if not shortcuts:
            planner.__class__ = Plain
            planner._known_memo = NoMemo()
        seen = []
        plan = planner.plan
        planner.plan = lambda *a, **kw: seen.append(plan(*a, **kw)) or seen[-1]
        replay(p, streams[group], batch, cost)
        return seen

    # Batch 8 on this machine's cost lines, and batch 2 on a tree path as cheap as the
    # kernel's (where tree plans win some steps).
    cheap_trees = {"kernel": STEP_COST["kernel"], "tree": STEP_COST["kernel"]}
    trees = 0
    for group, batch, cost in (("rag", 8, STEP_COST), ("math_reasoning", 8, STEP_COST),
                               ("rag", 2, cheap_trees), ("qa", 2, cheap_trees)):
        fast, plain = decisions(True, group, batch, cost), decisions(False, group, batch, cost)
        assert len(fast) > 50 and fast == plain
        assert any(r != "none" for step in fast for r in step)  # some steps drafted
        trees += sum(r.startswith(("tree", "paper")) for step in fast for r in step)
    assert trees  # and some drafted trees (a test of the tree bound)


def test_host_ops_benchmark(tmp_path):
    """The argmax benchmark on tiny shapes: every op timed, numpy's checked against torch;
    a bad argument is a one-line usage error (exit 2)."""
    import json
    import subprocess
    import sys

    from benchmarks.vllm.bench_host_ops import main

    out = tmp_path / "ops"
    main(["--rows", "1", "3", "--vocab", "1280", "--k", "3", "--rounds", "1", "--inner", "1",
          "--threads", "1", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["rows"] for r in data["rows"]] == [1, 3]
    for r in data["rows"]:
        assert {"argmax_torch", "argmax_numpy", "top3_torch"} <= set(r["us"])
        assert r["argmax_speedup_vs_torch"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "benchmarks.vllm.bench_host_ops", "--k", "0"],
                         check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "--k" in bad.stderr.strip().splitlines()[-1]


def test_load_level_records_each_prompts_text_for_the_comparison():
    """`run_level` keeps which prompt each request sent and its streamed text, which the
    plugin-vs-plain HTTP comparison (`benchmarks/load/compare.py`) matches across servers."""
    import asyncio

    from benchmarks.load.client import run_level
    from benchmarks.load.compare import mismatches
    from server.app import create_app
    from server.settings import ServerSettings
    from tests.server_support import FAKE_MODEL, FakeEngine, ServerThread

    with ServerThread(create_app(ServerSettings(), FakeEngine())) as srv:
        result, records = asyncio.run(run_level(srv.url, FAKE_MODEL, ["ab", "cde", "f"], 2, 5,
                                                60, 6))
    assert result.completed == 5
    assert sorted(r.prompt_index for r in records) == [0, 0, 1, 1, 2]
    texts = {r.prompt_index: r.text for r in records}
    assert all(len(t) > 0 for t in texts.values())
    assert mismatches(texts, dict(texts)) == []
    assert mismatches(texts, {**texts, 1: texts[1] + "x", 7: "only here"}) == [1]


def _load_cell(rnd: int, c: int, plain: float, plugin: float, bad: list[int]) -> dict:
    def result(tok_s):
        lat = {"p50": 0.5, "p90": 1.0, "p99": 1.0, "mean": 0.6}
        return {"output_tokens_per_s": tok_s, "ttft_s": lat, "itl_s": lat, "e2e_s": lat,
                "completed": 4, "sent": 4, "mean_mat": 2.0 if tok_s == plugin else None}
    return {"round": rnd, "concurrency": c, "order": ["plain", "plugin"],
            "results": {"plain": result(plain), "plugin": result(plugin)}, "mismatches": bad}


def test_load_compare_summary_table_and_plot(tmp_path):
    from benchmarks.load.compare import markdown, plot, summarize

    cells = [_load_cell(0, 1, 20.0, 30.0, []), _load_cell(1, 1, 20.0, 26.0, []),
             _load_cell(0, 8, 100.0, 95.0, [3]), _load_cell(1, 8, 100.0, 105.0, [])]
    summary = summarize(cells)
    assert [row["concurrency"] for row in summary] == [1, 8]
    assert summary[0]["throughput_ratio"] == {"median": 1.4, "per_round": [1.5, 1.3]}
    assert summary[0]["plugin"]["output_tokens_per_s"] == 28.0
    assert summary[0]["plugin"]["completed"] == 8 and summary[0]["mismatches"] == 0
    assert summary[1]["throughput_ratio"]["median"] == 1.0 and summary[1]["mismatches"] == 1
    table = markdown(summary)
    assert "| 1 | 20.0 | 28.0 | 1.4x (1.5, 1.3) |" in table
    plot(summary, tmp_path / "load.png", "test")
    assert (tmp_path / "load.png").stat().st_size > 0


def test_load_compare_rejects_bad_arguments():
    import subprocess
    import sys

    for argv, why in ((["--concurrency", "1,x"], "--concurrency"),
                      (["--rounds", "0"], ">= 1")):
        bad = subprocess.run([sys.executable, "-m", "benchmarks.load.compare", *argv, "--out",
                              "/tmp/never"], check=False, capture_output=True, text=True)
        assert bad.returncode == 2 and why in bad.stderr.strip().splitlines()[-1]


def test_env_variants_parse_and_apply_only_while_building():
    import os

    from benchmarks.vllm.bench_interleaved import built_under, engine_env, env_variant

    assert env_variant('spin={"GOMP_SPINCOUNT": 10000}') == ("spin", {"GOMP_SPINCOUNT": "10000"})
    assert engine_env('{"A_B": "x"}') == {"A_B": "x"}
    for bad in ('spin=["x"]', 'spin={"A": true}', 'plain={"A": "1"}', "spin"):
        with pytest.raises(argparse.ArgumentTypeError):
            env_variant(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="--engine-env"):
        engine_env("{nope")
    key = "MSN_TEST_BUILT_UNDER"
    os.environ.pop(key, None)
    assert built_under({key: "7"}, lambda: os.environ[key]) == "7"
    assert key not in os.environ  # restored after the build


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, base_model_path):
    """A saved tiny random Llama with the real tokenizer: the reference benchmarks load it
    like any checkpoint, fast on CPU."""
    from tests.conftest import tiny_llama

    model, tok = tiny_llama(base_model_path, "cpu", max_positions=2048)  # dev prompts: ~800
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_bench_methods_smoke_on_a_tiny_checkpoint(tmp_path, tiny_checkpoint):
    """Every method side by side on the paged-torch path with the full warm-up, plus a
    method under a second template (METHOD@TEMPLATE): JSON with the run's settings, a
    plot, exit 0 (float32: every output identical to `ar`)."""
    import json

    from benchmarks.reference import bench_methods

    methods = ["ar", "jacobi", "tr-jacobi", "pld", "tr-jacobi@tree-8"]
    argv = ["--model", str(tiny_checkpoint), "--per-group", "1", "--max-new-tokens", "6",
            "--attn-backend", "paged-torch", "--warmup", "full", "--out-dir", str(tmp_path),
            "--name", "m", "--methods", ",".join(methods)]
    assert bench_methods.main(argv) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert (tmp_path / "m.png").exists()
    assert result["attn_backend"] == "paged-torch" and result["warmup"] == "full"
    assert result["compile_steps"] is False and result["unexplained_divergences"] == 0
    assert list(result["table"]["overall"]) == methods
    assert result["templates"]["tr-jacobi"] == "paper-68-r16"  # the default
    assert result["templates"]["tr-jacobi@tree-8"] == "tree-8"
    assert all(r["agrees"] for r in result["records"])


@pytest.mark.parametrize("methods, message", [
    ("tr-jacobi", "must include ar"),
    ("ar,ar", "name each entry once"),
    ("ar,beam", "use only"),
    ("ar,tr-jacobi@no-such-template", "unknown template 'no-such-template'"),
])
def test_bench_methods_rejects_bad_methods_before_loading(methods, message):
    from benchmarks.reference import bench_methods

    with pytest.raises(SystemExit, match=message):
        bench_methods.run(bench_methods.parse_args(["--model", "/no/such/model", "--methods", methods]))


def test_runner_e2e_smoke_writes_a_row_per_runner(tmp_path, tiny_checkpoint, monkeypatch):
    import json
    import sys

    from benchmarks.kernels import bench_runner_e2e

    out = tmp_path / "e2e.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_runner_e2e.py", "--model", str(tiny_checkpoint), "--random-weights", "--device",
        "cpu", "--dtype", "float32", "--backends", "sdpa,paged-torch", "--max-new-tokens", "4",
        "--out", str(out)])
    bench_runner_e2e.main()
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["attention"]) for r in rows] == [
        ("ar", "sdpa"), ("ar", "paged-torch"), ("tr-jacobi", "sdpa"), ("tr-jacobi", "paged-torch")]
    assert all(r["baseline"] == "sdpa" and r["identical_outputs"] == "4/4"
               for r in rows if r["attention"] != "sdpa")
    assert all(r["prefill_ms"] > 0 and 0 < r["decode_us_per_step"] < r["elapsed_s"] / r["steps"] * 1e6
               for r in rows)


def test_host_profile_smoke(tiny_checkpoint, capsys):
    from benchmarks.reference import host_profile

    host_profile.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32",
                       "--attn-backend", "sdpa", "--max-new-tokens", "4", "--top", "3"])
    out = capsys.readouterr().out
    assert "tr-jacobi sdpa: 12 tokens" in out and "us a step under the profiler" in out
    assert "Ordered by: internal time" in out and "Ordered by: cumulative time" in out
    assert "split (no profiler): prefill" in out


def test_first_request_smoke(tmp_path, tiny_checkpoint):
    """The warm-up check runs end to end (compiled, eager steps on CPU) and reports each
    prompt's first and second run."""
    import json

    from benchmarks.reference import first_request

    out = tmp_path / "fr.json"
    assert first_request.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--dtype",
                               "float32", "--attn-backend", "sdpa", "--max-new-tokens", "2",
                               "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["second_prefill"] is True and result["warm_up_s"] > 0
    assert [r["prefill_bucket"] for r in result["rows"]] == [64, 128, 256]
    assert all(r["first_s"] > 0 and r["again_s"] > 0 for r in result["rows"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA error")
def test_first_request_without_cuda_exits_2(tmp_path, capsys):
    from benchmarks.reference import first_request

    assert first_request.main(["--model", "/no/such/model", "--out", str(tmp_path / "x")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_first_request_rejects_a_missing_model(tmp_path, capsys):
    from benchmarks.reference import first_request

    assert first_request.main(["--model", str(tmp_path / "nope"), "--device", "cpu",
                               "--out", str(tmp_path / "x")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def _pool_run(path, model, ratios, twin=None, mismatch=()):
    """A bench_interleaved.py-shaped JSON: one batch-8 qa row per plugin ratio."""
    import json

    rows = []
    for i, r in enumerate(ratios):
        tok_s = {"plain": 100.0, "plugin": 100.0 * r}
        if twin is not None:
            tok_s["plain-twin"] = 100.0 * twin[i]
        rows.append({"repeat": i, "group": "qa", "batch": 8, "tok_s": tok_s,
                     "identical_outputs": i not in mismatch})
    rows.append({"repeat": 0, "group": "qa", "batch": 1, "identical_outputs": True,
                 "tok_s": {"plain": 10.0, "plugin": 50.0}})
    path.write_text(json.dumps({"meta": {"model": model, "when": "t", "command": "c"},
                                "rows": rows}))
    return str(path)


def test_pool_runs_pools_paired_ratios_across_runs(tmp_path, monkeypatch, capsys):
    import json
    import math
    import sys

    from benchmarks.vllm import pool_runs

    a = _pool_run(tmp_path / "a.json", "msn", [0.9, 1.0, 1.1, 2.0], mismatch=(3,))
    # With the twin, the plugin is compared to both plain engines' geometric mean.
    b = _pool_run(tmp_path / "b.json", "msn", [1.0, 1.0], twin=[1.21, 0.81])
    monkeypatch.setattr(sys, "argv", ["pool_runs", a, b, "--batch", "8", "--code", "x",
                                      "--out", str(tmp_path / "pooled")])
    pool_runs.main()
    out = json.loads((tmp_path / "pooled.json").read_text())
    qa = out["groups"]["qa"]["engine"]
    assert out["left_out"] == {"a": 1, "b": 0}  # the row with different outputs
    assert qa["batches"] == 5 and qa["below_1"] == 2
    assert qa["ratios"]["b"] == [round(1 / 1.1, 4), round(1 / 0.9, 4)]
    expected = math.exp(sum(map(math.log, [0.9, 1.0, 1.1, 1 / 1.1, 1 / 0.9])) / 5)
    assert qa["geomean"] == pytest.approx(expected, abs=1e-4)
    lo, hi = qa["ci90"]
    assert lo <= qa["geomean"] <= hi
    twin = out["groups"]["qa"]["twin"]
    assert twin["batches"] == 2 and list(twin["by_run"]) == ["b"]
    assert out["meta"]["code"] == "x" and (tmp_path / "pooled.png").exists()
    assert "| qa |" in capsys.readouterr().out


def test_pool_runs_rejects_mixed_models_and_bad_files(tmp_path, monkeypatch, capsys):
    import sys

    from benchmarks.vllm import pool_runs

    a = _pool_run(tmp_path / "a.json", "msn", [1.0])
    b = _pool_run(tmp_path / "b.json", "base", [1.0])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for runs, message in (([a, b], "different models"), ([str(bad)], "not a bench_interleaved"),
                          ([a, "--batch", "4"], "no row of batch 4")):
        monkeypatch.setattr(sys, "argv", ["pool_runs", *runs, "--out", str(tmp_path / "o")])
        with pytest.raises(SystemExit) as exc:
            pool_runs.main()
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


class _FakeEngine:
    """Steps like vLLM's `LLMEngine`: each request produces one token a step (or
    `per_step` tokens) until its length; a step's outputs are the unfinished and just
    finished requests, cumulative token ids."""

    def __init__(self, lengths, per_step=1, log=None, name=""):
        self.lengths, self.per_step, self.log, self.name = lengths, per_step, log, name
        self.live: dict[str, list[int]] = {}

    def add_request(self, rid, prompt, params):
        self.live[rid] = []

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        from types import SimpleNamespace

        if self.log is not None:
            self.log.append(self.name)
        out = []
        for rid, toks in list(self.live.items()):
            n = self.lengths[rid]
            toks.extend(range(len(toks), min(len(toks) + self.per_step, n)))
            done = len(toks) >= n
            out.append(SimpleNamespace(request_id=rid, finished=done,
                                       outputs=[SimpleNamespace(token_ids=list(toks))]))
            if done:
                del self.live[rid]
        return out


def test_lockstep_rotates_who_steps_first_and_aligns_rounds():
    from benchmarks.vllm.bench_lockstep import lockstep, undrafted_step_ratio

    log: list[str] = []
    engines = {"plain": _FakeEngine({"p0": 3, "p1": 2}, log=log, name="plain"),
               "plugin": _FakeEngine({"x0": 3, "x1": 2}, per_step=2, log=log, name="plugin")}
    ticks = iter(range(1000))
    res = lockstep(engines, {"plain": [("p0", "a", None), ("p1", "b", None)],
                             "plugin": [("x0", "a", None), ("x1", "b", None)]},
                   clock=lambda: float(next(ticks)))
    # Round 1: plain first; round 2: plugin first; round 3: only plain is left.
    assert log == ["plain", "plugin", "plugin", "plain", "plain"]
    assert res["plain"]["tokens"] == [2, 2, 1] and res["plugin"]["tokens"] == [4, 1, None]
    assert res["plain"]["steps"] == [1.0, 1.0, 1.0] and res["plugin"]["steps"][2] is None
    assert res["plain"]["seconds"] == 3.0 and res["plugin"]["seconds"] == 2.0
    assert [o.outputs[0].token_ids for o in res["plain"]["outputs"].values()] == [[0, 1],
                                                                                  [0, 1, 2]]
    # Only rounds where both stepped a full batch with one token a request count.
    plugin = {"steps": [2.0, 1.1, 3.0, None], "tokens": [2, 2, 5, None]}
    plain = {"steps": [1.0, 1.0, 1.0, 1.0], "tokens": [2, 2, 2, 2]}
    assert undrafted_step_ratio(plugin, plain, batch=2) == pytest.approx(1.55)
    assert undrafted_step_ratio(plugin, plain, batch=3) is None


def test_lockstep_rejects_bad_arguments(monkeypatch, capsys):
    import sys

    from benchmarks.vllm import bench_lockstep

    for argv in (["--batch-sizes", "1", "8"], ["--repeats", "0"], ["--max-tokens", "0"]):
        monkeypatch.setattr(sys, "argv", ["bench_lockstep", *argv])
        with pytest.raises(SystemExit) as exc:
            bench_lockstep.main()
        assert exc.value.code == 2
        assert "must be positive" in capsys.readouterr().err
    variant = ["--pair-variant", 'chains={"templates": ["chain-5"]}']
    for argv, message in (
            (variant, "needs --plugin-twin and --plain-twin"),
            ([*variant, "--plugin-twin", "--plain-twin", "--plugin-off"], "not --plugin-off"),
            ([*variant, *variant, "--plugin-twin", "--plain-twin"], "must be distinct"),
            (["--pair-variant", 'a-twin={}', "--plugin-twin", "--plain-twin"], "-twin"),
            (["--pair-variant", 'plain={}'], "new engine name"),
            (["--pair-variant", 'x={"mode": "fast"}'], "trjacobi mode must be one of"),
            (["--rebuild", "--plugin-off", "--off-first"], "exclude each other")):
        monkeypatch.setattr(sys, "argv", ["bench_lockstep", *argv])
        with pytest.raises(SystemExit) as exc:
            bench_lockstep.main()
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_lockstep_pair_ratios_compare_plugin_pair_with_plain_pair():
    from benchmarks.vllm.bench_lockstep import pair_ratios

    def row(group, plugin, twin, same=True):
        return {"group": group, "identical_outputs": same,
                "tok_s": {"plain": 10.0, "plain-twin": 40.0, "plugin": plugin,
                          "plugin-twin": twin}}

    rows = [row("qa", 20.0, 20.0), row("qa", 10.0, 40.0), row("math", 40.0, 40.0),
            row("math", 1.0, 1.0, same=False)]  # left out: outputs differ
    pairs = pair_ratios(rows)
    assert pairs["qa"]["geomean"] == pytest.approx(1.0) and pairs["qa"]["batches"] == 2
    assert pairs["math"]["geomean"] == pytest.approx(2.0) and pairs["math"]["batches"] == 1
    assert pairs["all"]["batches"] == 3
    assert pairs["all"]["geomean"] == pytest.approx(2 ** (1 / 3), abs=1e-4)  # rounded
    # Per repeat too (with --rebuild each repeat has its own engines): one repeat, so no
    # interval over repeats.
    assert pairs["qa"]["by_repeat"] == [1.0] and "ci90_repeats" not in pairs["qa"]
    split = [row("qa", 40.0, 10.0), {**row("qa", 10.0, 10.0), "repeat": 1}]
    assert pair_ratios(split)["qa"]["by_repeat"] == [1.0, 0.5]
    assert pair_ratios(split)["qa"]["ci90_repeats"] == [0.5, 1.0]
    # A --pair-variant pair against the same plain pair.
    for r in rows:
        r["tok_s"].update({"v": r["tok_s"]["plugin"] / 2, "v-twin": r["tok_s"]["plugin-twin"]})
    variant = pair_ratios(rows, ("v", "v-twin"))
    assert variant["qa"]["geomean"] == pytest.approx(math.sqrt(0.5), abs=1e-4)


def _lockstep_run(path, undrafted, pair, forward=0.9, draft=0.01, mismatch=False):
    """A bench_lockstep.py-shaped JSON: one batch-8 math row (and one of another group)."""
    import json

    engines = ["plain", "plugin", "plugin-twin", "plain-twin"]
    row = {"group": "math_reasoning", "identical_outputs": True,
           "seconds": {"plain": 1.0, "plain-twin": 1.0, "plugin": 0.95, "plugin-twin": 0.95},
           "parts": {n: {"forward": forward, "draft": draft} for n in engines[1:3]}}
    other = {**row, "group": "qa", "identical_outputs": not mismatch,
             "seconds": {**row["seconds"], "plugin": 9.0}}
    meta = {"lockstep": True, "model": "base", "when": "t", "command": "c", "engines": engines,
            "undrafted_step_ratio": {n: {"math_reasoning": undrafted, "qa": 1.0}
                                     for n in engines[1:]},
            "pairs": {"math_reasoning": {"geomean": pair}, "qa": {"geomean": 2.0}}}
    summary = {"8": {"plugin": {"math_reasoning": {"plain_tok_s": 60.0},
                                "qa": {"plain_tok_s": 40.0}}}}
    path.write_text(json.dumps({"meta": meta, "summary": summary, "rows": [row, other]}))
    return str(path)


def test_lockstep_split_reads_where_the_pair_ratio_comes_from(tmp_path, capsys):
    import json

    from benchmarks.vllm import lockstep_split

    a = _lockstep_run(tmp_path / "a.json", undrafted=0.97, pair=1.03)
    b = _lockstep_run(tmp_path / "b.json", undrafted=1.02, pair=0.99, mismatch=True)
    lockstep_split.main([f"a={a}", f"b={b}", "--groups", "math_reasoning",
                         "--out", str(tmp_path / "split")])
    out = json.loads((tmp_path / "split.json").read_text())
    run = out["runs"]["a"]
    assert (run["undrafted"], run["undrafted_twin"], run["pair"]) == (0.97, 0.97, 1.03)
    # Both plugin engines' worker clocks against the plain pair's step seconds; the shares
    # are of the plugin engines' own seconds.
    assert run["forward"] == 0.9 and run["plain_tok_s"] == 60.0
    assert run["drafting"] == pytest.approx(0.01 / 0.95, abs=1e-4)
    assert run["rest"] == pytest.approx((0.95 - 0.9 - 0.01) / 0.95, abs=1e-4)
    assert out["runs"]["b"]["pair"] == 0.99 and (tmp_path / "split.png").exists()
    # Two groups: geometric means over them; a batch whose outputs differed is left out.
    lockstep_split.main([f"b={b}", "--groups", "math_reasoning", "qa",
                         "--out", str(tmp_path / "two")])
    two = json.loads((tmp_path / "two.json").read_text())["runs"]["b"]
    assert two["pair"] == pytest.approx((0.99 * 2.0) ** 0.5, abs=1e-3)
    # The qa row (different outputs; its plugin took 9 s) is not counted.
    assert two["drafting"] == pytest.approx(0.01 / 0.95, abs=1e-4)
    assert "| b | base |" in capsys.readouterr().out


def test_lockstep_split_rejects_bad_input(tmp_path, capsys):
    import json

    from benchmarks.vllm import lockstep_split

    a = _lockstep_run(tmp_path / "a.json", undrafted=1.0, pair=1.0)
    interleaved = tmp_path / "i.json"
    interleaved.write_text(json.dumps({"meta": {"model": "base"}, "rows": []}))
    no_twin = tmp_path / "n.json"
    data = json.loads((tmp_path / "a.json").read_text())
    data["meta"]["engines"] = ["plain", "plugin"]
    no_twin.write_text(json.dumps(data))
    always = tmp_path / "d.json"
    data["meta"]["engines"] = ["plain", "plugin", "plugin-twin", "plain-twin"]
    data["meta"]["undrafted_step_ratio"]["plugin"]["math_reasoning"] = None
    always.write_text(json.dumps(data))
    for argv, message in (([a], "give LABEL=RUN.json"),
                          ([f"x={always}"], "no round without drafts to compare in math"),
                          ([f"x={a}", f"x={a}"], "given twice"),
                          ([f"x={tmp_path / 'none.json'}"], "No such file"),
                          ([f"x={interleaved}"], "not a bench_lockstep.py result"),
                          ([f"x={no_twin}"], "needs --plugin-twin --plain-twin"),
                          ([f"x={a}", "--groups", "rag", "qa"], "no group rag")):
        if "--groups" not in argv:
            argv = [*argv, "--groups", "math_reasoning"]
        with pytest.raises(SystemExit) as exc:
            lockstep_split.main([*argv, "--out", str(tmp_path / "o")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
