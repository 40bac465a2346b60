"""Where the reference runner's host time goes: cProfile over greedy generations.

On a GPU the captured step graph runs asynchronously; the host waits for it in the
`.cpu()` copy of the step's targets, so that wait shows up as the copy's time and
everything else listed is host work the GPU waits for.

    python -m benchmarks.reference.host_profile --model msn --device cuda --dtype bfloat16 \
        --attn-backend paged-triton --compile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from msn.models import resolve_model
from proposers.reference.runner import DTYPES, METHODS, GenerationConfig, ReferenceRunner

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarize the plot of Romeo and Juliet in five sentences.",
    "Explain step by step how to compute 17 * 23 without a calculator.",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="msn", help="base, msn, or a checkpoint path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--attn-backend", default="paged-triton",
                    choices=("sdpa", "paged-triton", "paged-torch"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--method", default="tr-jacobi", choices=METHODS)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=35)
    args = ap.parse_args(argv)

    runner = ReferenceRunner.load(resolve_model(args.model), device=args.device, dtype=args.dtype,
                                  attn_backend=args.attn_backend, compile_steps=args.compile)
    cfg = GenerationConfig(method=args.method, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    prompts = [runner.encode_chat(p) for p in PROMPTS]
    for p in prompts:  # warm-up: compiles and graph captures stay out of the profile
        runner.generate(p, cfg)
    split_steps(runner, prompts, cfg)
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    outs = [runner.generate(p, cfg) for p in prompts]
    profile.disable()
    elapsed = time.perf_counter() - t0
    steps = sum(o.num_steps for o in outs)
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"{args.method} {args.attn_backend}{'+compile' if args.compile else ''}: {tokens} tokens, "
          f"{steps} steps, {elapsed / steps * 1e6:.0f} us a step under the profiler")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats(key).print_stats(args.top)
        print(buf.getvalue())
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def split_steps(runner: ReferenceRunner, prompts: list[list[int]], cfg: GenerationConfig) -> dict:
    """Without the profiler: one generation per prompt split into prefill, and per graph
    step (by step size) staging, replay launch and the wait for its result; the rest of
    the decode time is the loop's own bookkeeping (drafts, acceptance, text)."""
    prefill = []
    real_prefill = runner._prefill

    def timed_prefill(*args, **kwargs):
        runner._sync()
        t0 = time.perf_counter()
        out = real_prefill(*args, **kwargs)
        runner._sync()
        prefill.append(time.perf_counter() - t0)
        return out

    runner._prefill, runner.step_timer = timed_prefill, []
    try:
        outs = [runner.generate(p, cfg) for p in prompts]
    finally:
        del runner._prefill
        times, runner.step_timer = runner.step_timer, None
    steps = sum(o.num_steps for o in outs)
    decode = sum(o.elapsed_s for o in outs) - sum(prefill)
    report = {"steps": steps, "prefill_ms": 1e3 * sum(prefill) / len(prefill),
              "decode_us_per_step": 1e6 * decode / steps, "graph_steps": {}}
    for q in sorted({t[0] for t in times}):
        rows = [t for t in times if t[0] == q]
        report["graph_steps"][q] = {
            "count": len(rows),
            **{name: round(1e6 * sum(r[i] for r in rows) / len(rows), 1)
               for i, name in ((1, "stage_us"), (2, "launch_us"), (3, "wait_us"))}}
    in_steps = sum(t[1] + t[2] + t[3] for t in times)
    report["bookkeeping_us_per_step"] = round(1e6 * (decode - in_steps) / steps, 1)
    print(f"split (no profiler): prefill {report['prefill_ms']:.1f} ms a prompt; decode "
          f"{report['decode_us_per_step']:.0f} us a step, of which outside the step graphs "
          f"{report['bookkeeping_us_per_step']:.0f} us; graph steps by size "
          f"{report['graph_steps']}", flush=True)
    return report


if __name__ == "__main__":
    main()
