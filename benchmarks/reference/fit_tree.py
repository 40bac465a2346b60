"""Fit a TR-Jacobi tree template to measured acceptance (`proposers.tree_fit`).

Runs greedy tr-jacobi on calibration prompts that are not the benchmark's: tasks over
Python's standard library (code, summarize, QA, rewrite, translate, arithmetic; the
generator MSN's training data uses, `training.data.task_prompts`) plus the user turns of
a chat JSONL (default: the committed sample of the MSN training set). Every step's
candidate table is compared with the tokens that followed; a template of `--nodes` nodes
is grown on the first half of the prompts and scored, with the `--compare` templates, on
the second half (expected MAT from the record: no model run per template).

    python -m benchmarks.reference.fit_tree --model msn --prompts 48 --nodes 78 \\
        --name fitted-78 --out proposers/templates/fitted-78.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from msn.models import default_model_name
from proposers.templates import TemplateError, load_template
from proposers.tree_fit import (
    AcceptanceRecord,
    expected_accepted,
    fit_template,
    load_hits,
    save_hits,
)

ROOT = Path(__file__).resolve().parents[2]
CHAT_SAMPLE = ROOT / "benchmarks" / "results" / "msn-h200" / "data-sample.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model_name(), help="base, msn, or a checkpoint path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--prompts", type=int, default=48, help="calibration prompts (half fit, half score)")
    p.add_argument("--chat-share", type=float, default=0.25,
                   help="share of prompts taken from --chat-file's user turns (default: %(default)s)")
    p.add_argument("--chat-file", type=Path, default=CHAT_SAMPLE)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--collect-template", default="paper-68-r16",
                   help="template run while recording (its table depth and width bound the fit)")
    p.add_argument("--nodes", type=int, default=78, help="draft nodes of the fitted template")
    p.add_argument("--max-depth", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--compare", default="paper-68,paper-68-r16", help="templates scored beside it")
    p.add_argument("--name", default=None, help="template name (default: fitted-<nodes>)")
    p.add_argument("--out", type=Path, default=None, help="template JSON to write")
    p.add_argument("--hits", type=Path, default=None,
                   help="record file: written after a run, or read instead of running (.npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default="",
                   help="also fit these node counts (e.g. 20,40,78,150,250) and plot held-out MAT "
                        "against size next to the --compare templates (needs --report)")
    p.add_argument("--report", type=Path, default=None,
                   help="write the scores as JSON (and, with --sizes, a .png beside it)")
    args = p.parse_args(argv)
    if args.sizes and not args.report:
        p.error("--sizes needs --report")
    try:
        args.sizes = [int(n) for n in args.sizes.split(",") if n]
    except ValueError:
        p.error(f"--sizes must be comma-separated node counts, got {args.sizes!r}")
    if min([args.nodes, *args.sizes]) < 1:
        p.error("--nodes and --sizes must be >= 1")
    try:
        args.compare = [load_template(n) for n in args.compare.split(",") if n]
        collect = load_template(args.collect_template)
    except TemplateError as exc:
        p.error(str(exc))
    if not (args.hits and args.hits.exists()):  # a record made now has collect's shape
        for t in args.compare:
            if t.depth > collect.max_depth or t.top_k > collect.top_k:
                p.error(f"--compare {t.name} ({t.depth} deep, top-{t.top_k}) does not fit a "
                        f"record made under {collect.name} ({collect.max_depth} deep, "
                        f"top-{collect.top_k})")
    if args.prompts < 2:
        p.error("--prompts must be >= 2 (half fit, half score)")
    if not 0 <= args.chat_share <= 1:
        p.error("--chat-share must be in [0, 1]")
    return args


def calibration_prompts(n: int, chat_share: float, chat_file: Path, seed: int) -> list[str]:
    """Task prompts over the standard library and chat user turns, interleaved, never the
    benchmark set."""
    from training.data import assert_not_benchmark, task_prompts

    rng = random.Random(seed)
    n_chat = round(n * chat_share)
    chats: list[str] = []
    if n_chat:
        assert_not_benchmark(chat_file)
        rows = [json.loads(line) for line in chat_file.read_text().splitlines() if line.strip()]
        chats = [r["messages"][0]["content"] for r in rows if r.get("messages")]
        rng.shuffle(chats)
        chats = chats[:n_chat]
    tasks = [p for _, _, p in task_prompts(n - len(chats), [], rng)]
    mixed = tasks + chats
    rng.shuffle(mixed)
    return mixed


def record(args: argparse.Namespace, prompts: list[str]) -> AcceptanceRecord:
    from msn.models import resolve_model
    from proposers.reference.runner import GenerationConfig, ReferenceRunner

    runner = ReferenceRunner.load(resolve_model(args.model), device=args.device, dtype=args.dtype)
    cfg = GenerationConfig(method="tr-jacobi", max_new_tokens=args.max_new_tokens,
                           template=args.collect_template)
    rec = AcceptanceRecord()
    for prompt in tqdm(prompts, desc="calibration prompts", file=sys.stderr):
        ids = runner.encode_chat(prompt)
        tokens = [t for out in runner.stream(ids, cfg, observe=rec.observe) for t in out.token_ids]
        rec.close(list(ids) + tokens)
    return rec


def main(argv=None) -> int:
    args = parse_args(argv)
    name = args.name or f"fitted-{args.nodes}"
    start = time.perf_counter()
    if args.hits and args.hits.exists():
        hits = load_hits(args.hits)
        print(f"read {len(hits)} recorded steps from {args.hits}")
    else:
        prompts = calibration_prompts(args.prompts, args.chat_share, args.chat_file, args.seed)
        hits = record(args, prompts).hits
        if args.hits:
            save_hits(args.hits, hits)
    half = len(hits) // 2
    fit, held = hits[:half], hits[half:]
    template = fit_template(
        fit, args.nodes, name=name, max_depth=args.max_depth, top_k=args.top_k,
        description=f"fitted by benchmarks/reference/fit_tree.py to {half} recorded steps of "
                    f"calibration prompts (not the benchmark's), {args.model} {args.dtype}")
    print(f"{len(hits)} steps: fit on {len(fit)}, scored on {len(held)} "
          f"({time.perf_counter() - start:.0f} s)")
    try:
        rows = [score(t, fit, held) for t in [template, *args.compare]]
    except TemplateError as exc:  # a record read from --hits, smaller than a template
        print(f"fit_tree: {exc}", file=sys.stderr)
        return 2
    curve = [score(fit_template(fit, n, name=f"fitted-{n}"), fit, held) for n in args.sizes]
    print(f"{'template':<16}{'nodes':>6}{'depth':>6}{'top_k':>6}{'MAT fit':>9}{'MAT held-out':>14}")
    for r in rows + curve:
        print(f"{r['name']:<16}{r['nodes']:>6}{r['depth']:>6}{r['top_k']:>6}"
              f"{r['mat_fit']:>9.3f}{r['mat_held_out']:>14.3f}")
    if args.out:
        args.out.write_text(json.dumps(template.to_dict()) + "\n")
        print(f"wrote {args.out}")
    if args.report:
        args.report.write_text(json.dumps({
            "command": "python -m benchmarks.reference.fit_tree " + shlex.join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model, "dtype": args.dtype,
            "steps_fit": len(fit), "steps_held_out": len(held), "templates": rows,
            "sizes": curve, "fitted": template.to_dict()}, indent=1))
        print(f"wrote {args.report}")
        if curve:
            plot(rows[1:], curve, args.report.with_suffix(".png"))
    return 0


def score(t, fit, held) -> dict:
    return {"name": t.name, "nodes": t.num_nodes, "depth": t.depth, "top_k": t.top_k,
            "mat_fit": round(1 + expected_accepted(fit, t), 4),
            "mat_held_out": round(1 + expected_accepted(held, t), 4)}


def plot(templates: list[dict], curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([c["nodes"] for c in curve], [c["mat_held_out"] for c in curve], "o-",
            label="fitted (greedy), held-out")
    for t in templates:
        ax.plot(t["nodes"], t["mat_held_out"], "s", label=t["name"])
    ax.set_xlabel("draft nodes")
    ax.set_ylabel("expected MAT on held-out steps")
    ax.set_title("tree size vs accepted tokens (recorded candidate tables)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
