"""Pool several `bench_interleaved.py` runs of the same code: one ratio per task group.

A single interleaved run gives each group 3-8 paired batches, and on this shared 2-core
machine one batch's ratio between two plain vLLM engines (the A/A twin) moves by up to
20%, so a run's interval per group is several points wide and runs of the same code
disagree on which group sits below 1. This script reads the rows of every run named, keeps
one batch size, and pools the paired ratios of one engine to plain vLLM per group:
the geometric mean over all batches, a 90% bootstrap interval that resamples batches within
each run (a run's day shifts both engines of a row alike, so rows stay paired), the share of
batches below 1, and each run's own geometric mean. Where a row has the A/A twin, the engine
is compared to both plain engines (geometric mean of their rates, as `bench_interleaved`
reports), and the twin's own ratio to plain is pooled alongside as the noise reference.

The runs must be of the same model (it is checked) and of code that drafts alike (it is not:
name the revisions with `--code`, which is recorded). Rows whose outputs differed from plain
vLLM are counted and left out.

    python -m benchmarks.vllm.pool_runs --batch 8 --code 050a798 \\
        --out benchmarks/results/vllm_cpu_msn_pooled_b8 \\
        benchmarks/results/vllm_cpu_msn_interleaved_b8-dec3.json \\
        benchmarks/results/vllm_cpu_msn_interleaved_table-dec3.json

Writes `<out>.json` and `<out>.png`."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from benchmarks.vllm.bench_interleaved import TWIN, geomean, strata_geo_interval
from benchmarks.vllm.bench_vllm import GROUPS

LEVEL = 0.9
RESAMPLES = 4000


def row_ratio(row: dict, engine: str) -> float:
    """The engine's tokens/s over plain vLLM's in one row (both plain engines' geometric
    mean when the row has the twin)."""
    rates = row["tok_s"]
    plain = rates["plain"] if TWIN not in rates else math.sqrt(rates["plain"] * rates[TWIN])
    return rates[engine] / plain


def pool(runs: dict[str, dict], engine: str, batch: int) -> dict:
    """Per group (and over all groups): the pooled ratio of `engine` to plain vLLM and,
    where rows have it, of the twin to plain (module docstring)."""
    out: dict = {"groups": {}, "left_out": {}}
    for name, data in runs.items():
        rows = [r for r in data["rows"] if r["batch"] == batch and engine in r["tok_s"]]
        out["left_out"][name] = sum(not r.get("identical_outputs", True) for r in rows)
    for group in (*GROUPS, "all"):
        cell: dict = {}
        for who in (engine, TWIN):
            per_run = {}
            for name, data in runs.items():
                rows = [r for r in data["rows"]
                        if r["batch"] == batch and (group == "all" or r["group"] == group)
                        and engine in r["tok_s"] and who in r["tok_s"]
                        and r.get("identical_outputs", True)]
                if rows:
                    per_run[name] = [
                        r["tok_s"][TWIN] / r["tok_s"]["plain"] if who == TWIN
                        else row_ratio(r, engine) for r in rows]
            flat = [x for xs in per_run.values() for x in xs]
            if not flat:
                continue
            lo, hi = strata_geo_interval(list(per_run.values()), LEVEL, RESAMPLES)
            cell["twin" if who == TWIN else "engine"] = {
                "geomean": round(geomean(flat), 4), "ci90": [round(lo, 4), round(hi, 4)],
                "batches": len(flat), "below_1": sum(x < 1.0 for x in flat),
                "by_run": {n: round(geomean(xs), 4) for n, xs in per_run.items()},
                "ratios": {n: [round(x, 4) for x in xs] for n, xs in per_run.items()}}
        if cell:
            out["groups"][group] = cell
    return out


def markdown(pooled: dict, engine: str) -> str:
    head = (f"| group | {engine} / plain vLLM (90% interval) | batches below 1 "
            "| A/A twin / plain (90% interval) | twin batches below 1 |")
    lines = [head, "|---|---|---|---|---|"]
    for group, cell in pooled["groups"].items():
        parts = []
        for key in ("engine", "twin"):
            c = cell.get(key)
            if c is None:
                parts += ["-", "-"]
                continue
            lo, hi = c["ci90"]
            parts += [f"{c['geomean']:.3f} ({lo:.3f}-{hi:.3f})",
                      f"{c['below_1']} of {c['batches']}"]
        lines.append(f"| {group} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot(pooled: dict, engine: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in pooled["groups"] if g != "all"]
    runs = sorted({n for g in groups for c in pooled["groups"][g].values()
                   for n in c["by_run"]})
    colours = {n: f"C{i % 10}" for i, n in enumerate(runs)}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for x, group in enumerate(groups):
        for dx, key, marker in ((-0.15, "engine", "o"), (0.15, "twin", "s")):
            c = pooled["groups"][group].get(key)
            if c is None:
                continue
            for n, xs in c["ratios"].items():
                ax.scatter([x + dx] * len(xs), xs, s=10, color=colours[n], alpha=0.6,
                           marker=marker)
            lo, hi = c["ci90"]
            ax.errorbar([x + dx], [c["geomean"]], yerr=[[c["geomean"] - lo], [hi - c["geomean"]]],
                        fmt="_", color="k", capsize=6, markersize=18, lw=1.5)
    for n in runs:
        ax.scatter([], [], color=colours[n], s=10, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel("tok/s over plain vLLM (per batch)")
    ax.set_title(f"{title}: {engine} (circles, left) and the A/A twin (squares, right); "
                 "bars: pooled geometric mean, 90% interval", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="RUN.json", help="bench_interleaved.py JSONs")
    ap.add_argument("--batch", type=int, default=8, help="batch size to pool (default 8)")
    ap.add_argument("--engine", default="plugin", help="engine to compare (default plugin)")
    ap.add_argument("--code", default="",
                    help="the code revision(s) the runs measured, recorded in the JSON")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()
    runs: dict[str, dict] = {}
    for path in args.runs:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            ap.error(f"{path}: {exc}")
        if not (isinstance(data, dict) and isinstance(data.get("rows"), list)
                and "model" in data.get("meta", {})):
            ap.error(f"{path}: not a bench_interleaved.py result (no rows or meta.model)")
        runs[Path(path).stem] = data
    models = {d["meta"]["model"] for d in runs.values()}
    if len(models) != 1:
        ap.error(f"the runs are of different models: {sorted(models)}")
    pooled = pool(runs, args.engine, args.batch)
    if not pooled["groups"]:
        ap.error(f"no row of batch {args.batch} has engine {args.engine!r}")
    model = models.pop()
    table = markdown(pooled, args.engine)
    print(f"{model} model, batch {args.batch}, {len(runs)} runs pooled\n\n{table}")
    left = sum(pooled["left_out"].values())
    if left:
        print(f"\n{left} rows left out: outputs differed from plain vLLM", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vllm.pool_runs " + shlex.join(sys.argv[1:]),
            "model": model, "batch": args.batch, "engine": args.engine, "code": args.code,
            "runs": {n: {"when": d["meta"].get("when"), "command": d["meta"].get("command")}
                     for n, d in runs.items()}}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **pooled}, indent=1) + "\n")
    plot(pooled, args.engine, out.with_suffix(".png"), f"vLLM-CPU, {model} model, "
         f"batch {args.batch}, {len(runs)} runs")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
