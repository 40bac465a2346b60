"""The proposer's host time per step, replayed offline on real greedy answers.

The plugin's `propose` runs on the host between two forward passes, every step, whether
or not anything drafts: at batch 8 on 2 cores it was 0.41-0.46 ms of a ~50 ms step
(`bench_step_split.py`, `propose_seconds`), enough to make a batch that never drafts
~1% slower than plain vLLM. This times it without the model, so a change to the
proposer's host path is measured to the microsecond rather than read off two noisy
engine runs.

Replay: the answers plain vLLM gave (greedy, so the plugin's output is the same tokens;
`--streams`, made once with `--make-streams`) are fed to a `TRJacobiProposer` step by
step, `--batch` requests per task group (its questions cycled, like `bench_vllm.py`),
as a closed batch. Each planned draft is judged against the real answer (the tokens a
tree or chain would have had accepted under greedy verification) and reported to the
proposer as the runner does (`record_outcome`); each step's cost is reported from a
cost line (`--step-cost`, seconds = a + b * tokens, the path's fit on this machine), so
the planner sees what it would in an engine. Jacobi feedback (the target's top-K at
draft positions) needs the model and is absent: Jacobi chains are never planned here.

Reports per group: host microseconds per step (the whole `propose` call and the
runner's `record_outcome` calls), by phase (`proposer.HOST_PHASES`), and the
request-steps that drafted. Writes `<out>.json` and `<out>.png`.

    python -m benchmarks.vllm.bench_proposer_host --make-streams   # once, runs vLLM
    python -m benchmarks.vllm.bench_proposer_host --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from benchmarks.vllm.bench_vllm import DEV_SET, GROUPS, ROOT
from server.cli import json_object_arg

RESULTS = ROOT / "benchmarks" / "results"
STREAMS = RESULTS / "proposer_host_streams.json"
# Cost lines (intercept s, slope s/token) of a batch-8 decode step on 2 cores, fp32,
# base model (planner traces of vllm_cpu_base_step_split_math.json's runs).
STEP_COST = {"kernel": (0.021, 0.0035), "tree": (0.030, 0.0042)}


def make_streams(model: str, per_group: int, max_tokens: int, path: Path) -> None:
    """Plain vLLM greedy answers (prompt and output token ids) for every group."""
    from benchmarks.vllm.retrieval_sources import generate

    groups = generate(model, per_group, max_tokens, str(DEV_SET))
    path.write_text(json.dumps({"model": model, "max_tokens": max_tokens, "groups": groups}))
    print(f"wrote {path}")


def make_proposer(**overrides):
    """A TR-Jacobi proposer with the settings `engine_kwargs` gives `vllm.LLM` (tree
    mode, closed batches: the benchmarks' offline batches)."""
    from proposers.vllm.config import TRJacobiConfig
    from proposers.vllm.proposer import TRJacobiProposer

    config = TRJacobiConfig(**{"closed_batches": True, **overrides})
    return TRJacobiProposer(types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(
            num_speculative_tokens=config.max_draft_tokens()),
        additional_config={"trjacobi": config.to_dict()}))


def accepted_tokens(plan, actual: list[int]) -> int:
    """Draft tokens greedy verification accepts: the deepest node whose path spells the
    next tokens of the real answer."""
    tokens = (-1, *plan.tokens)
    best = 0
    for node in range(1, plan.tree.num_nodes + 1):
        depth = int(plan.tree.depth[node])
        if depth <= best or depth > len(actual):
            continue
        path = plan.tree.path_nodes[node, :depth].tolist()
        if all(tokens[p] == actual[d] for d, p in enumerate(path)):
            best = depth
    return best


