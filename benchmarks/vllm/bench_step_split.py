"""Where the plugin engine's time goes: drafting on vs off in one engine, alternating.

`bench_interleaved.py` compares engines; this looks inside one. The plugin's engine runs
each batch twice back to back, once as planned (TR-Jacobi) and once with every request's
drafting off (`extra_args={"trjacobi": "off"}`), alternating which goes first, and reads
the runner's counters (`trjacobi_stats`) around each run: steps, the seconds of forward
+ sampling per path, the seconds spent drafting (planner included), and the seconds
between steps (engine core scheduling, output handling, IPC). Same engine, same
process, so the difference is what drafting costs and saves, without a second engine's
warm-up state in the comparison.

    python -m benchmarks.vllm.bench_step_split --model msn --groups mt_bench qa --repeats 3

`--plain` adds plain vLLM (no plugin) with the same step clock (`timing_worker.py`), in
the rotation: what the drafting-off engine pays against plain vLLM, split the same way.

Writes `<out>.json` and `<out>.png` (default benchmarks/results/vllm_cpu_step_split).
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

from benchmarks.vllm.bench_interleaved import SETTLE_SECONDS, WARM_TOKENS
from benchmarks.vllm.bench_vllm import (
    ENGINE_ENV,
    GROUPS,
    ROOT,
    clear_corpus,
    group_questions,
    workload_args,
)
from benchmarks.vllm.timing_worker import WORKER_PATH as TIMING_WORKER

PARTS = ("steps_seconds", "draft_seconds", "between_seconds", "other_seconds")
SIDES = ("on", "off", "plain")


def delta(s0: dict, s1: dict, wall: float) -> dict:
    """One run's share of the runner's counters (read before and after it)."""
    paths = {p: {k: round(v - s0["paths"][p][k], 4) for k, v in cell.items()}
             for p, cell in s1["paths"].items()}
    step_s = sum(c["seconds"] for c in paths.values())
    draft = s1["draft_seconds"] - s0["draft_seconds"]
    between = s1["between_steps_seconds"] - s0["between_steps_seconds"]
    return {"wall": round(wall, 4), "steps": sum(c["steps"] for c in paths.values()),
            "steps_seconds": round(step_s, 4), "draft_seconds": round(draft, 4),
            "between_seconds": round(between, 4),
            "other_seconds": round(wall - step_s - draft - between, 4), "paths": paths,
            # The proposer's share of draft_seconds by phase (proposer.HOST_PHASES).
            "propose_seconds": {k: round(v - s0.get("propose_seconds", {}).get(k, 0.0), 4)
                                for k, v in s1.get("propose_seconds", {}).items()},
            "rungs": {k: v - s0["rungs"].get(k, 0) for k, v in s1["rungs"].items()
                      if v - s0["rungs"].get(k, 0)}}


def summarise(rows: list[dict]) -> dict:
    """Per group: medians of each part for drafting on and off (and plain vLLM when it
    ran), and of the paired wall ratios off / on (above 1: the plugin's run was faster)
    and plain / off (above 1: the drafting-off engine was faster than plain vLLM)."""
    out = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        cells = [r for r in rows if r["group"] == group]
        sides = [s for s in SIDES if s in cells[0]]
        table = {side: {k: round(statistics.median(c[side][k] for c in cells), 4)
                        for k in ("wall", "steps", *PARTS)} for side in sides}
        table["speedup_on_over_off"] = round(statistics.median(
            c["off"]["wall"] / c["on"]["wall"] for c in cells), 3)
        if "plain" in sides:
            table["speedup_off_over_plain"] = round(statistics.median(
                c["plain"]["wall"] / c["off"]["wall"] for c in cells), 3)
        table["repeats"] = len(cells)
        out[group] = table
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary)
    sides = [s for s in SIDES if s in summary[groups[0]]]
    width = 0.8 / len(sides)
    fig, ax = plt.subplots(figsize=(1.1 * len(sides) * len(groups) + 2, 4))
    for gi, group in enumerate(groups):
        for si, side in enumerate(sides):
            bottom = 0.0
            for pi, part in enumerate(PARTS):
                value = summary[group][side][part]
                ax.bar(gi + si * width, value, width * 0.9, bottom=bottom, color=f"C{pi}",
                       label=part.replace("_", " ") if gi == 0 and si == 0 else None)
                bottom += value
            label = "plain vLLM" if side == "plain" else f"drafting {side}"
            ax.text(gi + si * width, bottom, f"{label}\n{summary[group][side]['steps']:.0f} steps",
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks([g + width * (len(sides) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("seconds per batch (median)")
    ax.set_title("where a batch's time goes: plugin engine drafting on vs off"
                 + (", plain vLLM" if "plain" in sides else ""), fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def run(args) -> list[dict]:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from msn.models import resolve_model
    from proposers.vllm import engine_kwargs

    model = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model)
    batch = args.batch_sizes[0]
    common = {"model": model, "dtype": "float32", "enforce_eager": True, "seed": 0,
              "max_model_len": 4096, "disable_log_stats": False}
    engines = {"on": LLM(**common, **engine_kwargs(max_num_seqs=batch))}
    engines["off"] = engines["on"]
    if args.plain:
        engines["plain"] = LLM(**common, max_num_seqs=batch, worker_cls=TIMING_WORKER)
    questions = group_questions(Path(args.dev_set), args.per_group)

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)

    params = {"on": SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
              "off": SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                    extra_args={"trjacobi": "off"})}
    params["plain"] = params["on"]
    warm = SamplingParams(temperature=0.0, max_tokens=WARM_TOKENS, extra_args={"trjacobi": "off"})
    for llm in set(engines.values()):
        llm.generate([chat("Hello")], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    sides = list(engines)
    rows = []
    for repeat in range(args.repeats):
        for gi, group in enumerate(args.groups):
            prompts = [chat(questions[group][i % len(questions[group])]) for i in range(batch)]
            row: dict = {"repeat": repeat, "group": group}
            k = (repeat + gi) % len(sides)
            order = sides[k:] + sides[:k]
            outputs = {}
            for side in order:
                llm = engines[side]
                llm.generate(prompts[:1], warm, use_tqdm=False)
                time.sleep(SETTLE_SECONDS)
                if side != "plain":
                    clear_corpus(llm)
                s0 = llm.collective_rpc("trjacobi_stats")[0]
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params[side], use_tqdm=False)
                wall = time.perf_counter() - t0
                row[side] = delta(s0, llm.collective_rpc("trjacobi_stats")[0], wall)
                outputs[side] = [list(o.outputs[0].token_ids) for o in outs]
            row["order"] = list(order)
            row["identical_outputs"] = all(o == outputs["on"] for o in outputs.values())
            rows.append(row)
            print(f"repeat {repeat} {group:15s}: on {row['on']['wall']:.2f} s "
                  f"({row['on']['steps']} steps), off {row['off']['wall']:.2f} s "
                  f"({row['off']['steps']} steps); on: drafting {row['on']['draft_seconds']:.3f} s, "
                  f"(proposer {row['on']['propose_seconds']}), "
                  f"between steps {row['on']['between_seconds']:.3f} s (off "
                  f"{row['off']['between_seconds']:.3f} s), rungs {row['on']['rungs']}"
                  + (f"; plain {row['plain']['wall']:.2f} s, steps "
                     f"{row['plain']['steps_seconds']:.3f} s, between "
                     f"{row['plain']['between_seconds']:.3f} s" if "plain" in row else "")
                  + ("" if row["identical_outputs"] else "  OUTPUTS DIFFER"), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_args(ap, [8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=GROUPS)
    ap.add_argument("--plain", action="store_true",
                    help="also plain vLLM, with the same step clock (timing_worker.py)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_cpu_step_split"))
    args = ap.parse_args()
    if args.repeats < 1 or args.per_group < 1 or len(args.batch_sizes) != 1 \
            or args.batch_sizes[0] < 1:
        ap.error("--repeats and --per-group must be positive; give one positive --batch-sizes")
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    rows = run(args)
    summary = summarise(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vllm.bench_step_split " + shlex.join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
            "batch": args.batch_sizes[0], "max_tokens": args.max_tokens,
            "per_group": args.per_group, "repeats": args.repeats, "plain": args.plain,
            "device": "cpu",
            "dtype": "float32", "greedy": True}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                    "rows": rows}, indent=1))
    plot(summary, out.with_suffix(".png"))
    print(json.dumps({"meta": meta, "summary": summary}, indent=1))
    if not all(r["identical_outputs"] for r in rows):
        sys.exit("the engines' outputs differ")


if __name__ == "__main__":
    main()
