"""`msn generate`: decode one prompt with the reference runner and report its speed."""

from __future__ import annotations

import argparse
import json
import sys

from msn.errors import UsageError

METHODS = ("ar", "jacobi", "tr-jacobi", "pld")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt (reference runner)")
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    p.add_argument("--method", default="tr-jacobi", choices=METHODS)
    p.add_argument("--model", default=None, help="base, msn, or a local HF checkpoint path")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--template", default=None,
                   help="tree template name or JSON path (default per method)")
    p.add_argument("--attn-backend", default="sdpa", choices=("sdpa", "paged-triton", "paged-torch"),
                   help="attention: transformers SDPA over a static cache, or our paged "
                        "cache with the Triton tree kernel (or its PyTorch reference)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object as the last stdout line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise UsageError("the prompt is empty")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")

    from msn.models import resolve_model
    from proposers.reference.runner import DEFAULT_TEMPLATES, GenerationConfig, ReferenceRunner
    from proposers.templates import TemplateError, load_template

    try:
        cfg = GenerationConfig(
            method=args.method, max_new_tokens=args.max_new_tokens, template=args.template,
            stop=args.stop, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        )
        if cfg.method != "ar":  # a bad template fails before the model loads
            load_template(cfg.template or DEFAULT_TEMPLATES[cfg.method])
    except (ValueError, TemplateError) as exc:
        raise UsageError(str(exc)) from None
    path = resolve_model(args.model, dtype=args.dtype)
    try:
        runner = ReferenceRunner.load(path, device=args.device, dtype=args.dtype,
                                      attn_backend=args.attn_backend)
        ids = runner.encode(args.prompt) if args.raw else runner.encode_chat(args.prompt)
        result = runner.generate(ids, cfg)
    except (ValueError, TemplateError) as exc:
        raise UsageError(str(exc)) from None
    print(result.text)
    print(
        f"[{result.method}] {len(result.token_ids)} tokens, {result.num_steps} steps, "
        f"MAT {result.mat:.3f}, {result.tokens_per_s:.1f} tok/s, finish={result.finish_reason}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result.to_json()))
    return 0
