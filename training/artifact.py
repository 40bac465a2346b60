"""The committed MSN artifact: a PEFT LoRA adapter that `msn models prepare` merges.

Two ways to get one:
- train with `--method lora`: the adapter folder is the artifact as it stands;
- train with `--method linear` (full fine-tuning of the block linear layers, embeddings
  and norms frozen) and compress the weight delta with `extract_lora_artifact`: each
  layer's delta is replaced by its best rank-r approximation (truncated SVD, Eckart-Young)
  stored as lora_B @ lora_A with scaling 1. With embeddings and norms frozen, the rank
  truncation is the only loss, and the file stays small (about r * 0.3 M parameters for
  SmolLM2-135M: 19.5 MB in fp16 at r = 32).
Either way the artifact is a standard PEFT adapter folder, so `merge_artifact` is PEFT's
own merge and any PEFT user can load it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
EXTRACT_REPORT = "msn-extract.json"


def _torch_dtype(name: str):
    import torch

    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def merge_artifact(base_dir: Path, artifact_dir: Path, out_dir: Path, dtype: str) -> Path:
    """Write base + adapter, merged, as a plain Hugging Face checkpoint in out_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, artifact_dir, out_dir = Path(base_dir), Path(artifact_dir), Path(out_dir)
    if not (artifact_dir / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{artifact_dir} holds no {ADAPTER_CONFIG}; not an MSN artifact")
    target_dtype = _torch_dtype(dtype)
    # merge in fp32 so a bf16/fp16 target is rounded once, after the sum
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, artifact_dir).merge_and_unload()
    model = model.to(target_dtype)
    model.config.dtype = dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def extract_lora_artifact(base_dir: Path, tuned_dir: Path, out_dir: Path, rank: int,
                          dtype: str = "float16", log=print) -> dict:
    """Compress (tuned - base) into a rank-`rank` PEFT LoRA adapter in out_dir.

    Fails if any parameter outside the target linear layers changed: such a delta
    could not be represented, and dropping it silently would ship a different model.
    Returns (and writes) how much of the delta's Frobenius norm the rank keeps.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.train import LORA_TARGETS

    if rank < 1:
        raise ValueError("rank must be >= 1")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32)
    tuned_params = dict(tuned.named_parameters())
    deltas: dict[str, torch.Tensor] = {}
    for name, p in base.named_parameters():
        delta = tuned_params[name].detach() - p.detach()
        is_target = name.endswith(".weight") and name.split(".")[-2] in LORA_TARGETS
        if is_target:
            deltas[name[: -len(".weight")]] = delta
        elif delta.abs().max() > 0:
            raise ValueError(f"{name} changed in {tuned_dir}; a LoRA artifact cannot hold "
                             "it (train with --method linear or lora)")

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                        target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    modules = dict(peft_model.base_model.model.named_modules())
    kept_sq = total_sq = 0.0
    with torch.no_grad():
        for name, delta in deltas.items():
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, s.numel())
            layer = modules[name]
            a = torch.zeros_like(layer.lora_A["default"].weight)
            b = torch.zeros_like(layer.lora_B["default"].weight)
            # split singular values evenly between the factors to balance their scale
            root = s[:r].sqrt()
            a[:r] = root[:, None] * vh[:r]
            b[:, :r] = u[:, :r] * root[None, :]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            kept_sq += float((s[:r] ** 2).sum())
            total_sq += float((s ** 2).sum())
    peft_model = peft_model.to(_torch_dtype(dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    report = {"rank": rank, "dtype": dtype, "layers": len(deltas),
              "delta_energy_kept": kept_sq / total_sq if total_sq else 1.0,
              "bytes": size, "tuned": str(tuned_dir)}
    (out_dir / EXTRACT_REPORT).write_text(json.dumps(report, indent=2))
    log(f"extracted rank-{rank} artifact to {out_dir}: {size / 2**20:.1f} MiB, "
        f"{100 * report['delta_energy_kept']:.1f}% of the delta's energy kept")
    return report


def copy_adapter(adapter_dir: Path, out_dir: Path) -> None:
    """Copy a trained LoRA adapter (method lora) into an artifact folder."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{adapter_dir} holds no {ADAPTER_CONFIG}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
        shutil.copy2(adapter_dir / name, out_dir / name)
