"""Spec-Bench style comparison of decoding methods on the reference runner.

Runs `ar`, `jacobi`, `tr-jacobi` and `pld` side by side (per prompt, each method in
turn, so machine noise hits all of them alike), greedy, and reports per task group and
overall: MAT (tokens per step), tokens/s and speedup over `ar`, plus agreement with `ar`
(exact in float32; in bf16/fp16 every divergence is checked to be a near-tie).

    python -m benchmarks.reference.bench_methods --device cpu --per-group 3 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.specbench import TASK_GROUPS, load_questions
from msn.models import default_model_name
from proposers.reference.agreement import explain
from proposers.reference.runner import METHODS, GenerationConfig, ReferenceRunner
from proposers.templates import TemplateError, load_template

RESULTS = Path(__file__).resolve().parent.parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model_name(),
                   help="base, msn, or a checkpoint path (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated; METHOD@TEMPLATE runs a method with another template "
                        "beside it, e.g. ar,tr-jacobi,tr-jacobi@tree-32 (default: %(default)s)")
    p.add_argument("--per-group", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--template", action="append", default=[],
                   help="METHOD=TEMPLATE override, e.g. tr-jacobi=tree-32 (repeatable)")
    p.add_argument("--attn-backend", default="sdpa", choices=("sdpa", "paged-triton", "paged-torch"),
                   help="attention path of the runner (default: %(default)s)")
    p.add_argument("--warmup", choices=("short", "full"), default="short",
                   help="short: one short prompt per method before timing; full: also each "
                        "prompt once per method, untimed, right before its timed run (steady "
                        "state: every CUDA-graph capture and compile happens untimed)")
    p.add_argument("--compile", action="store_true",
                   help="decode steps and prefill through torch.compile (ReferenceRunner compile_steps)")
    p.add_argument("--name", default=None, help="result file stem (default: methods-<device>-<dtype>)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from msn.models import resolve_model

    methods = args.methods.split(",")
    unknown = {m.split("@", 1)[0] for m in methods} - set(METHODS)
    if unknown or "ar" not in methods or len(set(methods)) != len(methods):
        sys.exit(f"--methods must include ar, name each entry once, and use only {METHODS} "
                 f"(optionally METHOD@TEMPLATE); got {methods}")
    templates = dict(t.split("=", 1) for t in args.template)
    for m in methods:
        if "@" in m:
            templates[m] = m.split("@", 1)[1]
    for name in templates.values():
        try:
            load_template(name)
        except TemplateError as exc:  # before the model loads
            sys.exit(f"bench_methods: {exc}")
    path = resolve_model(args.model)  # float32 checkpoint; the runner casts to --dtype
    runner = ReferenceRunner.load(path, device=args.device, dtype=args.dtype,
                                  attn_backend=args.attn_backend, compile_steps=args.compile)
    questions = load_questions(args.per_group)
    cfgs = {m: GenerationConfig(method=m.split("@", 1)[0], max_new_tokens=args.max_new_tokens,
                                template=templates.get(m)) for m in methods}
    # Warm-up: first-call costs (allocator, CUDA-graph capture per step size) stay out.
    warm = runner.encode_chat("Say hello.")
    for cfg in cfgs.values():
        runner.generate(warm, GenerationConfig(method=cfg.method, template=cfg.template,
                                               max_new_tokens=min(24, args.max_new_tokens)))
    load_before = os.getloadavg()
    records = []
    for q in tqdm(questions, desc="prompts", file=sys.stderr):
        ids = runner.encode_chat(q["turns"][0])
        if args.warmup == "full":
            for cfg in cfgs.values():
                runner.generate(ids, cfg)
        outs = {m: runner.generate(ids, cfg) for m, cfg in cfgs.items()}
        for m, out in outs.items():
            div = explain(runner, ids, outs["ar"].token_ids, out.token_ids) if m != "ar" else None
            records.append({
                "question_id": q["question_id"], "group": q["group"], "method": m,
                "tokens": len(out.token_ids), "generated": out.num_generated,
                "steps": out.num_steps,
                "seconds": out.elapsed_s, "prompt_tokens": out.prompt_tokens,
                "agrees": div is None, "divergence": div.to_json() if div else None,
            })
    result = summarize(records, methods, args, runner, cfgs)
    # Other work on the machine slows every method alike (they run interleaved per
    # prompt), but absolute tok/s are only comparable at similar load.
    result["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    return result


def aggregate(rows: list[dict]) -> dict:
    """Totals of per-question records: MAT, tokens/s and agreement with `ar`."""
    tokens = sum(r["tokens"] for r in rows)
    generated = sum(r["generated"] for r in rows)  # MAT counts a final EOS too
    steps = sum(r["steps"] for r in rows)
    secs = sum(r["seconds"] for r in rows)
    return {"tokens": tokens, "steps": steps, "seconds": round(secs, 4),
            "mat": round(generated / max(steps, 1), 4), "tokens_per_s": round(tokens / max(secs, 1e-9), 3),
            "agreement": round(sum(r["agrees"] for r in rows) / max(len(rows), 1), 4)}


def summarize(records: list[dict], methods: list[str], args, runner, cfgs: dict) -> dict:
    table = {}
    for group in (*TASK_GROUPS, "overall"):
        rows = [r for r in records if group == "overall" or r["group"] == group]
        if not rows:
            continue
        table[group] = {m: aggregate([r for r in rows if r["method"] == m]) for m in methods}
        base = table[group]["ar"]["tokens_per_s"]
        for m in methods:
            table[group][m]["speedup"] = round(table[group][m]["tokens_per_s"] / base, 4)
    unexplained = [r for r in records if r["divergence"] and not r["divergence"]["explained"]]
    dev = runner.device
    return {
        "command": "python -m benchmarks.reference.bench_methods " + shlex.join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "dtype": args.dtype, "model": args.model, "max_new_tokens": args.max_new_tokens,
        "per_group": args.per_group, "cuda_graphs": runner.use_cuda_graphs,
        "attn_backend": runner.attn_backend, "compile_steps": runner.compile_steps,
        "warmup": args.warmup,
        "templates": {m: runner.tree_for(cfg).template.name for m, cfg in cfgs.items()},
        "table": table, "unexplained_divergences": len(unexplained), "records": records,
    }


def print_table(result: dict) -> None:
    methods = list(result["table"]["overall"])
    print(f"{'group':<15}" + "".join(f"{m:>26}" for m in methods))
    print(f"{'':<15}" + "".join(f"{'MAT  tok/s  speedup agree':>26}" for _ in methods))
    for group, row in result["table"].items():
        cells = "".join(
            f"{row[m]['mat']:>7.2f}{row[m]['tokens_per_s']:>7.1f}{row[m]['speedup']:>7.2f}x"
            f"{row[m]['agreement']:>5.2f}" for m in methods)
        print(f"{group:<15}{cells}")
    print(f"unexplained divergences: {result['unexplained_divergences']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(result["table"])
    methods = list(result["table"]["overall"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [g + i * width for g in range(len(groups))]
        axes[0].bar(xs, [result["table"][g][m]["speedup"] for g in groups], width, label=m)
        axes[1].bar(xs, [result["table"][g][m]["mat"] for g in groups], width, label=m)
    for ax, title in zip(axes, ("speedup over ar (tokens/s ratio)", "mean accepted tokens per step")):
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=30)
        ax.set_title(title)
        ax.axhline(1.0, color="grey", lw=0.8)
    axes[0].legend()
    fig.suptitle(f"reference runner, {result['device']}, {result['dtype']}, "
                 f"{result['max_new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"methods-{args.device.split(':')[0]}-{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(result, out / f"{stem}.png")
    print_table(result)
    print(f"wrote {out / stem}.json")
    return 1 if result["unexplained_divergences"] else 0


if __name__ == "__main__":
    sys.exit(main())
