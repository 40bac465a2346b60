"""`msn train` and `msn data build`. Heavy imports stay inside the command functions."""

from __future__ import annotations

import argparse
from pathlib import Path

from msn.errors import UsageError


def add_parser(subparsers) -> None:
    _add_train(subparsers)
    _add_data(subparsers)
    _add_artifact(subparsers)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a model with MSN noise (or plain SFT with --span-length 0)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="JSONL of {'messages': [...]} rows")
    p.add_argument("--output", required=True, help="folder for checkpoints and the result")
    p.add_argument("--model", default="base", help="'base', 'msn' or a checkpoint path")
    p.add_argument("--method", choices=("full", "lora", "linear"), default="full",
                   help="linear: full fine-tuning of the block linear layers only, for a "
                   "small extracted artifact (msn artifact extract)")
    g = p.add_argument_group("MSN noise")
    g.add_argument("--span-length", type=int, default=5, help="L; 0 disables noise (SFT)")
    g.add_argument("--num-spans", type=int, default=1)
    g.add_argument("--noise-prob", type=float, default=1.0,
                   help="probability that an example is noised")
    g.add_argument("--noise-source", choices=("context", "vocab"), default="context")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=3.0)
    g.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-length", type=int, default=1024)
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--fp32", action="store_true", help="no bf16 autocast even on CUDA")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest checkpoint in --output, or from PATH")
    g.add_argument("--logging-steps", type=int, default=10)
    g.add_argument("--save-steps", type=int, default=500)
    g.add_argument("--limit", type=int, default=None, help="use the first N examples only")
    g.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                   help="stop (and save) at the first step past this wall-clock time")
    p.set_defaults(func=run_train)


def _add_data(subparsers) -> None:
    p = subparsers.add_parser("data", help="build training data offline")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = sub.add_parser(
        "build", help="self-distil an SFT set: Magpie prompts + local-text tasks, "
        "answered by the model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--output", required=True, help="JSONL file to write")
    b.add_argument("--model", default="base", help="'base', 'msn' or a checkpoint path")
    b.add_argument("--num-magpie", type=int, default=1000,
                   help="prompts the model writes itself from the user-turn prefix")
    b.add_argument("--num-tasks", type=int, default=1000,
                   help="prompts built from local text (docstrings, documentation)")
    b.add_argument("--docs", action="append", default=[], metavar="DIR",
                   help="extra folders of .md/.txt/.rst text for summarise/QA/rewrite "
                   "tasks (repeatable); Python's own docstrings are always used")
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--prompt-tokens", type=int, default=64,
                   help="max tokens of a Magpie prompt")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--temperature", type=float, default=0.0,
                   help="answer temperature (0 = greedy)")
    b.add_argument("--min-response-tokens", type=int, default=16)
    b.add_argument("--drop-truncated", action="store_true",
                   help="drop answers cut at --max-new-tokens instead of keeping them "
                   "without an end-of-turn target")
    b.add_argument("--shard", default="0/1", metavar="I/N",
                   help="build shard I of N (one process per GPU); --num-* are per shard")
    b.add_argument("--heldout-fraction", type=float, default=0.02,
                   help="share of rows marked split=heldout for quality checks")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda")
    b.add_argument("--no-compile", action="store_true",
                   help="eager decoding even on CUDA (slow: host-bound there)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=run_data_build)
    m = sub.add_parser("merge", help="merge shard files, dropping repeated prompts")
    m.add_argument("shards", nargs="+", help="shard JSONL files")
    m.add_argument("--output", required=True)
    m.set_defaults(func=run_data_merge)


def run_data_merge(args) -> int:
    from training.data import merge_shards

    paths = [Path(p) for p in args.shards]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"no such shard: {', '.join(missing)}")
    try:
        merge_shards(paths, Path(args.output))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _add_artifact(subparsers) -> None:
    p = subparsers.add_parser("artifact", help="make the small committed MSN artifact")
    sub = p.add_subparsers(dest="artifact_command", metavar="ACTION", required=True)
    e = sub.add_parser(
        "extract", help="compress a --method linear run into a rank-r LoRA adapter",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--tuned", required=True, help="checkpoint written by msn train")
    e.add_argument("--output", required=True, help="artifact folder to write")
    e.add_argument("--base", default="base", help="the model the run started from")
    e.add_argument("--rank", type=int, default=32)
    e.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    e.set_defaults(func=run_artifact_extract)


def run_artifact_extract(args) -> int:
    from training.artifact import extract_lora_artifact

    tuned = Path(args.tuned)
    if not (tuned / "config.json").is_file():
        raise UsageError(f"--tuned {tuned} is not a checkpoint folder")
    try:
        extract_lora_artifact(_model_path(args.base), tuned, Path(args.output), args.rank,
                              args.dtype)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _model_path(spec: str, dtype: str = "float32") -> Path:
    from msn.models import resolve_model

    return resolve_model(spec, dtype=dtype)


def run_train(args) -> int:
    from training.noise import NoiseConfig
    from training.train import TrainConfig, train

    data = Path(args.data)
    if not data.is_file():
        raise UsageError(f"--data {data} is not a file")
    from training.data import assert_not_benchmark

    try:
        assert_not_benchmark(data)
        noise = NoiseConfig(span_length=args.span_length, num_spans=args.num_spans,
                            probability=args.noise_prob, source=args.noise_source)
        config = TrainConfig(
            data=data, output_dir=Path(args.output), model_path=_model_path(args.model),
            method=args.method, noise=noise, epochs=args.epochs, max_steps=args.max_steps,
            learning_rate=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
            max_length=args.max_length, warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
            seed=args.seed, bf16=False if args.fp32 else None,
            gradient_checkpointing=args.gradient_checkpointing, resume=args.resume,
            logging_steps=args.logging_steps, save_steps=args.save_steps,
            limit_examples=args.limit, max_time_s=args.max_time)
        train(config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def run_data_build(args) -> int:
    from training.data import BuildConfig, build_dataset

    out = Path(args.output)
    if out.suffix != ".jsonl":
        raise UsageError(f"--output {out} must end in .jsonl")
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(shard) == 2 and 0 <= shard[0] < shard[1]
    except (ValueError, AssertionError):
        raise UsageError(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}") from None
    try:
        config = BuildConfig(
            output=out, model_path=_model_path(args.model), num_magpie=args.num_magpie,
            num_tasks=args.num_tasks, docs=[Path(d) for d in args.docs],
            max_new_tokens=args.max_new_tokens, prompt_tokens=args.prompt_tokens,
            batch_size=args.batch_size, temperature=args.temperature,
            min_response_tokens=args.min_response_tokens,
            heldout_fraction=args.heldout_fraction, device=args.device,
            compile=not args.no_compile, seed=args.seed,
            keep_truncated=not args.drop_truncated, shard=shard)
        build_dataset(config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0
