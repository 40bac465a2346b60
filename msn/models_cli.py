"""`msn models prepare`: build the embedded default model's checkpoint once."""

from __future__ import annotations

import argparse
import sys

from msn import models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="prepare and list models")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    prep = msub.add_parser(
        "prepare", help="turn the embedded GGUF (and the MSN artifact) into HF checkpoints"
    )
    prep.add_argument("--model", default=None,
                      help="base, msn, or all (default: the default model: msn when its "
                      "artifact is committed, else base)")
    prep.add_argument("--msn", action="store_true", help="also prepare the MSN model")
    prep.add_argument("--dtype", default="float32", choices=models.DTYPES)
    prep.add_argument("--cache-dir", default=None,
                      help="where prepared models live (env MSN_CACHE_DIR; default "
                           "$XDG_CACHE_HOME/msn-serve)")
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    prep.set_defaults(func=_prepare)
    ls = msub.add_parser("list", help="show prepared models")
    ls.add_argument("--cache-dir", default=None)
    ls.set_defaults(func=_list)


def _prepare(args: argparse.Namespace) -> int:
    from msn.errors import UsageError

    root = models.cache_dir(args.cache_dir)
    choice = args.model or models.default_model_name()
    names = {"base": ["base"], "msn": ["msn"], "all": ["base", "msn"]}.get(choice)
    if names is None:
        raise UsageError(f"--model must be base, msn or all, got {args.model!r}")
    if args.msn and "msn" not in names:
        names.append("msn")
    log = lambda msg: print(msg, file=sys.stderr)
    for name in names:
        fn = models.prepare_base if name == "base" else models.prepare_msn
        path = fn(args.dtype, root, force=args.force, log=log)
        print(f"{name}\t{path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    folder = models.cache_dir(args.cache_dir) / "models"
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if (path / models.MARKER).is_file():
            print(path)
    return 0
