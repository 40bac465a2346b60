"""End to end: reference-runner tokens/s on our paged kernels vs transformers' SDPA path.

Same model, same prompts, same run, greedy; both runners replay CUDA graphs of
their steps (the H200 host is too slow for eager steps). The SDPA runner attends
over its whole static cache under the explicit mask (static shapes for the
graphs); ours reads only each step's real prefix through the block table.

    python benchmarks/kernels/bench_runner_e2e.py --model PATH [--random-weights] [--capacity-launch]

``--capacity-launch`` adds a third runner on our kernels whose CUDA graphs launch for the
whole cache capacity (one graph per step size, as before prefix buckets): the A/B of
the per-prefix-bucket graphs in the same run.

``--compile`` adds, beside each runner, the same runner with ``compile_steps`` (its
decode steps go through ``torch.compile`` before capture, its prefill too): fewer, fused
kernels per step. Every runner also reports the mean time of one prompt's prefill
(``prefill_ms``), the decode time per step without it (``decode_us_per_step``) and the
GPU time of one replay of its one-token graph and of its largest tree graph (CUDA events
over 200 replays), so the host's share of a step is the decode time minus that.

``--random-weights`` builds the model from the folder's config (a checkpoint too
large to carry to the GPU machine): the shapes, hence the cost of a step, are the
real model's; acceptance (MAT) is not, and in bf16 near-uniform logits make ties
between the two attention paths common, so agreement is reported, not asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proposers.reference.runner import DTYPES, GenerationConfig, ReferenceRunner

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarize the plot of Romeo and Juliet in five sentences.",
    "List ten countries in Europe and their capitals, one per line, as 'Country: Capital'.",
    "Explain step by step how to compute 17 * 23 without a calculator.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (config + tokenizer at least)")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--methods", default="ar,tr-jacobi")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--capacity-launch", action="store_true",
                    help="also run our kernels with one graph per step size launched for the "
                         "whole cache (no prefix buckets)")
    ap.add_argument("--backends", default="sdpa,paged-triton",
                    help="attention paths to run, comma-separated (the first is the baseline)")
    ap.add_argument("--compile", action="store_true",
                    help="also run each backend with compile_steps (torch.compile'd steps and prefill)")
    ap.add_argument("--compiled-only", action="store_true",
                    help="with --compile: only the compiled runners")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runner-e2e-h200.json"))
    args = ap.parse_args()
    if args.compiled_only and not args.compile:
        ap.error("--compiled-only needs --compile")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = DTYPES[args.dtype]
    tok = AutoTokenizer.from_pretrained(args.model)
    if args.random_weights:
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                     attn_implementation="sdpa")
    model = model.to(device).eval()
    backends = args.backends.split(",")
    if args.capacity_launch and "paged-triton" not in backends:
        ap.error("--capacity-launch needs paged-triton in --backends")
    runners: dict[str, ReferenceRunner] = {}
    for backend in backends:
        for compiled in ((True,) if args.compiled_only else (False, True)) if args.compile else (False,):
            name = backend + ("+compile" if compiled else "")
            runners[name] = ReferenceRunner(copy.deepcopy(model), tok, device, attn_backend=backend,
                                            compile_steps=compiled)
    if args.capacity_launch:
        whole = ReferenceRunner(copy.deepcopy(model), tok, device, attn_backend="paged-triton")
        whole.MIN_KEY_BOUND = 1 << 30  # every bucket is the whole cache
        runners["paged-triton-capacity"] = whole
    baseline = next(iter(runners))
    prompts = [runners[baseline].encode_chat(p) for p in PROMPTS]
    results = []
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    for method in args.methods.split(","):
        cfg = GenerationConfig(method=method, max_new_tokens=args.max_new_tokens, ignore_eos=True)
        for name, runner in runners.items():
            for p in prompts:  # warm-up: graph capture per step size, kernel compiles
                runner.generate(p, cfg)
            sync()
            t0 = time.perf_counter()
            outs = [runner.generate(p, cfg) for p in prompts]
            sync()
            elapsed = time.perf_counter() - t0
            tokens = sum(len(o.token_ids) for o in outs)
            steps = sum(o.num_steps for o in outs)
            outputs[(method, name)] = [o.token_ids for o in outs]
            row = {"method": method, "attention": name, "tokens": tokens, "steps": steps,
                       "mat": tokens / steps, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed}
            row["prefill_ms"] = prefill_ms(runner, prompts, sync)
            row["decode_us_per_step"] = (elapsed - row["prefill_ms"] * len(prompts) / 1e3) / steps * 1e6
            if device.type == "cuda" and runner.use_cuda_graphs:
                row["replay_us"] = replay_times(runner)
                row["wall_us_per_step"] = elapsed / steps * 1e6
            results.append(row)
            write(args, device, results)  # so far: a run cut short keeps its rows
            print(f"{method:<10}{name:<22}{row['tokens_per_s']:9.1f} tok/s  MAT {row['mat']:.2f}  "
                  f"{steps} steps  {row.get('wall_us_per_step', 0):.0f} us/step  "
                  f"prefill {row['prefill_ms']:.1f} ms  "
                  f"replay {row.get('replay_us', {})}", flush=True)
    for method in args.methods.split(","):
        a = outputs[(method, baseline)]
        sdpa_row = next(r for r in results if r["method"] == method and r["attention"] == baseline)
        for name in list(runners)[1:]:
            b = outputs[(method, name)]
            same = sum(x == y for x, y in zip(a, b))
            common = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
                      for x, y in zip(a, b)]
            ours_row = next(r for r in results if r["method"] == method and r["attention"] == name)
            ours_row["speedup_vs_sdpa"] = ours_row["tokens_per_s"] / sdpa_row["tokens_per_s"]
            ours_row["baseline"] = baseline
            ours_row["identical_outputs"] = f"{same}/{len(a)}"
            ours_row["first_divergence"] = common
            print(f"{method}: {name} / {baseline} = {ours_row['speedup_vs_sdpa']:.2f}x; "
                  f"identical outputs {same}/{len(a)}; first divergence at {common}", flush=True)
    write(args, device, results)


def write(args, device, results: list[dict]) -> None:
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = {"command": " ".join(["python"] + sys.argv), "device": device_name,
            "torch": torch.__version__, "dtype": args.dtype, "random_weights": args.random_weights,
            "max_new_tokens": args.max_new_tokens, "prompts": PROMPTS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def prefill_ms(runner: ReferenceRunner, prompts: list[list[int]], sync, repeats: int = 3) -> float:
    """Mean milliseconds of one prompt's prefill (the prompt minus its last token, as
    `stream` runs it), after the generations above warmed it up: the part of each
    generation's time that is not decode steps."""
    times = []
    for ids in prompts:
        cache = runner._cache_for(len(ids) + 1)
        context = torch.tensor(ids[:-1], dtype=torch.long)
        with torch.inference_mode():
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                runner._prefill(cache, context)
                sync()
                times.append(time.perf_counter() - t0)
    return sum(times) / len(times) * 1e3


def replay_times(runner: ReferenceRunner, replays: int = 200) -> dict[str, float]:
    """GPU microseconds per replay of the runner's one-token graph and of its largest
    graph (by step size), each for its largest prefix bucket; the cache is scratch here
    (every request starts over)."""
    by_size: dict[int, tuple[int, object]] = {}
    for (q, bound), graph in runner._graphs.items():
        if q not in by_size or bound > by_size[q][0]:
            by_size[q] = (bound, graph)
    picks = {q for q in (1, max(by_size)) if q in by_size}
    out = {}
    for q in sorted(picks):
        graph = by_size[q][1].graph
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        out[f"q{q}"] = round(start.elapsed_time(end) * 1e3 / replays, 1)
    return out


if __name__ == "__main__":
    main()
