"""`msn train`: supervised fine-tuning with MSN noise on transformers' Trainer.

MSN is a drop-in replacement for SFT (algorithm.md section 2): the only change from
plain SFT is the collator, which corrupts response inputs; with `span_length=0` this
is ordinary SFT on the same data, which is the baseline the issue asks for.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from training.noise import NoiseConfig

# full: every weight; lora: a PEFT adapter; linear: full fine-tuning of the block linear
# layers only (embeddings and norms frozen), whose delta training/artifact.py compresses
# into a small LoRA-format artifact without dropping anything else.
Method = Literal["full", "lora", "linear"]
# Every linear layer of the Llama/Qwen/Mistral blocks: Jacobi denoising is not local to
# attention, so the adapter gets the MLPs too.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_META = "msn-train.json"
LOSS_LOG = "train_log.jsonl"


@dataclass(slots=True)
class TrainConfig:
    data: Path
    output_dir: Path
    model_path: Path
    method: Method = "full"
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    seed: int = 0
    bf16: bool | None = None  # None: bf16 mixed precision on CUDA, fp32 elsewhere
    gradient_checkpointing: bool = False
    resume: str | None = None  # "auto" (latest checkpoint in output_dir) or a path
    logging_steps: int = 10
    save_steps: int = 500
    limit_examples: int | None = None
    # Wall-clock cap: training stops (and saves) at the first step past it, so a run on a
    # leased machine ends with a usable model instead of being killed mid-way.
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora", "linear"):
            raise ValueError(f"method must be full, lora or linear, got {self.method!r}")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("need epochs > 0 or max_steps > 0")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")


@dataclass(slots=True)
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float
    losses: list[float]
    runtime_s: float
    examples: int
    tokens: int
    peak_gpu_memory_gib: float | None


def load_chat_jsonl(path: Path, split: str | None = "train",
                    limit: int | None = None) -> list[dict]:
    """Rows of a JSONL with `messages`; rows carrying `split` are kept only if it matches."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(row.get("messages"), list):
                raise ValueError(f"{path}:{lineno}: no 'messages' list")  # noqa: TRY004 - bad data
            if split is not None and row.get("split", split) != split:
                continue
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def tokenize_rows(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Encode conversations; drop those left without a response token after truncation."""
    from tqdm.auto import tqdm

    from training.collator import encode_chat

    out = []
    for row in tqdm(rows, desc="tokenize", unit="ex", mininterval=2.0):
        # rows cut at the generation limit (data.py marks them) get no end-of-turn target
        enc = encode_chat(tokenizer, row["messages"], max_length=max_length,
                          open_ended=row.get("finished") is False)
        if any(enc.response_mask):
            out.append(enc.to_dict())
    return out


class _ListDataset:
    """Trainer needs __len__/__getitem__ only; a plain list avoids the datasets dep."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _loss_logger(path: Path):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Appends every Trainer log record as one JSON line (survives a crash)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return LossLog()


def _time_limit(seconds: float):
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > seconds:
                control.should_training_stop = True

    return TimeLimit()


def build_model(config: TrainConfig, use_cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM

    # fp32 master weights everywhere; on CUDA the Trainer's bf16 autocast does the math.
    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=torch.float32)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, bias="none",
                          target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    elif config.method == "linear":
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith(".weight") and name.split(".")[-2] in LORA_TARGETS
    if use_cuda:
        model = model.to("cuda")
    return model


def train(config: TrainConfig, log=print) -> TrainResult:
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from training.collator import MSNCollator

    use_cuda = torch.cuda.is_available()
    bf16 = use_cuda if config.bf16 is None else config.bf16
    if bf16 and not use_cuda:
        raise ValueError("bf16 training needs a CUDA device; CPU trains in fp32")
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    rows = load_chat_jsonl(config.data, limit=config.limit_examples)
    if not rows:
        raise ValueError(f"{config.data} holds no training conversations")
    items = tokenize_rows(tokenizer, rows, config.max_length)
    if not items:
        raise ValueError("no example keeps a response token within max_length")
    tokens = sum(len(it["input_ids"]) for it in items)
    log(f"{len(items)} examples, {tokens} tokens; method={config.method}, "
        f"noise={asdict(config.noise)}, bf16={bf16}")

    noise = config.noise
    if noise.source == "vocab" and noise.vocab_size is None:
        noise = NoiseConfig(**{**asdict(noise), "vocab_size": len(tokenizer)})
    collator = MSNCollator(pad_token_id=pad_id, noise=noise, seed=config.seed)
    model = build_model(config, use_cuda)

    steps_per_epoch = math.ceil(len(items) / (config.batch_size * config.grad_accum))
    total = config.max_steps if config.max_steps > 0 else \
        math.ceil(steps_per_epoch * config.epochs)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(config.warmup_ratio * total),
        weight_decay=config.weight_decay,
        bf16=bf16,
        use_cpu=not use_cuda,
        # one fused kernel per step: the H200 host is slow at launching many small ones
        optim="adamw_torch_fused" if use_cuda else "adamw_torch",
        gradient_checkpointing=config.gradient_checkpointing,
        # non-reentrant checkpointing works with frozen base weights (LoRA) as well
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        remove_unused_columns=False,  # the collator needs response_mask
        report_to=[],
        dataloader_num_workers=0,  # the noise generator lives in this process
    )
    callbacks = [_loss_logger(out / LOSS_LOG)]
    if config.max_time_s:
        callbacks.append(_time_limit(config.max_time_s))
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(items),
                      data_collator=collator, callbacks=callbacks)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    resume = config.resume
    if resume == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(out))  # None starts fresh
    output = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else None

    trainer.save_model(str(out))  # full: HF checkpoint; LoRA: adapter_config + weights
    tokenizer.save_pretrained(str(out))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    if trainer.state.global_step < trainer.state.max_steps:
        log(f"stopped by the time limit at step {trainer.state.global_step} of "
            f"{trainer.state.max_steps}")
    result = TrainResult(out, trainer.state.global_step, float(output.training_loss),
                         losses, runtime, len(items), tokens, peak)
    meta = {"config": {**asdict(config), "data": str(config.data),
                       "output_dir": str(config.output_dir),
                       "model_path": str(config.model_path)},
            "result": {**asdict(result), "output_dir": str(out)}}
    (out / TRAIN_META).write_text(json.dumps(meta, indent=2))
    log(f"saved {config.method} model to {out} after {result.steps} steps "
        f"({runtime:.1f} s, final logged loss {losses[-1] if losses else float('nan'):.4f})")
    return result
