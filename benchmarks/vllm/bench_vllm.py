"""vLLM on CPU: plain vs vLLM n-gram vs our chain Jacobi vs our tree TR-Jacobi.

Workload (issue 6 figures): the dev set's first 3 questions of each Spec-Bench task group
(MT-bench as one group), greedy, chat-formatted, `--max-tokens` each. Batch 1 runs the
group's questions one at a time; batch 8 runs 8 concurrent requests per group (its 3
questions cycled). Three engines, one run: plain, vLLM n-gram (K=4), and the plugin,
whose chain and tree modes are selected per request (`extra_args={"trjacobi": mode}`).

Reports tokens/s, MAT (1 + accepted / verification steps, from vLLM's spec counters),
ratios to plain vLLM, and what the cost-aware planner picked (`rungs`: request-steps per
rung: none, chain, or a tree template). Writes JSON and a plot into benchmarks/results/.
Plain vLLM always runs first; on a shared machine the same cell varies by up to ~30%
between runs, so read per-group ratios of one run with that in mind.

    .venv/bin/python benchmarks/vllm/bench_vllm.py --model base
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from msn.models import default_model_name

ROOT = Path(__file__).resolve().parents[2]
DEV_SET = ROOT.parent / "shared" / "data" / "specbench-dev.jsonl"
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
            "humanities"}
GROUPS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
# vLLM's built-in n-gram speculation as the table runs it (K=4).
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def clear_corpus(llm) -> None:
    """Empty a plugin engine's shared corpus (retrieval.CorpusIndex), and keep requests
    alive now out of it. Every timed run of a plugin engine starts with this: the
    benchmarks run the same prompts again and again (warm-ups, repeats, methods), and an
    answer found whole in the corpus from an earlier run of the same prompt would time a
    cache, not drafting. Within a run, later requests still find earlier ones' outputs
    (the 3 questions of a group at batch 1), as in serving."""
    llm.collective_rpc("trjacobi_clear_corpus")


def generate_workload(llm, prompts: list[str], params, batch: int,
                      fresh_corpus: bool = False, rounds: int = 1) -> list:
    """The benchmark's unit of work: at batch 1 the group's prompts one after the other,
    else `batch` concurrent requests cycling over them; all that `rounds` times in a row
    (a second round asks the same again: a repeated or regenerated request). Returns
    vLLM's request outputs. `fresh_corpus` (plugin engines): `clear_corpus` first."""
    if fresh_corpus:
        clear_corpus(llm)
    outs = []
    for _ in range(rounds):
        if batch == 1:
            outs += [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        else:
            outs += llm.generate([prompts[i % len(prompts)] for i in range(batch)], params,
                                 use_tqdm=False)
    return outs


def group_questions(path: Path, per_group: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        group = "mt_bench" if row["category"] in MT_BENCH else row["category"]
        if len(out[group]) < per_group:
            out[group].append(row["turns"][0])
    return out


def run_engine(engine: str, args) -> dict:
    """One engine, all its methods; runs in its own process (vLLM needs __main__)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from msn.models import resolve_model
    from proposers.vllm.metrics import spec_decode_summary

    model = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model)
    kwargs = {"model": model, "dtype": "float32", "enforce_eager": True, "seed": 0,
                  "max_model_len": 4096, "max_num_seqs": 8, "disable_log_stats": False}
    methods = [engine]
    if engine == "ngram":
        kwargs["speculative_config"] = dict(NGRAM)
    elif engine == "plugin":
        from proposers.vllm import engine_kwargs

        kwargs.update(engine_kwargs(max_num_seqs=8))
        methods = ["chain", "tree"]
    llm = LLM(**kwargs)
    questions = group_questions(Path(args.dev_set), args.per_group)

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)

    def stats():
        s = spec_decode_summary(llm.get_metrics())
        rungs = llm.collective_rpc("trjacobi_stats")[0]["rungs"] if engine == "plugin" else {}
        return s, rungs

    # Warm-up (first-call costs stay out of the figures).
    llm.generate([chat("Hello")], SamplingParams(temperature=0, max_tokens=8))
    results = []
    for method in methods:
        extra = {"trjacobi": method} if engine == "plugin" else None
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args=extra)
        for batch in args.batch_sizes:
            for group in GROUPS:
                prompts = [chat(q) for q in questions[group]]
                s0, r0 = stats()
                t0 = time.perf_counter()
                outs = generate_workload(llm, prompts, params, batch,
                                         fresh_corpus=engine == "plugin")
                n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                seconds = time.perf_counter() - t0
                s1, r1 = stats()
                drafts = s1.num_drafts - s0.num_drafts
                accepted = s1.num_accepted_tokens - s0.num_accepted_tokens
                results.append({
                    "method": method, "batch": batch, "group": group,
                    "tokens": n_tokens, "seconds": seconds, "tok_s": n_tokens / seconds,
                    "mat": 1.0 + accepted / drafts if drafts else 1.0,
                    "drafts": drafts,
                    "draft_tokens": s1.num_draft_tokens - s0.num_draft_tokens,
                    "accepted": accepted,
                    "rungs": {k: v - r0.get(k, 0) for k, v in r1.items() if v - r0.get(k, 0)},
                })
                print(json.dumps(results[-1]), flush=True)
    return {"engine": engine, "results": results}


def summarize(rows: list[dict]) -> dict:
    plain = {(r["batch"], r["group"]): r for r in rows if r["method"] == "plain"}
    table: dict = {}
    for r in rows:
        key = (r["batch"], r["group"])
        r["ratio_to_plain"] = r["tok_s"] / plain[key]["tok_s"] if key in plain else None
        table.setdefault(r["method"], {}).setdefault(str(r["batch"]), {})[r["group"]] = {
            "tok_s": round(r["tok_s"], 2), "mat": round(r["mat"], 3),
            "ratio": round(r["ratio_to_plain"], 3) if r["ratio_to_plain"] else None,
            "rungs": r["rungs"],
        }
    for method, by_batch in table.items():
        for batch, groups in by_batch.items():
            toks = sum(r["tokens"] for r in rows if r["method"] == method and str(r["batch"]) == batch)
            secs = sum(r["seconds"] for r in rows if r["method"] == method and str(r["batch"]) == batch)
            p_t = sum(r["tokens"] for r in rows if r["method"] == "plain" and str(r["batch"]) == batch)
            p_s = sum(r["seconds"] for r in rows if r["method"] == "plain" and str(r["batch"]) == batch)
            groups["overall"] = {"tok_s": round(toks / secs, 2),
                                 "ratio": round((toks / secs) / (p_t / p_s), 3) if p_s else None}
    return table


LABELS = {"ngram": "vLLM n-gram", "chain": "our chain (always drafts)",
          "tree": "our plugin (planned, default)"}


def plot(table: dict, path: Path, model: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("ngram", "chain", "tree") if m in table]
    batches = sorted({b for m in methods for b in table[m]}, key=int)
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    cols = GROUPS + ["overall"]
    for ax, b in zip(axes[0], batches):
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            vals = [table[m][b].get(g, {}).get("ratio") or 0 for g in cols]
            ax.bar([x + i * width for x in range(len(cols))], vals, width, label=LABELS[m])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cols))], cols, rotation=30)
        ax.set_title(f"vLLM-CPU, {model + ' model, ' if model else ''}batch {b}: "
                     "speed / plain vLLM")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def workload_args(ap: argparse.ArgumentParser, batch_sizes: list[int]) -> None:
    """The options that pick the workload (model, questions, lengths, batch sizes)."""
    ap.add_argument("--model", default=default_model_name(),
                    help="base, msn, or a checkpoint path (default: %(default)s)")
    ap.add_argument("--dev-set", default=str(DEV_SET))
    ap.add_argument("--per-group", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=batch_sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_args(ap, [1, 8])
    ap.add_argument("--engines", nargs="+", choices=["plain", "ngram", "plugin"],
                    default=["plain", "ngram", "plugin"],
                    help="engines to run, each in its own process (plugin runs our chain and "
                         "tree methods)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_cpu"))
    ap.add_argument("--engine-worker", help=argparse.SUPPRESS)
    ap.add_argument("--engine-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_worker:
        Path(args.engine_out).write_text(json.dumps(run_engine(args.engine_worker, args)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": str(ROOT)}
    for engine in args.engines:
        part = out.with_name(f"{out.name}.{engine}.json")
        cmd = [sys.executable, __file__, "--engine-worker", engine, "--engine-out", str(part),
               "--model", args.model, "--dev-set", args.dev_set,
               "--per-group", str(args.per_group), "--max-tokens", str(args.max_tokens),
               "--batch-sizes", *map(str, args.batch_sizes)]
        subprocess.run(cmd, env=env, check=True)
        rows += json.loads(part.read_text())["results"]
        part.unlink()
    table = summarize(rows)
    meta = {"command": "python -m benchmarks.vllm.bench_vllm " + shlex.join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": args.model, "max_tokens": args.max_tokens, "per_group": args.per_group,
            "device": "cpu", "dtype": "float32", "greedy": True,
            "note": "2-core CPU shared with other jobs; ratios compare runs of the same process"}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": table,
                                                    "rows": rows}, indent=1))
    plot(table, out.with_suffix(".png"), args.model)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
