"""Quality preservation checks for a fine-tuned model (issue 3, requirement 5).

- Held-out NLL: mean token-level negative log-likelihood of held-out self-distilled
  answers (clean inputs, response tokens only). Lower is better; a big rise would mean
  training (or noise) damaged the model.
- Greedy agreement with a reference model (the base) on held-out prompts: the share of
  generated positions where both models emit the same token, and the mean length of the
  common prefix. Self-distilled SFT should keep both high.

    python -m training.quality --data D.jsonl --model base=PATH --model msn=PATH \
        --reference base --out quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def heldout_nll(model_path: Path, rows: list[dict], device: str, batch_size: int = 32,
                max_length: int = 1024) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.collator import IGNORE_INDEX, MSNCollator
    from training.noise import NoiseConfig
    from training.train import tokenize_rows

    tok = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    items = tokenize_rows(tok, rows, max_length)
    collate = MSNCollator(pad_token_id=tok.pad_token_id or 0, noise=NoiseConfig(span_length=0))
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[start:start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
    return {"nll": total / max(count, 1), "tokens": count, "examples": len(items)}


def greedy_tokens(model_path: Path, prompts: list[list[dict]], device: str,
                  max_new_tokens: int) -> list[list[int]]:
    from training.data import BatchGenerator

    # one eager batch: few steps, so compiling would cost more than it saves
    gen = BatchGenerator(model_path, device=device, compile=False)
    tok = gen.tokenizer
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in prompts]
    import torch

    out = []
    for start in range(0, len(texts), 256):
        enc = tok(texts[start:start + 256], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(gen.device)
        with torch.inference_mode():
            ids = gen.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=gen.eos_ids, pad_token_id=tok.pad_token_id,
                                     disable_compile=True)
        for row in ids[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in gen.eos_ids), len(row))
            out.append(row[:cut])
    return out


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict:
    same = total = prefix = 0
    for a, b in zip(ref, other):
        n = max(len(a), len(b), 1)
        same += sum(x == y for x, y in zip(a, b))
        total += n
        p = 0
        while p < min(len(a), len(b)) and a[p] == b[p]:
            p += 1
        prefix += p
    return {"token_agreement": same / max(total, 1),
            "mean_common_prefix": prefix / max(len(ref), 1), "prompts": len(ref)}


def main(argv=None) -> int:
    from training.train import load_chat_jsonl

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="JSONL with split=heldout rows")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--reference", default="base", help="NAME to compare greedy outputs with")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model)
    if args.reference not in models:
        sys.exit(f"--reference {args.reference} is not among --model names")
    rows = load_chat_jsonl(Path(args.data), split="heldout")
    if not rows:
        sys.exit(f"{args.data} has no split=heldout rows")
    prompts = [r["messages"][:1] for r in rows[: args.max_prompts]]
    ref = greedy_tokens(Path(models[args.reference]), prompts, args.device,
                        args.max_new_tokens)
    result = {"data": args.data, "heldout_rows": len(rows), "models": {}}
    for name, path in models.items():
        entry = heldout_nll(Path(path), rows, args.device)
        if name != args.reference:
            mine = greedy_tokens(Path(path), prompts, args.device, args.max_new_tokens)
            entry.update(agreement(ref, mine))
        result["models"][name] = entry
        print(name, json.dumps(entry), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
