"""How long the first request of a new prompt length waits after `ReferenceRunner.warm_up`.

A server runs `warm_up` before it reports ready; whatever compiling or graph capture is
left after it, the first request that needs it pays. This loads the runner as the
server's `--reference-compile` does, warms it up with or without the second prefill
length (`--no-second-prefill`: what `warm_up` did before it had one), then generates a
few prompts of different padded prefill lengths twice each: the first run's time minus
the second's is what that request paid once.

    python -m benchmarks.reference.first_request --model msn --device cuda \\
        --dtype bfloat16 --attn-backend paged-triton --out first-request.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from msn.errors import UsageError
from msn.models import resolve_model
from proposers.reference.runner import GenerationConfig, ReferenceRunner

TEXTS = ("Name three colours.",
         "Summarize this sentence in five words: " + "the quick brown fox jumps over the lazy dog " * 8,
         "Translate to French: " + "I would like a cup of tea and a slice of cake, please. " * 14)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="msn")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--attn-backend", default="paged-triton",
                   choices=("sdpa", "paged-triton", "paged-torch"))
    p.add_argument("--no-second-prefill", action="store_true",
                   help="warm up without the second prefill length")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        path = resolve_model(args.model)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runner = ReferenceRunner.load(path, device=args.device, dtype=args.dtype,
                                  attn_backend=args.attn_backend, compile_steps=True)
    t0 = time.perf_counter()
    runner.warm_up(second_prefill=not args.no_second_prefill)
    warm_s = time.perf_counter() - t0
    rows = []
    for text in TEXTS:
        ids = runner.encode_chat(text)
        cfg = GenerationConfig(method="tr-jacobi", max_new_tokens=args.max_new_tokens,
                               ignore_eos=True)
        first = runner.generate(ids, cfg).elapsed_s
        again = runner.generate(ids, cfg).elapsed_s
        rows.append({"prompt_tokens": len(ids), "prefill_bucket": runner.prefill_bucket(len(ids) - 1),
                     "first_s": round(first, 4), "again_s": round(again, 4),
                     "one_time_s": round(first - again, 4)})
        print(f"prompt {len(ids):4d} tokens (bucket {rows[-1]['prefill_bucket']}): first "
              f"{first:.3f} s, again {again:.3f} s")
    result = {"command": "python -m benchmarks.reference.first_request " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "second_prefill": not args.no_second_prefill,
              "warm_up_s": round(warm_s, 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"warm_up {warm_s:.1f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