def replay(proposer, streams: list[dict], batch: int, step_cost: dict) -> dict:
    """One closed batch of `batch` requests (the streams cycled) to the end."""
    rows = [streams[i % len(streams)] for i in range(batch)]
    req_ids = [f"r{i}" for i in range(batch)]
    pos = [1] * batch  # output tokens known (the prefill step produced the first)
    alive = [i for i in range(batch) if len(rows[i]["output"]) > 1]
    width = max(len(r["prompt"]) + len(r["output"]) for r in rows)
    ids = np.zeros((batch, width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r["prompt"]) + len(r["output"])] = r["prompt"] + r["output"]
    propose_s = outcome_s = model_s = 0.0
    steps = drafted = 0
    path, tokens = "kernel", batch
    phases0 = dict(proposer.host_seconds)
    from proposers.vllm.planner import BUCKET_MIN_STEPS
    from proposers.vllm.proposer import BatchFeedback

    # The tree path's line as an engine's first tree probes would have left it (a few
    # sizes), so the planner weighs tree plans as it does in an engine.
    planner = proposer.planner
    if planner.line("tree", batch) is None or planner.bucket_lines.get(("tree", batch)) is None:
        a, b = step_cost["tree"]
        for _ in range(BUCKET_MIN_STEPS):
            for size in (2 * batch, 4 * batch):
                planner.record_step("tree", size, a + b * size, batch=batch)
    while alive:
        a, b = step_cost[path]
        proposer.planner.record_step(path, tokens, a + b * tokens, batch=len(alive))
        model_s += a + b * tokens
        limit = [len(rows[i]["output"]) for i in alive]
        proposer.set_target_feedback(BatchFeedback(
            [req_ids[i] for i in alive], ["tree"] * len(alive), closed=True,
            remaining=[n - pos[i] for n, i in zip(limit, alive)]))
        lengths = np.array([len(rows[i]["prompt"]) + pos[i] for i in alive])
        t0 = time.perf_counter()
        proposer.propose([[1]] * len(alive), lengths, ids[alive])
        t1 = time.perf_counter()
        steps += 1
        path, tokens, done = "kernel", len(alive), []
        for i in alive:
            plan = proposer.plan_for(req_ids[i])
            actual = rows[i]["output"][pos[i]:]
            n = 0
            if plan is not None:
                drafted += 1
                tokens += plan.tree.num_nodes
                path = "tree" if not plan.is_chain else path
                n = accepted_tokens(plan, actual)
                proposer.record_outcome(req_ids[i], plan.rung, plan.feature,
                                        plan.tree.num_nodes, n)
            pos[i] = min(pos[i] + 1 + n, len(rows[i]["output"]))
            if pos[i] >= len(rows[i]["output"]):
                done.append(i)
        outcome_s += time.perf_counter() - t1
        propose_s += t1 - t0
        if done:
            proposer.finish([req_ids[i] for i in done])
            alive = [i for i in alive if i not in done]
    phases = {k: v - phases0[k] for k, v in proposer.host_seconds.items()}
    a, b = step_cost[path]
    model_s += a + b * tokens  # the last step
    return {"steps": steps, "drafted": drafted, "propose_us": 1e6 * propose_s / steps,
            # The batch's modelled seconds: its steps on the cost lines, plus host time.
            "model_s": model_s + propose_s + outcome_s,
            "outcome_us": 1e6 * outcome_s / steps,
            "phases_us": {k: round(1e6 * v / steps, 2) for k, v in phases.items()}}


