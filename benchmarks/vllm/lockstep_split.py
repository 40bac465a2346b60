"""Several `bench_lockstep.py` runs side by side: where the plugin pair's ratio comes from.

At batch 8 the planner drafts almost nothing on some task groups (mt_bench, summarization,
math), so there the plugin is its engine with nothing to verify, and its ratio to plain
vLLM is set by how fast that engine steps. Per run, over the groups chosen (geometric means
across them), this prints:

- plain vLLM's tok/s (the machine's speed that run);
- `undrafted`: the plugin engines' steps in which no request drafted, over plain vLLM's step
  of the same round (the run's `undrafted_step_ratio`, both plugin engines), and the same
  for the plain twin (the A/A control);
- `forward`: the plugin workers' own clock of forward and sampling, all their steps, over
  the plain pair's step seconds; `drafting` and `rest` (scheduling, output handling, IPC):
  shares of the plugin engines' own step seconds;
- the plugin pair's ratio to the plain pair (the run's `pairs`).

Batches whose outputs differed from plain vLLM are left out of `forward` and its shares
(the run's `pairs` leave them out too).

    python -m benchmarks.vllm.lockstep_split --out benchmarks/results/vllm_cpu_lockstep_split \\
        4=benchmarks/results/vllm_cpu_msn_lockstep_b8-rebuild.json \\
        5=benchmarks/results/vllm_cpu_msn_lockstep_b8-rebuild-all.json

Writes `<out>.json` and `<out>.png` (pair ratio against undrafted-step ratio, a point a run)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.vllm.bench_interleaved import TWIN, geomean
from benchmarks.vllm.bench_lockstep import PLUGIN_TWIN
from benchmarks.vllm.bench_vllm import GROUPS

RARELY_DRAFTING = ("mt_bench", "summarization", "math_reasoning")
PLUGINS = ("plugin", PLUGIN_TWIN)


def split(run: dict, groups: tuple[str, ...]) -> dict:
    """One run's figures over `groups` (KeyError / ValueError: not a usable run)."""
    meta = run["meta"]
    if not meta.get("lockstep"):
        raise ValueError("not a bench_lockstep.py result (meta.lockstep is not set)")
    missing = [n for n in (*PLUGINS, TWIN) if n not in meta.get("engines", ())]
    if missing:
        raise ValueError(f"the run has no {', '.join(missing)} engine "
                         "(needs --plugin-twin --plain-twin)")
    absent = [g for g in groups if g not in meta["pairs"]]
    if absent:
        raise ValueError(f"the run has no group {', '.join(absent)}")
    if len(run["summary"]) != 1:
        raise ValueError(f"expected one batch size, found {sorted(run['summary'])}")
    (summary,) = run["summary"].values()
    undrafted = meta["undrafted_step_ratio"]
    never = sorted({g for n in (*PLUGINS, TWIN) for g in groups if undrafted[n].get(g) is None})
    if never:
        raise ValueError(f"no round without drafts to compare in {', '.join(never)}")
    forward = drafting = own = plain = 0.0
    for row in run["rows"]:
        if row["group"] not in groups or not row["identical_outputs"]:
            continue
        for name in PLUGINS:
            forward += row["parts"][name]["forward"]
            drafting += row["parts"][name]["draft"]
            own += row["seconds"][name]
            plain += (row["seconds"]["plain"] + row["seconds"][TWIN]) / 2
    if not own:
        raise ValueError("no batch of these groups had outputs equal to plain vLLM's")
    return {
        "model": meta["model"], "when": meta.get("when"), "command": meta.get("command"),
        "plain_tok_s": round(geomean([summary["plugin"][g]["plain_tok_s"] for g in groups]), 1),
        "undrafted": round(geomean([undrafted[n][g] for n in PLUGINS for g in groups]), 3),
        "undrafted_twin": round(geomean([undrafted[TWIN][g] for g in groups]), 3),
        "forward": round(forward / plain, 3),
        "drafting": round(drafting / own, 4),
        "rest": round((own - forward - drafting) / own, 4),
        "pair": round(geomean([meta["pairs"][g]["geomean"] for g in groups]), 3),
    }


def markdown(runs: dict[str, dict]) -> str:
    lines = [("| run | model | plain vLLM tok/s | plugin undrafted steps / plain | plain twin's "
              "| plugin forward / plain pair step | drafting | rest | plugin pair / plain pair |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for label, s in runs.items():
        lines.append(f"| {label} | {s['model']} | {s['plain_tok_s']:.1f} | {s['undrafted']:.3f} "
                     f"| {s['undrafted_twin']:.3f} | {s['forward']:.3f} "
                     f"| {100 * s['drafting']:.2f}% | {100 * s['rest']:.1f}% | {s['pair']:.3f} |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, s in runs.items():
        ax.scatter(s["undrafted"], s["pair"], color="C0")
        ax.scatter(s["undrafted_twin"], s["pair"], color="C7", marker="s", s=14)
        ax.annotate(label, (s["undrafted"], s["pair"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.scatter([], [], color="C0", label="plugin engines")
    ax.scatter([], [], color="C7", marker="s", s=14, label="plain twin (A/A)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("steps with nothing drafted / plain vLLM's step (lower: faster)")
    ax.set_ylabel("plugin pair / plain pair, tok/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN.json",
                    help="bench_lockstep.py JSONs, each with a label for the table")
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=list(RARELY_DRAFTING),
                    help="task groups to take (default: %(default)s)")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args(argv)
    groups = tuple(args.groups)
    runs: dict[str, dict] = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            ap.error(f"{spec!r}: give LABEL=RUN.json")
        if label in runs:
            ap.error(f"label {label!r} given twice")
        try:
            runs[label] = split(json.loads(Path(path).read_text()), groups)
        except (OSError, ValueError) as exc:
            ap.error(f"{path}: {exc}")
        except (KeyError, TypeError, AttributeError) as exc:
            ap.error(f"{path}: not a bench_lockstep.py result (no {exc})")
    table = markdown(runs)
    print(f"batch 8, groups {', '.join(groups)} (geometric means over them)\n\n{table}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vllm.lockstep_split "
                       + shlex.join(sys.argv[1:] if argv is None else argv),
            "groups": list(groups)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    plot(runs, out.with_suffix(".png"), f"vLLM-CPU lockstep runs, {', '.join(groups)}")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
