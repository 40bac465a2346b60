"""Plain vLLM vs the plugin, interleaved: is the plugin ever slower on a task group?

`bench_vllm.py` runs each engine in its own process, one after the other, so a change in
the machine's load between the two (this CPU is shared) moves the ratio: the same cell of
plain vLLM has varied by up to 28% between runs. Here both engines live in one process
and take turns: for each repeat and task group, the same batch of requests runs on plain
vLLM and on the plugin back to back (the order alternates), so both see the same minutes
of the machine. Each repeat gives one paired ratio per group; the report gives, per batch
size and group, the median ratio and its range over the repeats, plus the overall ratio
(total tokens / total seconds of each engine).

    python -m benchmarks.vllm.bench_interleaved --model msn --batch-sizes 8 --repeats 5

Writes `<out>.json` and `<out>.png` (default benchmarks/results/vllm_cpu_interleaved).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.vllm.bench_vllm import DEV_SET, ENGINE_ENV, GROUPS, ROOT, group_questions
from msn.models import default_model_name


def paired_summary(rows: list[dict]) -> dict:
    """Per batch size and group: median / min / max of the paired ratios, and overall."""
    out: dict = {}
    for batch in sorted({r["batch"] for r in rows}):
        table: dict = {}
        mine = [r for r in rows if r["batch"] == batch]
        for group in GROUPS:
            ratios = [r["plugin_tok_s"] / r["plain_tok_s"] for r in mine if r["group"] == group]
            if not ratios:
                continue
            table[group] = {"median": round(statistics.median(ratios), 3),
                            "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                            "repeats": len(ratios),
                            "plain_tok_s": round(statistics.median(
                                r["plain_tok_s"] for r in mine if r["group"] == group), 2),
                            "plugin_tok_s": round(statistics.median(
                                r["plugin_tok_s"] for r in mine if r["group"] == group), 2)}
        plain = sum(r["plain_tokens"] for r in mine) / sum(r["plain_s"] for r in mine)
        plugin = sum(r["plugin_tokens"] for r in mine) / sum(r["plugin_s"] for r in mine)
        per_repeat = {}
        for r in mine:
            acc = per_repeat.setdefault(r["repeat"], [0, 0.0, 0, 0.0])
            acc[0] += r["plain_tokens"]
            acc[1] += r["plain_s"]
            acc[2] += r["plugin_tokens"]
            acc[3] += r["plugin_s"]
        overall = [(a[2] / a[3]) / (a[0] / a[1]) for a in per_repeat.values()]
        table["overall"] = {"ratio": round(plugin / plain, 3), "min": round(min(overall), 3),
                            "max": round(max(overall), 3), "plain_tok_s": round(plain, 2),
                            "plugin_tok_s": round(plugin, 2)}
        out[str(batch)] = table
    return out


def plot(summary: dict, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(summary)
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        groups = [g for g in GROUPS if g in summary[b]]
        med = [summary[b][g]["median"] for g in groups]
        lo = [m - summary[b][g]["min"] for g, m in zip(groups, med)]
        hi = [summary[b][g]["max"] - m for g, m in zip(groups, med)]
        ax.bar(range(len(groups)), med, yerr=[lo, hi], capsize=4, color="tab:green",
               label="plugin / plain vLLM (median, min-max over repeats)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)), groups, rotation=30)
        ax.set_title(f"vLLM-CPU, {model} model, batch {b}, interleaved "
                     f"(overall {summary[b]['overall']['ratio']:.2f}x)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def run(args) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from msn.models import resolve_model
    from proposers.vllm import engine_kwargs
    from proposers.vllm.metrics import spec_decode_summary

    model = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model)
    common = {"model": model, "dtype": "float32", "enforce_eager": True, "seed": 0,
              "max_model_len": 4096, "max_num_seqs": max(args.batch_sizes),
              "disable_log_stats": False}
    engines = {"plain": LLM(**common),
               "plugin": LLM(**{**common, **engine_kwargs(max_num_seqs=max(args.batch_sizes))})}
    questions = group_questions(Path(args.dev_set), args.per_group)

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for llm in engines.values():  # first-call costs stay out of the figures
        llm.generate([chat("Hello")], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)

    def timed(name: str, prompts: list[str], batch: int) -> tuple[int, float, list]:
        llm = engines[name]
        t0 = time.perf_counter()
        if batch == 1:
            outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        else:
            outs = llm.generate([prompts[i % len(prompts)] for i in range(batch)], params,
                                use_tqdm=False)
        seconds = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs), seconds, \
            [list(o.outputs[0].token_ids) for o in outs]

    def plugin_counters():
        spec = spec_decode_summary(engines["plugin"].get_metrics())
        rungs = engines["plugin"].collective_rpc("trjacobi_stats")[0]["rungs"]
        return spec.num_drafts, spec.num_accepted_tokens, rungs

    rows = []
    mismatches = 0
    for repeat in range(args.repeats):
        for gi, group in enumerate(GROUPS):
            prompts = [chat(q) for q in questions[group]]
            for batch in args.batch_sizes:
                order = ["plain", "plugin"] if (repeat + gi) % 2 == 0 else ["plugin", "plain"]
                d0, a0, r0 = plugin_counters()
                res = {name: timed(name, prompts, batch) for name in order}
                d1, a1, r1 = plugin_counters()
                same = res["plain"][2] == res["plugin"][2]
                mismatches += not same
                rows.append({"repeat": repeat, "group": group, "batch": batch, "first": order[0],
                             "plain_tokens": res["plain"][0], "plain_s": res["plain"][1],
                             "plain_tok_s": res["plain"][0] / res["plain"][1],
                             "plugin_tokens": res["plugin"][0], "plugin_s": res["plugin"][1],
                             "plugin_tok_s": res["plugin"][0] / res["plugin"][1],
                             "identical_outputs": same,
                             "plugin_mat": round(1 + (a1 - a0) / (d1 - d0), 3) if d1 > d0 else 1.0,
                             "plugin_rungs": {k: v - r0.get(k, 0) for k, v in r1.items()
                                              if v - r0.get(k, 0)}})
                r = rows[-1]
                print(f"repeat {repeat} {group:15s} batch {batch}: plain {r['plain_tok_s']:6.1f} "
                      f"plugin {r['plugin_tok_s']:6.1f} tok/s -> "
                      f"{r['plugin_tok_s'] / r['plain_tok_s']:.3f}x  MAT {r['plugin_mat']:.2f} "
                      f"rungs {r['plugin_rungs']}"
                      f"{'' if same else '  OUTPUTS DIFFER'}", flush=True)
    drafts, accepted, rungs = plugin_counters()
    return {"rows": rows, "mismatches": mismatches, "rungs": rungs,
            "plugin_mat": round(1 + accepted / drafts, 3) if drafts else 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_name(),
                    help="base, msn, or a checkpoint path (default: %(default)s)")
    ap.add_argument("--dev-set", default=str(DEV_SET))
    ap.add_argument("--per-group", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_cpu_interleaved"))
    args = ap.parse_args()
    if args.repeats < 1 or args.per_group < 1 or min(args.batch_sizes) < 1:
        ap.error("--repeats, --per-group and --batch-sizes must be positive")
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    result = run(args)
    summary = paired_summary(result["rows"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vllm.bench_interleaved " + shlex.join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
            "max_tokens": args.max_tokens, "per_group": args.per_group,
            "repeats": args.repeats, "device": "cpu", "dtype": "float32", "greedy": True,
            "plugin_mat": result["plugin_mat"], "rungs": result["rungs"],
            "batches_with_different_outputs": result["mismatches"]}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                    "rows": result["rows"]}, indent=1))
    plot(summary, out.with_suffix(".png"), args.model)
    print(json.dumps({"meta": meta, "summary": summary}, indent=1))
    if result["mismatches"]:
        sys.exit(f"{result['mismatches']} batches gave different outputs with the plugin")


if __name__ == "__main__":
    main()