def plot(summary: dict, path: Path) -> None:
    """Host microseconds per step by phase, one stacked bar per (group, config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(g, c) for g, cells in summary.items() for c in cells]
    phases = list(next(iter(next(iter(summary.values())).values()))["phases_us"])
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(bars)), 4.5))
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for phase in phases:
        vals = np.array([summary[g][c]["phases_us"][phase] for g, c in bars])
        ax.bar(x, vals, bottom=bottom, label=phase)
        bottom += vals
    ax.bar(x, [summary[g][c]["outcome_us"] for g, c in bars], bottom=bottom,
           label="record_outcome")
    ax.set_xticks(x, [f"{g}\n{c}" for g, c in bars], fontsize=6, rotation=90)
    ax.set_ylabel("host microseconds per step")
    ax.set_title("TR-Jacobi proposer host time per step (offline replay, batch "
                 f"{next(iter(next(iter(summary.values())).values()))['batch']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def against(rev: str, args) -> dict:
    """This replay of revision `rev`'s proposer against this tree's, ABAB: each round
    runs this script in a worktree of `rev` (the script and streams copied in) and here,
    as subprocesses, on the default config. Per group: both sides' host microseconds
    per step (`propose` and outcomes), medians over rounds, and new / old."""
    import shutil
    import subprocess
    import tempfile

    from benchmarks.vllm.ab_revisions import resolve, worktree

    commit = resolve(rev)
    tmp = Path(tempfile.mkdtemp(prefix="proposer-host-"))
    tree = tmp / "tree"
    worktree(commit, tree)
    try:
        shutil.copy(Path(__file__), tree / "benchmarks" / "vllm" / Path(__file__).name)
        (tree / "benchmarks" / "results").mkdir(exist_ok=True)
        shutil.copy(args.streams, tree / "benchmarks" / "results" / STREAMS.name)
        sides: dict[str, list] = {"old": [], "new": []}
        for i in range(args.rounds):
            for side, cwd in (("old", tree), ("new", ROOT)):
                out = tmp / f"{side}{i}"
                subprocess.run(
                    [sys.executable, "-m", "benchmarks.vllm.bench_proposer_host",
                     "--repeats", str(args.repeats), "--batch", str(args.batch),
                     "--groups", *args.groups, "--step-cost", json.dumps(args.step_cost),
                     "--out", str(out)], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
                sides[side].append(json.loads(out.with_suffix(".json").read_text()))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    table = {}
    for group in args.groups:
        cell = {}
        for side, runs in sides.items():
            host = [next(iter(r["groups"][group].values())) for r in runs]
            cell[side] = {
                "host_us": statistics.median(h["propose_us"] + h["outcome_us"] for h in host),
                "phases_us": {k: statistics.median(h["phases_us"][k] for h in host)
                              for k in host[0]["phases_us"]},
                "steps": host[0]["steps"], "drafted": host[0]["drafted"]}
        cell["new_over_old"] = round(cell["new"]["host_us"] / cell["old"]["host_us"], 3)
        table[group] = cell
        print(f"{group:15s} host us/step: {rev} {cell['old']['host_us']:6.1f}  "
              f"this tree {cell['new']['host_us']:6.1f}  (x{cell['new_over_old']:.3f}; steps "
              f"{cell['old']['steps']:.0f} / {cell['new']['steps']:.0f})", flush=True)
    return {"against": rev, "commit": commit, "rounds": args.rounds, "groups": table}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-streams", action="store_true",
                    help="generate --streams with plain vLLM (greedy) and exit")
    ap.add_argument("--model", default="base", help="model of --make-streams")
    ap.add_argument("--per-group", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--streams", type=Path, default=STREAMS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5,
                    help="replays per group and config (a fresh proposer each; medians)")
    ap.add_argument("--groups", nargs="+", default=GROUPS, choices=GROUPS)
    ap.add_argument("--configs", nargs="+", type=json_object_arg, default=[{}],
                    help="TRJacobiConfig overrides, one JSON object per config compared "
                         "(default: the defaults only); ratios are to the first")
    ap.add_argument("--step-cost", type=json.loads, default=STEP_COST,
                    help="JSON {path: [intercept_s, slope_s_per_token]}")
    ap.add_argument("--against", metavar="REV",
                    help="compare the default config's host time with git revision REV's "
                         "(a worktree), alternating --rounds times; writes <out>.json only")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --against")
    ap.add_argument("--out", type=Path, default=RESULTS / "vllm_cpu_proposer_host")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.batch < 1 or args.repeats < 1:
        ap.error("--batch and --repeats must be >= 1")
    if args.make_streams:
        make_streams(args.model, args.per_group, args.max_tokens, args.streams)
        return
    if not args.streams.is_file():
        ap.error(f"no streams at {args.streams}; make them with --make-streams")
    for config in args.configs:
        try:
            make_proposer(**config)
        except (TypeError, ValueError) as e:
            ap.error(f"--configs {json.dumps(config)}: {e}")
    if args.against:
        out = {"command": " ".join(["python -m benchmarks.vllm.bench_proposer_host",
                                    *sys.argv[1:]]),
               "batch": args.batch, "repeats": args.repeats, "step_cost": args.step_cost,
               **against(args.against, args)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out.with_suffix('.json')}")
        return
    streams = json.loads(args.streams.read_text())
    torch.set_num_threads(1)
    summary: dict = {}
    for group in args.groups:
        summary[group] = {}
        runs: dict[str, list] = {json.dumps(c): [] for c in args.configs}
        for _ in range(args.repeats):
            for config in args.configs:  # alternating, so drift falls on all alike
                proposer = make_proposer(**config)
                replay(proposer, streams["groups"][group], args.batch, args.step_cost)  # warm
                proposer.clear_corpus()  # as every timed engine run (bench_vllm.clear_corpus)
                runs[json.dumps(config)].append(
                    replay(proposer, streams["groups"][group], args.batch, args.step_cost))
        first = None
        for label, cell in runs.items():
            med = {k: statistics.median(r[k] for r in cell)
                   for k in ("steps", "drafted", "propose_us", "outcome_us", "model_s")}
            med["phases_us"] = {k: round(statistics.median(r["phases_us"][k] for r in cell), 2)
                                for k in cell[0]["phases_us"]}
            first = first or med
            med["model_ratio_to_first"] = round(first["model_s"] / med["model_s"], 4)
            med["batch"] = args.batch
            med["runs"] = cell
            summary[group][label] = med
            print(f"{group:15s} {label:24s} steps {med['steps']:4.0f} drafted {med['drafted']:3.0f} "
                  f"modelled {med['model_s']:6.3f} s (x{med['model_ratio_to_first']:.3f})  "
                  f"host {med['propose_us'] + med['outcome_us']:6.1f} us/step: "
                  + " ".join(f"{k} {v:.0f}" for k, v in med["phases_us"].items())
                  + f" outcomes {med['outcome_us']:.0f}", flush=True)
    out = {"command": " ".join(["python -m benchmarks.vllm.bench_proposer_host", *sys.argv[1:]]),
           "batch": args.batch, "repeats": args.repeats, "step_cost": args.step_cost,
           "streams": str(args.streams.relative_to(ROOT)) if args.streams.is_relative_to(ROOT)
           else str(args.streams), "groups": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot(summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
