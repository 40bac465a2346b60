"""End to end: reference-runner tokens/s on our paged kernels vs transformers' SDPA path.

Same model, same prompts, same run, greedy; both runners replay CUDA graphs of
their steps (the H200 host is too slow for eager steps). The SDPA runner attends
over its whole static cache under the explicit mask (static shapes for the
graphs); ours reads only each step's real prefix through the block table.

    python benchmarks/kernels/bench_runner_e2e.py --model PATH [--random-weights] [--capacity-launch]

``--capacity-launch`` adds a third runner on our kernels whose CUDA graphs launch for the
whole cache capacity (one graph per step size, as before prefix buckets): the A/B of
the per-prefix-bucket graphs in the same run.

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
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runner-e2e-h200.json"))
    args = ap.parse_args()

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
    runners = {
        "sdpa": ReferenceRunner(model, tok, device),
        "paged-triton": ReferenceRunner(copy.deepcopy(model), tok, device,
                                        attn_backend="paged-triton"),
    }
    if args.capacity_launch:
        whole = ReferenceRunner(copy.deepcopy(model), tok, device, attn_backend="paged-triton")
        whole.MIN_KEY_BOUND = 1 << 30  # every bucket is the whole cache
        runners["paged-triton-capacity"] = whole
    prompts = [runners["sdpa"].encode_chat(p) for p in PROMPTS]
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
            results.append(row)
            print(f"{method:<10}{name:<22}{row['tokens_per_s']:9.1f} tok/s  MAT {row['mat']:.2f}  "
                  f"{steps} steps", flush=True)
    for method in args.methods.split(","):
        a = outputs[(method, "sdpa")]
        sdpa_row = next(r for r in results if r["method"] == method and r["attention"] == "sdpa")
        for name in list(runners)[1:]:
            b = outputs[(method, name)]
            same = sum(x == y for x, y in zip(a, b))
            common = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
                      for x, y in zip(a, b)]
            ours_row = next(r for r in results if r["method"] == method and r["attention"] == name)
            ours_row["speedup_vs_sdpa"] = ours_row["tokens_per_s"] / sdpa_row["tokens_per_s"]
            ours_row["identical_outputs"] = f"{same}/{len(a)}"
            ours_row["first_divergence"] = common
            print(f"{method}: {name} / sdpa = {ours_row['speedup_vs_sdpa']:.2f}x; "
                  f"identical outputs {same}/{len(a)}; first divergence at {common}", flush=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = {"command": " ".join(["python"] + sys.argv), "device": device_name,
                "torch": torch.__version__, "dtype": args.dtype, "random_weights": args.random_weights,
                "max_new_tokens": args.max_new_tokens, "prompts": PROMPTS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
