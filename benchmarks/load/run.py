"""HTTP load sweep and server-overhead measurement.

    python -m benchmarks.load.run --engine reference --concurrency 1,2,4,8 \
        --out benchmarks/results/load-reference.json
    python -m benchmarks.load.run --url http://127.0.0.1:8000 ...   # a running server

With `--engine`, the server runs in this process (uvicorn on a loopback port in a thread)
so the same run can also time a 1-token completion through HTTP against the engine
called directly on the server's own event loop (`--overhead-samples`, alternating the two).
Fixed prompts: the first `--per-group` questions of each Spec-Bench dev task group.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from benchmarks.load.client import check_loopback, run_level
from benchmarks.specbench import load_questions
from msn.models import default_model_name


class InProcessServer:
    """The production app + engine under uvicorn, on its own event loop in a thread."""

    def __init__(self, settings, engine):
        import uvicorn

        from server.app import create_app

        self.engine = engine
        self.app = create_app(settings, engine)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                log_level="warning", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def start(self, timeout: float) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/ready", timeout=5)
                if r.status_code == 200:
                    return
                if r.json()["error"]["code"] == "engine_dead":
                    raise RuntimeError(r.text)
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server did not become ready")

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)


def build_engine(kind: str, model: str, dtype: str, max_running: int | None,
                 vllm_speculation: str = "tr-jacobi"):
    """The engine `msn serve --engine KIND` builds (vllm: with the TR-Jacobi plugin unless
    `vllm_speculation` is "none")."""
    from server.cli import build_engine as serve_engine
    from server.settings import ServerSettings

    return serve_engine(ServerSettings(engine=kind, model=model, dtype=dtype,
                                       max_running=max_running,
                                       vllm_speculation=vllm_speculation))


async def _engine_one_token(engine, prompt: str, method: str) -> float:
    """A 1-token generation straight on the engine (tokenization included, like HTTP)."""
    from server.engines.base import SamplingSpec

    start = time.perf_counter()
    ids = engine.encode_chat([{"role": "user", "content": prompt}])
    spec = SamplingSpec(max_tokens=1, temperature=0.0, method=method)
    stream = engine.generate(f"direct-{time.perf_counter_ns()}", ids, spec)
    try:
        async for step in stream:
            if step.finish_reason is not None:
                break
    finally:
        await stream.aclose()
    return time.perf_counter() - start


def measure_overhead(srv: InProcessServer, model: str, prompt: str, samples: int) -> dict:
    engine = srv.engine
    direct: list[float] = []
    http: list[float] = []
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1, "temperature": 0}
    with httpx.Client(timeout=600) as client:
        for i in range(samples + 1):  # the first pair warms both paths up, not recorded
            t0 = time.perf_counter()
            r = client.post(srv.url + "/v1/chat/completions", json=body)
            t_http = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            t_direct = srv.run(_engine_one_token(engine, prompt, engine.default_method))
            if i:
                http.append(t_http)
                direct.append(t_direct)
    med_http, med_direct = statistics.median(http), statistics.median(direct)
    return {
        "samples": samples, "prompt_chars": len(prompt),
        "http_s": {"median": med_http, "min": min(http), "max": max(http)},
        "engine_direct_s": {"median": med_direct, "min": min(direct), "max": max(direct)},
        "overhead_median_s": med_http - med_direct,
        "overhead_ratio": med_http / med_direct,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--engine", choices=["reference", "vllm"])
    target.add_argument("--url", help="an already running server (loopback only)")
    p.add_argument("--model", default=default_model_name(),
                   help="base, msn, or a checkpoint path (default: %(default)s)")
    p.add_argument("--served-model", help="with --url: the model id (default: first of "
                   "/v1/models)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=8, help="requests per level (max)")
    p.add_argument("--max-seconds", type=float, default=240, help="per level (max)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--per-group", type=int, default=2, help="prompts per Spec-Bench group")
    p.add_argument("--max-running", type=int, help="in-process server admission width")
    p.add_argument("--max-queue", type=int, default=4, help="in-process server queue depth")
    p.add_argument("--overhead-samples", type=int, default=10)
    p.add_argument("--method", help="`method` field sent with every request")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path, help="also draw this PNG from --out")
    args = p.parse_args(argv)

    prompts = [q["turns"][0] for q in load_questions(per_group=args.per_group)]
    levels = [int(c) for c in args.concurrency.split(",")]
    extra = {"method": args.method} if args.method else {}
    srv = None
    if args.engine:
        from server.settings import ServerSettings

        engine = build_engine(args.engine, args.model, args.dtype, args.max_running)
        settings = ServerSettings(max_running=args.max_running, max_queue=args.max_queue,
                                  request_timeout_s=args.max_seconds + 60)
        srv = InProcessServer(settings, engine)
        t0 = time.perf_counter()
        srv.start(timeout=1200)
        print(f"{args.engine} engine ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        url, model = srv.url, engine.model_name
    else:
        check_loopback(args.url)
        url = args.url.rstrip("/")
        model = args.served_model or httpx.get(url + "/v1/models").json()["data"][0]["id"]

    report: dict = {
        "engine": args.engine or "external", "url_kind": "in-process" if srv else "external",
        "model": model, "dtype": args.dtype, "max_tokens": args.max_tokens,
        "requests_per_level": args.requests, "max_seconds_per_level": args.max_seconds,
        "num_prompts": len(prompts), "method": args.method,
        "server": {"max_running": srv.app.state.service.admission.max_running,
                   "max_queue": args.max_queue} if srv else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": list(os.getloadavg())},
        "levels": [],
    }
    try:
        if srv is not None and args.overhead_samples:
            report["overhead_1_token"] = measure_overhead(srv, model, prompts[0],
                                                          args.overhead_samples)
            print(json.dumps(report["overhead_1_token"]), file=sys.stderr)
        for c in levels:
            result, _ = asyncio.run(run_level(url, model, prompts, c, args.requests,
                                              args.max_seconds, args.max_tokens, extra))
            report["levels"].append(result.to_json())
            print(f"c={c}: {result.completed}/{result.sent} ok, statuses "
                  f"{result.status_counts}, {result.output_tokens_per_s:.2f} tok/s, "
                  f"TTFT p50 {result.ttft_s['p50']}, ITL p50 {result.itl_s['p50']}",
                  file=sys.stderr)
        if srv is not None:
            metrics = httpx.get(url + "/metrics").text
            report["server_metrics_excerpt"] = [
                line for line in metrics.splitlines()
                if line.startswith(("msn_requests_rejected_total", "msn_requests_finished_total",
                                    "msn_http_requests_total"))]
    finally:
        report["machine"]["loadavg_end"] = list(os.getloadavg())
        if srv is not None:
            srv.stop()
    report["total_5xx"] = sum(n for lv in report["levels"]
                              for s, n in lv["status_counts"].items() if s.startswith("5"))
    report["total_429"] = sum(lv["status_counts"].get("429", 0) for lv in report["levels"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        from benchmarks.load.plot import plot

        plot([args.out], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
