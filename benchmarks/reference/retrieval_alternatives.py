"""How much a second retrieval chain could add (a question for the candidate table).

The retrieval branch drafts what followed the most recent earlier match of the context's
last 1-3 tokens (longest match first). This asks, on greedy outputs of the dev set's
prompts: at every output position, how many of the tokens that really follow does that
chain get right (up to `--depth`), and how many would the better of it and a second chain
get, the continuation of the next most recent match whose first token differs. Counted
per position, not per TR-Jacobi step, and without the Jacobi tree, so it bounds what a
second retrieval column ("R2", not implemented) could add; it is not a MAT.

    python -m benchmarks.reference.retrieval_alternatives --model msn --per-group 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.specbench import load_questions
from msn.models import default_model_name

RESULTS = Path(__file__).resolve().parent.parent / "results"


def chain_agreement(seq: list[int], start: int, pos: int, depth: int) -> int:
    """Tokens from `start` on that equal the ones after `pos` (at most `depth`)."""
    n = 0
    while (n < depth and start + n <= pos and pos + 1 + n < len(seq)
           and seq[start + n] == seq[pos + 1 + n]):
        n += 1
    return n


def alternatives(seq: list[int], pos: int, depth: int, max_ngram: int = 3) -> tuple[int, int]:
    """(first chain's agreement, best of the first and a second chain's) at `pos`."""
    ctx = seq[: pos + 1]
    for n in range(min(max_ngram, pos), 0, -1):
        suffix = ctx[-n:]
        ends = [e for e in range(pos - 1, n - 2, -1) if ctx[e - n + 1: e + 1] == suffix]
        if ends:
            first = chain_agreement(seq, ends[0] + 1, pos, depth)
            for e in ends[1:]:
                if seq[e + 1] != seq[ends[0] + 1]:
                    return first, max(first, chain_agreement(seq, e + 1, pos, depth))
            return first, first
    return 0, 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model_name())
    p.add_argument("--per-group", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS / "retrieval-alternatives-cpu.json")
    args = p.parse_args(argv)
    from msn.models import resolve_model
    from proposers.reference.runner import GenerationConfig, ReferenceRunner

    runner = ReferenceRunner.load(resolve_model(args.model), device="cpu", dtype="float32")
    cfg = GenerationConfig(method="pld", max_new_tokens=args.max_new_tokens)  # = ar's tokens
    first, best = [], []
    for q in tqdm(load_questions(args.per_group), desc="prompts", file=sys.stderr):
        ids = runner.encode_chat(q["turns"][0])
        seq = list(ids) + runner.generate(ids, cfg).token_ids
        for pos in range(len(ids) - 1, len(seq) - 1):
            a, b = alternatives(seq, pos, args.depth)
            first.append(a)
            best.append(b)
    first_a, best_a = np.array(first), np.array(best)
    result = {
        "command": "python -m benchmarks.reference.retrieval_alternatives " + shlex.join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model, "depth": args.depth,
        "positions": len(first), "first_chain_mean": round(float(first_a.mean()), 4),
        "best_of_two_mean": round(float(best_a.mean()), 4),
        "first_right_at_depth1": round(float((first_a > 0).mean()), 4),
        "either_right_at_depth1": round(float((best_a > 0).mean()), 4),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
