"""Two git revisions of this repository, same benchmark, alternating (A B B A ...).

Is a change slower, or was the machine? `bench_vllm.py` runs its engines one after the
other, and on a shared machine the same cell has moved by 30% between runs hours apart
(benchmarks/results/vllm_cpu_msn.json against its previous version). Here each revision
gets a git worktree, and `bench_vllm.py` runs from each in turn, ABBA-ordered so a
steady drift of the machine falls on both alike. Reports, per engine and task group, the
tokens/s of each run, the geometric mean of B's over A's, and MAT (identical MAT with
different tokens/s means per-step cost changed, not the drafts).

    python -m benchmarks.vllm.ab_revisions 87076f6 HEAD --rounds 1 -- \\
        --model msn --engines plugin --batch-sizes 1

Writes `<out>.json` and `<out>.png` (default benchmarks/results/vllm_cpu_ab).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.vllm.bench_interleaved import geomean
from benchmarks.vllm.bench_vllm import DEV_SET, GROUPS, ROOT


def resolve(rev: str) -> str:
    """The full commit hash of `rev`; exit 2 with one line if it names no commit."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            check=False, capture_output=True, text=True)
    if commit.returncode:
        print(f"ab_revisions: error: {rev!r} is not a commit of {ROOT}", file=sys.stderr)
        sys.exit(2)
    return commit.stdout.strip()


def worktree(commit: str, where: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(where),
                    commit], check=True, capture_output=True)


def summarise(runs: list[dict]) -> dict:
    """Per engine / batch / group: each side's tok/s per run, MAT, geo-mean ratio B/A."""
    out: dict = {}
    for run in runs:
        for engine, by_batch in run["summary"].items():
            for batch, table in by_batch.items():
                for group, cell in table.items():
                    slot = out.setdefault(engine, {}).setdefault(batch, {}).setdefault(
                        group, {"A": [], "B": [], "mat": {"A": [], "B": []}})
                    slot[run["side"]].append(cell["tok_s"])
                    if cell.get("mat") is not None:
                        slot["mat"][run["side"]].append(cell["mat"])
    for by_batch in out.values():
        for table in by_batch.values():
            for cell in table.values():
                geo = {s: geomean(cell[s]) for s in "AB"}
                cell["ratio_b_over_a"] = round(geo["B"] / geo["A"], 3)
    return out


def plot(summary: dict, path: Path, labels: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(e, b) for e in summary for b in summary[e]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (engine, batch) in zip(axes[0], panels):
        table = summary[engine][batch]
        groups = [g for g in (*GROUPS, "overall") if g in table]
        for i, side in enumerate("AB"):
            for x, g in enumerate(groups):
                ys = table[g][side]
                ax.scatter([x + (i - 0.5) * 0.3] * len(ys), ys, s=18,
                           color=f"C{i}", label=labels[side] if x == 0 else None)
        ax.set_xticks(range(len(groups)), groups, rotation=30)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{engine}, batch {batch}: each run (ABBA order)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev_a")
    ap.add_argument("rev_b")
    ap.add_argument("--rounds", type=int, default=1, help="ABBA rounds (default 1: 4 runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_cpu_ab"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap.epilog = "Arguments after -- go to bench_vllm.py (its --out is set here)."
    args = ap.parse_args(argv[:cut])
    bench = argv[cut + 1:]
    if args.rounds < 1:
        ap.error("--rounds must be positive")
    if "--out" in bench:
        ap.error("give --out before --, not to bench_vllm.py")
    if "--dev-set" not in bench:  # a worktree's default would point next to the worktree
        bench += ["--dev-set", str(DEV_SET)]
    commits = {"A": resolve(args.rev_a), "B": resolve(args.rev_b)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        trees = {"A": Path(tmp) / "a", "B": Path(tmp) / "b"}
        try:
            for side in "AB":
                worktree(commits[side], trees[side])
            for i, side in enumerate("ABBA" * args.rounds):
                target = Path(tmp) / f"run{i}-{side}"
                print(f"run {i + 1}/{4 * args.rounds}: {side} ({commits[side][:10]})", flush=True)
                t0 = time.time()
                subprocess.run([sys.executable, "-m", "benchmarks.vllm.bench_vllm", *bench,
                                "--out", str(target)], cwd=trees[side], check=True)
                data = json.loads(target.with_suffix(".json").read_text())
                runs.append({"side": side, "started": time.strftime(
                    "%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)), "summary": data["summary"]})
        finally:
            for path in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(path)], check=False, capture_output=True)
    summary = summarise(runs)
    labels = {"A": f"A {args.rev_a} ({commits['A'][:10]})",
              "B": f"B {args.rev_b} ({commits['B'][:10]})"}
    meta = {"command": "python -m benchmarks.vllm.ab_revisions " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "A": labels["A"], "B": labels["B"],
            "order": "ABBA" * args.rounds}
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "runs": runs}, indent=1))
    plot(summary, out.with_suffix(".png"), labels)
    for engine, by_batch in summary.items():
        for batch, table in by_batch.items():
            for group, cell in table.items():
                print(f"{engine:8s} batch {batch} {group:15s} A {cell['A']} B {cell['B']} "
                      f"B/A {cell['ratio_b_over_a']:.3f} MAT A {cell['mat']['A']} "
                      f"B {cell['mat']['B']}")


if __name__ == "__main__":
    main()
