"""Where should a retrieval chain come from: the request's own context, or the corpus?

The plugin drafts a retrieval chain from the request's own context (prompt + output so
far, `NgramIndex`) or from the outputs of earlier requests (`CorpusIndex`, algorithm.md
section 5). This replays real greedy outputs offline: plain vLLM answers the dev set's
first `--per-group` questions per task group, then, question by question in each group
(the corpus holding the earlier answers of the group, cleared every `--clear-every`
questions), every output position looks up both sources and counts how many tokens of
each chain the answer went on to match: what a drafted chain would have had accepted
(greedy output does not depend on drafting). A second scenario asks every question of
the group again after the first round (a repeated or regenerated request) and counts
the second round only. Reported per (own match length, corpus match length, whether
the corpus match runs back CORPUS_LONG tokens), and in total for the ways of choosing
between the sources (`RULES`; the proposer's is marked "default").

No timing: acceptance only, exact and deterministic for given outputs.

    python -m benchmarks.vllm.retrieval_sources --model base msn

Writes `<out>.json` and `<out>.png` (default benchmarks/results/retrieval_sources).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.vllm.bench_vllm import DEV_SET, ENGINE_ENV, GROUPS, ROOT, group_questions
from proposers.retrieval import CorpusIndex, NgramIndex
from proposers.vllm.proposer import CORPUS_LONG

DEPTH = 10  # tokens of a chain (the retrieval template's depth)
MAX_NGRAM, CORPUS_MIN_NGRAM = 3, 2  # the plugin's defaults (TRJacobiConfig)

# How to choose between the own chain (match length n) and the corpus chain (m; `long`:
# the corpus match runs back CORPUS_LONG tokens).
RULES = {
    "own only": lambda n, m, long: False,
    "corpus if no own match": lambda n, m, long: n == 0 and m > 0,
    "corpus if longer": lambda n, m, long: m > n,
    "default: corpus if no own match or long": lambda n, m, long: (n == 0 and m > 0) or long,
    "corpus if longer than a 1-gram or long": lambda n, m, long: (m > n and n <= 1) or long,
}


def matched(chain: list[int], actual: list[int]) -> int:
    """Tokens of `chain` a greedy answer `actual` (what followed) would have accepted."""
    count = 0
    for draft, token in zip(chain, actual):
        if draft != token:
            break
        count += 1
    return count


def simulate(groups: dict[str, list[dict]], clear_every: int, rounds: int = 1) -> dict:
    """Replay each group's requests ({"prompt": ids, "output": ids}) in order, `rounds`
    times over (counting the last round only); returns, per (own n, corpus m, long)
    triple, the positions and the accepted tokens of each source, and the mean accepted
    tokens per position under each of `RULES`."""
    pairs: dict[tuple[int, int, bool], list[float]] = defaultdict(lambda: [0, 0, 0])
    for requests in groups.values():
        corpus = CorpusIndex(1 << 16, MAX_NGRAM, CORPUS_MIN_NGRAM)
        for i, request in enumerate(requests * rounds):
            if i % clear_every == 0:
                corpus.clear()
            counted = i >= (rounds - 1) * len(requests)
            prompt, output = request["prompt"], request["output"]
            own = NgramIndex(MAX_NGRAM)
            for t in range(1, len(output) if counted else 0):  # lookups follow a token
                own.sync(np.asarray(prompt + output[:t]))
                chain, n = own.match(DEPTH)
                shared, m, length = (corpus.match(own.tokens, DEPTH, extend=CORPUS_LONG)
                                     if len(corpus) else ([], 0, 0))
                actual = output[t: t + DEPTH]
                cell = pairs[(n, m, length >= CORPUS_LONG)]
                cell[0] += 1
                cell[1] += matched(chain, actual)
                cell[2] += matched(shared, actual)
            # As the proposer adds a finished request: its output led in by the last
            # max_ngram tokens before it.
            corpus.add((prompt + output)[max(len(prompt) - MAX_NGRAM, 0):])
    positions = sum(c[0] for c in pairs.values()) or 1
    rules = {name: sum(c[2] if pick(*key) else c[1] for key, c in pairs.items()) / positions
             for name, pick in RULES.items()}
    return {"clear_every": clear_every, "rounds": rounds, "positions": positions,
            "rules": rules,
            "pairs": [{"own_n": n, "corpus_m": m, "long": long, "positions": c[0],
                       "own_accepted": c[1] / c[0], "corpus_accepted": c[2] / c[0]}
                      for (n, m, long), c in sorted(pairs.items())]}


def scenario(run: dict) -> str:
    if run["rounds"] > 1:
        return "the same questions again"
    return f"distinct questions, corpus of {run['clear_every'] - 1} answers at most"


def generate(model_name: str, per_group: int, max_tokens: int, dev_set: str) -> dict:
    """Plain vLLM's greedy answers to the first `per_group` dev questions per group."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from msn.models import resolve_model

    model = str(resolve_model(model_name))
    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=4096,
              max_num_seqs=16)
    questions = group_questions(Path(dev_set), per_group)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out = {}
    for group in GROUPS:
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions[group]]
        out[group] = [{"prompt": list(r.prompt_token_ids), "output": list(r.outputs[0].token_ids)}
                      for r in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(model, run) for model, runs in results.items() for run in runs]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(RULES)
    for k, name in enumerate(RULES):
        ax.bar([i + k * width for i in range(len(runs))],
               [run["rules"][name] for _, run in runs], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))],
                  [f"{model}\n" + ("asked again" if run["rounds"] > 1 else
                                   f"distinct, corpus <= {run['clear_every'] - 1}")
                   for model, run in runs], fontsize=8)
    ax.set_ylabel("accepted tokens per lookup")
    ax.set_title("Retrieval chain: own context vs shared corpus (offline replay)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def markdown(results: dict) -> str:
    lines = ["| model | scenario | " + " | ".join(RULES) + " |",
             "|---|---|" + "---|" * len(RULES)]
    for model, runs in results.items():
        for run in runs:
            lines.append(f"| {model} | {scenario(run)} | "
                         + " | ".join(f"{run['rules'][r]:.3f}" for r in RULES) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["base", "msn"])
    ap.add_argument("--dev-set", default=str(DEV_SET))
    ap.add_argument("--per-group", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clear-every", type=int, nargs="+", default=[3, 12],
                    help="questions per corpus (3: the interleaved benchmark's runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval_sources"))
    args = ap.parse_args()
    if min(args.per_group, args.max_tokens, *args.clear_every) < 1:
        ap.error("--per-group, --max-tokens and --clear-every must be positive")
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    results, outputs = {}, {}
    for model in args.model:
        outputs[model] = generate(model, args.per_group, args.max_tokens, args.dev_set)
        results[model] = [simulate(outputs[model], k) for k in args.clear_every] + [
            simulate(outputs[model], 2 * args.per_group, rounds=2)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vllm.retrieval_sources " + shlex.join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "per_group": args.per_group,
            "max_tokens": args.max_tokens, "depth": DEPTH, "max_ngram": MAX_NGRAM,
            "corpus_min_ngram": CORPUS_MIN_NGRAM, "corpus_long": CORPUS_LONG}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results},
                                                   indent=1))
    plot(results, out.with_suffix(".png"))
    for model, runs in results.items():
        for run in runs:
            print(f"{model}, {scenario(run)}:")
            for cell in run["pairs"]:
                print(f"  own n={cell['own_n']} corpus m={cell['corpus_m']}"
                      f"{' long' if cell['long'] else ''}: "
                      f"{cell['positions']:5d} positions, accepted own {cell['own_accepted']:.3f}"
                      f", corpus {cell['corpus_accepted']:.3f}")
    print(markdown(results))


if __name__ == "__main__":
    main()
