"""Plain vLLM and the plugin decoding the same batch in lockstep: paired per-step timing.

`bench_interleaved.py` times whole batches one engine after the other, 15-20 s apart,
and on this 2-core machine identical work moves by up to 1.6x within minutes
(`vllm-cpu-log.md`): a 3% difference needs tens of batches to resolve. Here every
engine gets the same batch at once and the engines take turns, one engine step each
(vLLM's in-process engine core, `VLLM_ENABLE_V1_MULTIPROCESSING=0`: `LLMEngine.step`
runs exactly one schedule + forward + sampling + drafting step, in the worker process),
with who goes first rotating every round. Each engine's time is the sum of its own
steps, so a slow minute of the machine slows every engine alike, ~0.1 s apart instead
of ~20 s. Each engine's steps follow another engine's step (never its own), as in
`bench_interleaved`'s warm-up rule, and the output handling of the in-process engine
core is inside the timed step for every engine alike. Every engine runs vLLM-CPU's
multiprocess executor (the plugin's is a subclass of it), as outside lockstep, and every
process's shared-memory readers sleep while they wait (`lockstep_workers.py`: vLLM's
readers otherwise spin for 1 s after each read, and in lockstep the idle engines' spinning
slowed whichever engine was stepping).

The rows have `bench_interleaved`'s format (tokens, seconds, tok/s, outputs compared
with plain vLLM's), so its summary, `--report` and `pool_runs.py` read them; each row
also holds the step pairing: the median, over rounds where both engines produced one
token per request (no draft accepted), of each engine's step time over plain vLLM's step
of the same round (what an undrafted step of the plugin engine costs, planning on its
critical path included), every step's time and new tokens, and each plugin engine's
split of its time (forward and sampling, drafting) from its worker's clocks.

An engine keeps its speed relative to an identical one for its whole life, a few
percent apart (vllm-cpu-log.md): batches of one set of engines sample the machine, not the
engines. `--plain-twin --plugin-twin` gives each side two engines at the same mean build
position (`pairs`), `--rebuild` builds every repeat's engines afresh in a new random order,
so that the repeats sample engines too (`pairs.*.by_repeat`, `ci90_repeats`), and
`--pair-variant NAME=JSON` adds pairs with other TR-Jacobi settings.

    python -m benchmarks.vllm.bench_lockstep --model msn --batch-sizes 8 --repeats 5 \\
        --groups mt_bench summarization qa math_reasoning --rebuild --plain-twin \\
        --plugin-twin --out benchmarks/results/vllm_cpu_msn_lockstep_b8-rebuild

Writes `<out>.json` and `<out>.png` (default benchmarks/results/vllm_cpu_lockstep).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.vllm.bench_interleaved import (
    OFF,
    TWIN,
    WARM_TOKENS,
    geo_interval,
    geomean,
    mat,
    paired_summary,
    plugin_variant,
    spec_counts,
    write_report,
)
from benchmarks.vllm.bench_vllm import ENGINE_ENV, GROUPS, ROOT, group_questions, workload_args

INPROC_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
PLUGIN_TWIN = "plugin-twin"  # a second planned plugin engine (--plugin-twin)


def twin_name(name: str) -> str:
    """The second engine of a --pair-variant pair."""
    return f"{name}-twin"


def lockstep(engines: dict, requests: dict[str, list[tuple[str, str, object]]],
             clock=time.perf_counter) -> dict[str, dict]:
    """Step every engine of `engines` (name -> object with `add_request(id, prompt,
    params)`, `step()` and `has_unfinished_requests()`, e.g. vLLM's `LLMEngine`) in turn
    until all of its `requests[name]` (id, prompt, params) finished; who steps first
    rotates every round. Returns per engine: `seconds` (its steps' sum), `steps` (each
    step's seconds, with None for the rounds it sat out), `tokens` (new tokens each step;
    None likewise) and `outputs` (request id -> the finished RequestOutput)."""
    names = list(engines)
    out = {n: {"seconds": 0.0, "steps": [], "tokens": [], "outputs": {}} for n in names}
    seen: dict[str, dict[str, int]] = {n: {} for n in names}
    for name in names:
        for rid, prompt, params in requests[name]:
            engines[name].add_request(rid, prompt, params)
    active = [n for n in names if engines[n].has_unfinished_requests()]
    rnd = 0
    while active:
        k = rnd % len(active)
        for name in active[k:] + active[:k]:
            t0 = clock()
            step_outputs = engines[name].step()
            dt = clock() - t0
            cell = out[name]
            cell["seconds"] += dt
            new = 0
            for o in step_outputs:
                n = len(o.outputs[0].token_ids)
                new += n - seen[name].get(o.request_id, 0)
                seen[name][o.request_id] = n
                if o.finished:
                    cell["outputs"][o.request_id] = o
            cell["steps"].append(dt)
            cell["tokens"].append(new)
        for name in names:  # rounds an engine sat out keep the step lists aligned
            if name not in active:
                out[name]["steps"].append(None)
                out[name]["tokens"].append(None)
        active = [n for n in active if engines[n].has_unfinished_requests()]
        rnd += 1
    return out


def undrafted_step_ratio(plugin: dict, plain: dict, batch: int) -> float | None:
    """Median, over rounds where both engines stepped a full batch of `batch` decoding
    requests and the plugin produced one token per request (no draft accepted), of the
    plugin's step time over plain vLLM's; None without such rounds. The first rounds
    (prefill) are left out by the token count (a prefill step produces `batch` tokens
    only when every prompt fits one step: both engines alike)."""
    ratios = [ps / qs for ps, pt, qs, qt in zip(plugin["steps"], plugin["tokens"],
                                                plain["steps"], plain["tokens"])
              if ps is not None and qs is not None and pt == batch and qt == batch and qs > 0]
    return round(statistics.median(ratios), 4) if ratios else None


def pair_ratios(rows: list[dict], pair: tuple[str, str] = ("plugin", PLUGIN_TWIN)) -> dict:
    """Per group (and "all"): the geometric mean over batches of the two engines of `pair`
    (the plugin and its twin by default): their throughput (geometric mean) over the two
    plain engines', with a 90% bootstrap interval. Built as a palindrome (plain, plugin,
    plugin, plain; variant pairs nested inside), every pair sits at the same mean build
    position. Batches with outputs differing from plain vLLM are left out."""
    a, b = pair
    out = {}
    groups = list(dict.fromkeys(r["group"] for r in rows))
    for group in [*groups, "all"]:
        by_repeat: dict[int, list[float]] = {}
        for r in rows:
            if group in ("all", r["group"]) and r["identical_outputs"]:
                by_repeat.setdefault(r.get("repeat", 0), []).append(math.sqrt(
                    r["tok_s"][a] * r["tok_s"][b] / (r["tok_s"]["plain"] * r["tok_s"][TWIN])))
        ratios = [x for v in by_repeat.values() for x in v]
        if ratios:
            lo, hi = geo_interval(ratios)
            out[group] = {"geomean": round(geomean(ratios), 4),
                          "ci90": [round(lo, 4), round(hi, 4)], "batches": len(ratios)}
            # With --rebuild each repeat has its own engines, whose speed differs by a few
            # percent per engine (the log): the repeat, not the batch, is then the unit,
            # and this interval over the repeats' geometric means is the one to read.
            means = [geomean(v) for v in by_repeat.values()]
            out[group]["by_repeat"] = [round(m, 4) for m in means]
            if len(means) > 1:
                lo, hi = geo_interval(means)
                out[group]["ci90_repeats"] = [round(lo, 4), round(hi, 4)]
    return out


def run(args) -> dict:
    from transformers import AutoTokenizer
    from vllm import EngineArgs, LLMEngine, SamplingParams

    # Importing it makes this process's shm readers sleep (the in-process engine cores).
    from benchmarks.vllm.lockstep_workers import PLAIN_WORKER, PLUGIN_WORKER
    from msn.models import resolve_model
    from proposers.vllm import engine_kwargs
    from proposers.vllm.config import TRJacobiConfig

    model = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model)
    batch = args.batch_sizes[0]
    common = {"model": model, "dtype": "float32", "enforce_eager": True, "seed": 0,
              "max_model_len": 4096, "max_num_seqs": batch, "disable_log_stats": True}
    spec = {**common, "per_request_spec_decode_metrics": "summary",
            **engine_kwargs(max_num_seqs=batch), "worker_cls": PLUGIN_WORKER}
    # vLLM-CPU picks its multiprocess executor only with engine-core multiprocessing on;
    # here it must be asked for, as the plugin's executor (a subclass of it) is.
    builders = {"plain": {**common, "worker_cls": PLAIN_WORKER,
                          "distributed_executor_backend": "mp"}, "plugin": spec}
    if args.plugin_twin:
        builders[PLUGIN_TWIN] = spec
    if args.plugin_off:
        builders[OFF] = spec  # its own engine: sharing the plugin's would batch both
        if args.off_first:  # built (and listed) before the plugin's engine
            builders = {"plain": builders["plain"], OFF: spec,
                        **{n: b for n, b in builders.items() if n not in ("plain", OFF)}}
    # Variant pairs nest inside the plugin pair, mirrored: plain, plugin, A, B, B', A',
    # plugin twin, plain twin (main() requires both twins).
    for name, overrides in args.pair_variant:
        builders[name] = {**spec, **engine_kwargs(TRJacobiConfig(**overrides),
                                                  max_num_seqs=batch),
                          "worker_cls": PLUGIN_WORKER}
    for name, _ in reversed(args.pair_variant):
        builders[twin_name(name)] = builders[name]
    if args.plugin_twin:
        builders[PLUGIN_TWIN] = builders.pop(PLUGIN_TWIN)  # after the variants
    if args.plain_twin:
        builders[TWIN] = builders["plain"]
    names = list(builders)
    plugins = [n for n in names if n not in ("plain", TWIN)]
    questions = group_questions(Path(args.dev_set), args.per_group)

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)

    params = {n: SamplingParams(temperature=0.0, max_tokens=args.max_tokens) for n in names}
    if OFF in names:
        params[OFF] = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                     extra_args={"trjacobi": "off"})
    warm = SamplingParams(temperature=0.0, max_tokens=WARM_TOKENS, extra_args={"trjacobi": "off"})

    def build(order: list[str]) -> dict:
        built = {n: LLMEngine.from_engine_args(EngineArgs(**builders[n])) for n in order}
        lockstep(built, {n: [(f"warm-{n}", chat("Hello"), warm)] for n in order})
        return built

    def stats(name: str) -> dict:
        return engines[name].collective_rpc("trjacobi_stats")[0]

    rows = []
    mismatches = 0
    rng = random.Random(0)
    engines: dict = {}
    built = names
    for repeat in range(args.repeats):
        if not engines or args.rebuild:
            for engine in engines.values():  # the last repeat's: workers and memory
                engine.engine_core.shutdown()
            engines.clear()
            gc.collect()
            if args.rebuild:  # a new build order every repeat (the first one included)
                built = rng.sample(names, len(names))
                print(f"repeat {repeat}: building {', '.join(built)}", flush=True)
            engines = build(built)
        for gi, group in enumerate(args.groups):
            prompts = [chat(questions[group][i % len(questions[group])]) for i in range(batch)]
            # Who steps first in the first round also rotates over repeats and groups.
            k = (repeat + gi) % len(built)
            order = built[k:] + built[:k]
            for n in plugins:
                engines[n].collective_rpc("trjacobi_clear_corpus")
            s0 = {n: stats(n) for n in plugins}
            res = lockstep({n: engines[n] for n in order},
                           {n: [(f"{n}-{repeat}-{group}-{i}", p, params[n])
                                for i, p in enumerate(prompts)] for n in names})
            s1 = {n: stats(n) for n in plugins}
            outs = {n: [res[n]["outputs"][f"{n}-{repeat}-{group}-{i}"] for i in range(batch)]
                    for n in names}
            tokens = {n: [list(o.outputs[0].token_ids) for o in outs[n]] for n in names}
            same = all(tokens[n] == tokens["plain"] for n in names)
            mismatches += not same
            counts = {n: spec_counts(outs[n]) for n in names}
            row = {
                "repeat": repeat, "group": group, "batch": batch, "order": order,
                "built": built,  # the order this repeat's engines were built in
                "tokens": {n: sum(map(len, tokens[n])) for n in names},
                "seconds": {n: round(res[n]["seconds"], 4) for n in names},
                "identical_outputs": same,
                "spec": {n: c for n, c in counts.items() if c is not None},
                "steps": {n: sum(s is not None for s in res[n]["steps"]) for n in names},
                "undrafted_step_ratio": {n: undrafted_step_ratio(res[n], res["plain"], batch)
                                         for n in names if n != "plain"},
                "plugin_rungs": {n: {k: v - s0[n]["rungs"].get(k, 0)
                                     for k, v in s1[n]["rungs"].items()
                                     if v - s0[n]["rungs"].get(k, 0)} for n in plugins},
                # Where each plugin engine's time went (its worker's clocks): forward and
                # sampling, drafting. (Not the worker's between-steps clock: in lockstep it
                # also counts other engines' steps shorter than its BUSY_GAP.)
                "parts": {n: {"forward": round(sum(c["seconds"] for c in s1[n]["paths"].values())
                                               - sum(c["seconds"] for c in s0[n]["paths"].values()), 4),
                              "draft": round(s1[n]["draft_seconds"] - s0[n]["draft_seconds"], 4)}
                          for n in plugins},
                # Per round: each engine's step seconds and new tokens (None: sat out).
                "step_seconds": {n: [None if s is None else round(s, 5) for s in res[n]["steps"]]
                                 for n in names},
                "step_tokens": {n: res[n]["tokens"] for n in names},
            }
            row["tok_s"] = {n: round(row["tokens"][n] / row["seconds"][n], 3) for n in names}
            rows.append(row)
            ratios = " ".join(
                f"{n} {row['tok_s'][n] / row['tok_s']['plain']:.3f}x"
                f"{'' if mat([row], n) is None else f' (MAT {mat([row], n):.2f})'}"
                f" undrafted steps {row['undrafted_step_ratio'][n]}"
                for n in names if n != "plain")
            print(f"repeat {repeat} {group:15s}: plain {row['tok_s']['plain']:6.1f} tok/s "
                  f"({row['steps']['plain']} steps); {ratios}; rungs {row['plugin_rungs']}"
                  f"{'' if same else '  OUTPUTS DIFFER'}", flush=True)
    return {"rows": rows, "engines": names, "mismatches": mismatches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_args(ap, [8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=GROUPS)
    ap.add_argument("--plugin-off", action="store_true",
                    help="also a second plugin engine with every request's drafting off")
    ap.add_argument("--off-first", action="store_true",
                    help="build the drafting-off engine before the plugin's (default: after); "
                         "the order engines are built in moves their speed by a few percent")
    ap.add_argument("--plain-twin", action="store_true",
                    help="also a second plain vLLM engine: an A/A control")
    ap.add_argument("--plugin-twin", action="store_true",
                    help="also a second planned plugin engine, built right after the first; "
                         "with --plain-twin the engines are built plain, plugin, plugin, "
                         "plain (without --plugin-off), and the two plugin engines against "
                         "the two plain ones (`pairs`) have the same mean build position")
    ap.add_argument("--rebuild", action="store_true",
                    help="build the engines afresh for every repeat, in a new random order "
                         "(seeded): an engine's speed differs from an identical one's by a "
                         "few percent for its whole life, so the engines, not only the "
                         "batches, are then sampled")
    ap.add_argument("--pair-variant", action="append", default=[], type=plugin_variant,
                    metavar="NAME=JSON",
                    help="also a pair of plugin engines NAME and NAME-twin with these "
                         "TR-Jacobi settings (e.g. 'nodraft={\"mode\": \"off\"}'), nested "
                         "inside the plugin pair so that every pair has the same mean build "
                         "position; needs --plugin-twin and --plain-twin; repeatable")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_cpu_lockstep"))
    args = ap.parse_args()
    if min(args.repeats, args.per_group, args.max_tokens) < 1 or len(args.batch_sizes) != 1 \
            or args.batch_sizes[0] < 1:
        ap.error("--repeats, --per-group and --max-tokens must be positive; "
                 "give one positive --batch-sizes")
    if args.off_first and not args.plugin_off:
        ap.error("--off-first needs --plugin-off")
    if args.off_first and args.rebuild:
        ap.error("--off-first and --rebuild exclude each other (--rebuild shuffles the build order)")
    if args.pair_variant and (args.plugin_off or not (args.plugin_twin and args.plain_twin)):
        ap.error("--pair-variant needs --plugin-twin and --plain-twin, and not --plugin-off")
    names = [name for name, _ in args.pair_variant]
    if len(set(names)) < len(names) or any(n.endswith("-twin") for n in names):
        ap.error("--pair-variant names must be distinct and must not end with -twin")
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ[INPROC_ENV] = "0"  # before vLLM is imported: engine cores in this process
    result = run(args)
    summary = paired_summary(result["rows"], result["engines"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vllm.bench_lockstep " + shlex.join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
            "max_tokens": args.max_tokens, "per_group": args.per_group,
            "repeats": args.repeats, "lockstep": True,
            "engines": result["engines"],  # the build order (with --rebuild: rows' `built`)
            "rebuild": args.rebuild,
            "device": "cpu", "dtype": "float32", "greedy": True,
            "engine_env": {k: os.environ[k] for k in ENGINE_ENV if k in os.environ},
            "batches_with_different_outputs": result["mismatches"]}
    for name in result["engines"][1:]:
        meta.setdefault("undrafted_step_ratio", {})[name] = {
            g: statistics.median(v) if (v := [r["undrafted_step_ratio"][name]
                                                for r in result["rows"] if r["group"] == g
                                                and r["undrafted_step_ratio"][name]]) else None
            for g in args.groups}
    if PLUGIN_TWIN in result["engines"] and TWIN in result["engines"]:
        meta["pairs"] = pair_ratios(result["rows"])
        print("plugin pair / plain pair:", json.dumps(meta["pairs"]))
        for name, overrides in args.pair_variant:
            meta.setdefault("variant_pairs", {})[name] = {
                "settings": overrides,
                **pair_ratios(result["rows"], (name, twin_name(name)))}
            print(f"{name} pair / plain pair:", json.dumps(meta["variant_pairs"][name]))
    write_report(out, meta, summary, result["rows"], result["mismatches"])


if __name__ == "__main__":
    main()
