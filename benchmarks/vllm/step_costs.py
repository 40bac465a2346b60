"""What a plugin step costs by its size: the planner's trace of executed steps, summarised.

The planner prices a draft with a cost line per attention path and batch bucket
(`proposers/vllm/planner.py`). This runs the plugin's engine with the planner trace on
(`MSN_TRJACOBI_TRACE`, one line per executed step: path, batch, tokens, prompt tokens,
seconds) over the dev set's groups and reports, per (path, batch size, tokens in the
step), how many decode steps ran and their median / mean / 90th-percentile time, next to
what the planner's final line predicts for that size. Steps with prompt tokens are left
out, as the planner leaves them out.

    python -m benchmarks.vllm.step_costs --model msn --batch-sizes 1 --groups mt_bench qa math_reasoning

Writes `<out>.json` and `<out>.png` (default benchmarks/results/vllm_cpu_step_costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.vllm.bench_interleaved import plugin_variant
from benchmarks.vllm.bench_vllm import (
    ENGINE_ENV,
    GROUPS,
    ROOT,
    generate_workload,
    group_questions,
    workload_args,
)
from proposers.vllm.planner import batch_bucket


def summarise(lines: list[dict]) -> dict:
    """Decode steps of a trace grouped by (path, batch, tokens), with the last cost lines
    the planner wrote (`"lines"`: name -> [intercept, slope] or None)."""
    cells: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    fitted: dict = {}
    for line in lines:
        if "path" in line and not line.get("prefill"):
            cells[(line["path"], line["batch"], line["tokens"])].append(1000 * line["seconds"])
        elif "lines" in line:
            fitted = line["lines"]
    rows = []
    for (path, batch, tokens), ms in sorted(cells.items()):
        ms = sorted(ms)
        fit = fitted.get(f"{path}@{batch_bucket(batch)}") or fitted.get(path)
        rows.append({"path": path, "batch": batch, "tokens": tokens, "steps": len(ms),
                     "median_ms": round(statistics.median(ms), 2),
                     "mean_ms": round(statistics.fmean(ms), 2),
                     "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
                     "line_ms": (None if fit is None
                                 else round(1000 * (fit[0] + fit[1] * tokens), 2))})
    return {"rows": rows, "lines": fitted}


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["path"], r["batch"]) for r in summary["rows"]}):
        rows = [r for r in summary["rows"] if (r["path"], r["batch"]) == key and r["steps"] >= 3]
        if not rows:
            continue
        pts = ax.scatter([r["tokens"] for r in rows], [r["median_ms"] for r in rows],
                         s=[min(200, 4 * r["steps"]) for r in rows], alpha=0.6,
                         label=f"{key[0]}, batch {key[1]} (median; area = steps)")
        if rows[0]["line_ms"] is not None:
            ax.plot([r["tokens"] for r in rows], [r["line_ms"] for r in rows], "--",
                    color=pts.get_facecolor()[0], lw=1)
    ax.set_xlabel("tokens in the step (requests + draft tokens)")
    ax.set_ylabel("step time, ms (dashed: the planner's line)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def run(args, trace: Path) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from msn.models import resolve_model
    from proposers.vllm import TRJacobiConfig, engine_kwargs
    from proposers.vllm.proposer import TRACE_ENV

    os.environ[TRACE_ENV] = str(trace)  # read when the worker builds the proposer
    model = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=4096,
              disable_log_stats=False,
              **engine_kwargs(TRJacobiConfig(**args.config[1]), max_num_seqs=max(args.batch_sizes)))
    questions = group_questions(Path(args.dev_set), args.per_group)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)

    llm.generate([chat("Hello")], params, use_tqdm=False)
    speeds = {}
    for group in args.groups:
        prompts = [chat(q) for q in questions[group]]
        for batch in args.batch_sizes:
            t0 = time.perf_counter()
            outs = generate_workload(llm, prompts, params, batch, fresh_corpus=True)
            seconds = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            speeds[f"{group}@{batch}"] = round(tokens / seconds, 2)
            print(f"{group:15s} batch {batch}: {tokens / seconds:6.1f} tok/s", flush=True)
    stats = llm.collective_rpc("trjacobi_stats")[0]
    # Explicitly: left to garbage collection, this process hung at exit with its engine.
    llm.llm_engine.engine_core.shutdown()
    return {"tok_s": speeds, "rungs": stats["rungs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_args(ap, [1])
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=GROUPS)
    ap.add_argument("--config", type=plugin_variant, default=("plugin", {}), metavar="NAME=JSON",
                    help="TR-Jacobi settings of the engine, as bench_interleaved's "
                         "--plugin-variant (default: the defaults)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_cpu_step_costs"))
    args = ap.parse_args()
    if args.per_group < 1 or min(args.batch_sizes) < 1:
        ap.error("--per-group and --batch-sizes must be positive")
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        result = run(args, trace)
        summary = summarise([json.loads(line) for line in trace.read_text().splitlines()])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vllm.step_costs " + shlex.join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
            "config": args.config[1], "groups": args.groups, "batch_sizes": args.batch_sizes,
            "engine_env": {k: os.environ[k] for k in ENGINE_ENV}, **result}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **summary}, indent=1))
    plot(summary, out.with_suffix(".png"),
         f"vLLM-CPU plugin step time by size, {args.model} model, batch {args.batch_sizes}")
    for r in summary["rows"]:
        if r["steps"] >= 3:
            print(f"{r['path']:6s} batch {r['batch']:2d} tokens {r['tokens']:3d}: "
                  f"{r['steps']:4d} steps, median {r['median_ms']:6.1f} ms "
                  f"(p90 {r['p90_ms']:6.1f}); line {r['line_ms']}")


if __name__ == "__main__":
    main()
