"""Issue 3's proof table: does MSN training make the model decode in parallel?

Reads the per-model outputs of `bench_methods` (one JSON per model, all made in one run
of `training/experiments/h200_eval.sh`), the held-out quality check and the training
metadata from a folder, and writes one summary JSON, a Markdown table and a plot:

    python -m benchmarks.reference.msn_report benchmarks/results/msn-h200

Main table: base (a), plain SFT on the same data (b, L = 0) and the MSN model as shipped
(c, the rank-r artifact merged into the base): MAT and speedup over `ar` of `jacobi` and
`tr-jacobi` per task group. Ablation over L: MAT on the questions the ablation runs
share (the first few per group), with L = 0 taken from the SFT run's records.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.reference.bench_methods import aggregate
from benchmarks.specbench import TASK_GROUPS

MAIN = {"base": "base (a)", "sft": "SFT, L=0 (b)", "msn": "MSN, L=5, shipped artifact (c)"}
ABLATION = {0: "sft", 3: "L3", 5: "L5full", 8: "L8"}
METHODS = ("jacobi", "tr-jacobi")


def _load(folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return json.loads(path.read_text())


def main_table(folder: Path) -> dict:
    out = {}
    for name in MAIN:
        table = _load(folder, name)["table"]
        out[name] = {g: {"ar_tokens_per_s": row["ar"]["tokens_per_s"],
                         **{m: {"mat": row[m]["mat"], "speedup": row[m]["speedup"]}
                            for m in METHODS}}
                     for g, row in table.items()}
    return out


def ablation(folder: Path) -> dict:
    runs = {span: _load(folder, name) for span, name in ABLATION.items()}
    # the questions every ablation run answered (L = 0 reuses the longer SFT run)
    shared = set.intersection(*({r["question_id"] for r in run["records"]}
                                for run in runs.values()))
    out = {}
    for span, run in runs.items():
        rows = [r for r in run["records"] if r["question_id"] in shared]
        out[span] = {m: aggregate([r for r in rows if r["method"] == m])["mat"]
                     for m in ("ar", *METHODS)}
    return {"questions": len(shared), "mat": out}


def float32_pair(folder: Path) -> dict | None:
    """The exactness run: base and MSN in float32, where every method must equal `ar`."""
    if not all((folder / f"fp32-{n}.json").is_file() for n in ("base", "msn")):
        return None
    out = {}
    for name in ("base", "msn"):
        run = _load(folder, f"fp32-{name}")
        overall = run["table"]["overall"]
        out[name] = {"command": run["command"],
                     "questions": len({r["question_id"] for r in run["records"]}),
                     "identical_to_ar": {m: sum(r["agrees"] for r in run["records"]
                                                if r["method"] == m) for m in METHODS},
                     "ar_tokens_per_s": overall["ar"]["tokens_per_s"],
                     **{m: {"mat": overall[m]["mat"], "speedup": overall[m]["speedup"]}
                        for m in METHODS}}
    return out


def training(folder: Path) -> dict:
    out = {}
    for span in ABLATION:
        path = folder / f"train-L{span}.json"
        if path.is_file():
            meta = json.loads(path.read_text())
            res, cfg = meta["result"], meta["config"]
            out[span] = {"steps": res["steps"], "examples": res["examples"],
                         "epochs_done": round(res["steps"] * cfg["batch_size"] * cfg["grad_accum"]
                                              / res["examples"], 2),
                         "runtime_s": round(res["runtime_s"], 1),
                         "peak_gpu_memory_gib": round(res["peak_gpu_memory_gib"] or 0, 2),
                         "final_logged_loss": round(res["losses"][-1], 4)}
    return out


def markdown(summary: dict) -> str:
    groups = [g for g in (*TASK_GROUPS, "overall") if g in summary["main"]["base"]]
    lines = ["| group | " + " | ".join(f"{MAIN[n]} {m}" for n in MAIN for m in METHODS) + " |",
             "|---|" + "---|" * (len(MAIN) * len(METHODS))]
    for g in groups:
        cells = [f"{summary['main'][n][g][m]['mat']:.2f} ({summary['main'][n][g][m]['speedup']:.2f}x)"
                 for n in MAIN for m in METHODS]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    abl = summary["ablation"]
    lines += ["", f"Ablation over L ({abl['questions']} questions; MAT):", "",
              "| L | jacobi | tr-jacobi |", "|---|---|---|"]
    lines += [f"| {span} | {row['jacobi']:.3f} | {row['tr-jacobi']:.3f} |"
              for span, row in abl["mat"].items()]
    if summary.get("float32"):
        lines += ["", "float32 (every output compared with `ar`), overall:", "",
                  ("| model | questions | ar tok/s | jacobi MAT (speedup) | tr-jacobi MAT "
                   "(speedup) | identical to ar |"), "|---|---|---|---|---|---|"]
        for name, row in summary["float32"].items():
            same = ", ".join(f"{m} {n}/{row['questions']}"
                             for m, n in row["identical_to_ar"].items())
            lines.append(f"| {name} | {row['questions']} | {row['ar_tokens_per_s']} | "
                         f"{row['jacobi']['mat']:.2f} ({row['jacobi']['speedup']:.2f}x) | "
                         f"{row['tr-jacobi']['mat']:.2f} ({row['tr-jacobi']['speedup']:.2f}x) "
                         f"| {same} |")
    if summary["training"]:
        lines += ["", "| run | steps | epochs | time (s) | peak GPU memory (GiB) | last loss |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| L={s} | {t['steps']} | {t['epochs_done']} | {t['runtime_s']} | "
                  f"{t['peak_gpu_memory_gib']} | {t['final_logged_loss']} |"
                  for s, t in summary["training"].items()]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in (*TASK_GROUPS, "overall") if g in summary["main"]["base"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    width = 0.8 / len(MAIN)
    for ax, m in zip(axes[:2], METHODS):
        for i, n in enumerate(MAIN):
            xs = [k + i * width for k in range(len(groups))]
            ax.bar(xs, [summary["main"][n][g][m]["mat"] for g in groups], width, label=MAIN[n])
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(groups))], groups, rotation=30)
        ax.set_title(f"{m}: mean accepted tokens per step")
        ax.axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8, loc="lower right")
    abl = summary["ablation"]["mat"]
    spans = sorted(abl)
    for m in METHODS:
        axes[2].plot(spans, [abl[s][m] for s in spans], marker="o", label=m)
    axes[2].set_xticks(spans)
    axes[2].set_xlabel("noise span length L (0 = plain SFT)")
    axes[2].set_title(f"ablation: MAT ({summary['ablation']['questions']} questions)")
    axes[2].legend()
    fig.suptitle(f"MSN on {summary['model']}: reference runner, {summary['device']}, "
                 f"{summary['dtype']}, greedy, {summary['max_new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="folder with base/sft/msn/L*.json, quality.json")
    ap.add_argument("--out", type=Path, default=None,
                    help="output stem (default: the folder's name beside it)")
    args = ap.parse_args(argv)
    base = _load(args.folder, "base")
    summary = {
        "commands": {n: _load(args.folder, n)["command"] for n in (*MAIN, *ABLATION.values())},
        "device": base["device"], "torch": base["torch"], "dtype": base["dtype"],
        "model": "SmolLM2-135M-Instruct", "max_new_tokens": base["max_new_tokens"],
        "questions": len({r["question_id"] for r in base["records"]}),
        "templates": base["templates"],
        "unexplained_divergences": {n: _load(args.folder, n)["unexplained_divergences"]
                                    for n in MAIN},
        "main": main_table(args.folder), "ablation": ablation(args.folder),
        "training": training(args.folder), "float32": float32_pair(args.folder),
    }
    quality = args.folder / "quality.json"
    if quality.is_file():
        summary["quality"] = json.loads(quality.read_text())["models"]
    stem = args.out or args.folder.parent / args.folder.name
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary)
    stem.with_suffix(".table.md").write_text(table)
    plot(summary, stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.json, {stem}.table.md, {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
