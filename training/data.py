"""`msn data build`: an SFT set made offline by self-distillation of the base model.

No hub, no downloaded data set. Prompts come from two places:
- Magpie-style: the model continues the chat template's user-turn prefix and so writes
  a user request itself (sampled, to spread over what the model thinks users ask);
- tasks over local text, shaped like the Spec-Bench groups without using Spec-Bench:
  code tasks from Python standard-library functions and their docstrings (read with
  `ast`, never imported), summarise / question-answer / rewrite / translate tasks over
  prose (module docstrings of the standard library plus any --docs folders), and
  arithmetic word problems from templates.
Every prompt is answered by the same model (greedy by default), so the set teaches MSN
to denoise the model's own distribution rather than to imitate another model.
Rows are deduplicated by normalised prompt, filtered by response length, and written as
JSONL with provenance (`source`, `origin`, the decoding settings, token counts).
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARK_MARKERS = ("specbench", "spec-bench", "spec_bench", "mt_bench", "mt-bench")
DOC_SUFFIXES = (".md", ".txt", ".rst")
SENTINEL = "\x00MSN-USER-TURN\x00"


@dataclass(slots=True)
class BuildConfig:
    output: Path
    model_path: Path
    num_magpie: int = 1000
    num_tasks: int = 1000
    docs: list[Path] = field(default_factory=list)
    max_new_tokens: int = 256
    prompt_tokens: int = 64
    max_prompt_len: int = 384  # task prompts longer than this (tokens) are skipped
    batch_size: int = 64
    temperature: float = 0.0
    magpie_temperature: float = 1.0
    min_response_tokens: int = 16
    # Answers cut at max_new_tokens are kept (trained without an end-of-turn target):
    # a small model's answers often run long, and dropping them biases the set short.
    keep_truncated: bool = True
    heldout_fraction: float = 0.02
    device: str = "auto"
    compile: bool = True
    seed: int = 0
    stdlib: list[Path] | None = None  # None: every stdlib file (tests pass a few)
    shard: tuple[int, int] = (0, 1)  # (index, count): this process builds one shard

    def __post_init__(self) -> None:
        if not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {self.shard}")
        self._check()

    def _check(self) -> None:
        if self.num_magpie < 0 or self.num_tasks < 0 or self.num_magpie + self.num_tasks == 0:
            raise ValueError("ask for at least one prompt (--num-magpie / --num-tasks)")
        for name in ("max_new_tokens", "prompt_tokens", "batch_size", "max_prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError("heldout_fraction must be in [0, 1)")
        for d in self.docs:
            if not Path(d).is_dir():
                raise ValueError(f"--docs {d} is not a folder")
            assert_not_benchmark(d)


def assert_not_benchmark(path: Path) -> None:
    """Refuse any benchmark file as training input (the dev set is for measuring only)."""
    lowered = str(path).lower()
    if any(m in lowered for m in BENCHMARK_MARKERS):
        raise ValueError(f"{path} looks like benchmark data; never train on it")


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


# ---------------------------------------------------------------- local text sources


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip")
    return sorted(p for p in root.rglob("*.py")
                  if not any(part in skip for part in p.relative_to(root).parts))


@dataclass(slots=True)
class CodeUnit:
    origin: str  # module:qualname
    signature: str
    doc: str
    source: str


@dataclass(slots=True)
class LocalText:
    code: list[CodeUnit] = field(default_factory=list)
    passages: list[tuple[str, str]] = field(default_factory=list)  # (origin, prose)


def scan_stdlib(files: list[Path], max_source_lines: int = 40, min_chars: int = 300,
                max_chars: int = 1200) -> LocalText:
    """One parse per file (never an import: stdlib modules such as `antigravity` or
    `this` act on import). Public functions with a docstring become code tasks; long
    module, class and function docstrings become prose passages."""
    found = LocalText()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.stem
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            name = getattr(node, "name", "")
            if len(doc) >= min_chars:
                found.passages.append((f"stdlib:{module}:{name}".rstrip(":"), doc[:max_chars]))
            if (not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    or name.startswith("_") or len(doc) < 40):
                continue
            source = ast.get_source_segment(text, node) or ""
            if source and source.count("\n") <= max_source_lines:
                found.code.append(CodeUnit(f"{module}:{name}", f"{name}({ast.unparse(node.args)})",
                                           doc.split("\n\n")[0].strip(), source))
    return found


def doc_passages(docs: list[Path], min_chars: int = 300,
                 max_chars: int = 1200) -> Iterator[tuple[str, str]]:
    """Paragraph groups of at least min_chars from .md/.txt/.rst files under docs."""
    for folder in docs:
        for path in sorted(folder.rglob("*")):
            if path.suffix not in DOC_SUFFIXES or not path.is_file():
                continue
            assert_not_benchmark(path)
            chunk = ""
            for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="ignore")):
                chunk = f"{chunk}\n\n{para}".strip() if chunk else para.strip()
                if len(chunk) >= min_chars:
                    yield f"docs:{path.name}", chunk[:max_chars]
                    chunk = ""


CODE_TASKS = (
    "Write a Python function `{sig}` that does the following: {doc}",
    "Implement `{sig}` in Python. Its documentation says: {doc}\nInclude a short example.",
    "Explain step by step what this Python function does:\n\n```python\n{src}\n```",
    "Write two unit tests with pytest for this function:\n\n```python\n{src}\n```",
    ("Suggest how to make this Python code clearer, and show the improved version:\n\n"
    "```python\n{src}\n```"),
)
PROSE_TASKS = {
    "summarize": ("Summarize the following text in a few sentences.\n\n{text}",
                  "Give a one-paragraph summary of this passage:\n\n{text}",
                  "Write a short TL;DR for the following:\n\n{text}"),
    "qa": (("Read the passage and answer: what is its main point, and which details "
           "support it?\n\n{text}"),
           "{text}\n\nBased only on the text above, what problem does it solve and how?",
           "Answer using the passage: who would use what it describes, and why?\n\n{text}"),
    "rewrite": ("Rewrite the following text in plain, simple English:\n\n{text}",
                "Rewrite this passage as a list of bullet points:\n\n{text}"),
    "translate": ("Translate the first two sentences of this text into French:\n\n{text}",
                  "Translate the first sentence of this text into German:\n\n{text}"),
}
MATH_TASKS = (
    ("{a} people each buy {b} notebooks at ${c} each. How much do they spend in total? "
    "Explain your reasoning."),
    "A train travels {a} km in {b} hours. What is its average speed? Show your steps.",
    ("Sam has {a} marbles, gives away {b} and then buys {c} more. How many does Sam "
    "have now? Think step by step."),
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
    "What is {a} multiplied by {b}, minus {c}? Show your work.",
)


def task_prompts(n: int, docs: list[Path], rng: random.Random,
                 files: list[Path] | None = None) -> list[tuple[str, str, str]]:
    """(source, origin, prompt) triples mixing code, prose tasks and arithmetic."""
    found = scan_stdlib(stdlib_files() if files is None else files)
    units = found.code
    passages = found.passages + list(doc_passages(docs))
    rng.shuffle(units)
    rng.shuffle(passages)
    out: list[tuple[str, str, str]] = []
    # mix roughly like Spec-Bench's task groups: prose tasks > code > math
    kinds = ["code"] * 3 + ["summarize", "qa", "rewrite"] * 2 + ["translate", "math", "math"]
    ui = pi = 0
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "code" and units:
            u = units[ui % len(units)]
            ui += 1
            t = rng.choice(CODE_TASKS)
            out.append(("code", u.origin, t.format(sig=u.signature, doc=u.doc, src=u.source)))
        elif kind == "math" or not passages:
            t = rng.choice(MATH_TASKS)
            a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 99)
            out.append(("math", "template", t.format(a=a, b=b, c=c)))
        else:
            origin, text = passages[pi % len(passages)]
            pi += 1
            out.append((kind, origin, rng.choice(PROSE_TASKS[kind]).format(text=text)))
    return out


# ---------------------------------------------------------------- generation


@dataclass(slots=True)
class Completion:
    text: str
    tokens: int
    finished: bool


class BatchGenerator:
    """Batched generation with fixed shapes on CUDA, so transformers' static cache and
    its compiled (CUDA-graph) decode step are reused across batches: eager decoding on
    the H200 host is launch-bound (86 ms per step against 3.2 ms as a graph)."""

    def __init__(self, model_path: Path, device: str = "auto", compile: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model.to(self.device).eval()
        self.static = compile and self.device.type == "cuda"
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ids.add(self.tokenizer.eos_token_id)
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end, int) and end != self.tokenizer.unk_token_id:
            ids.add(end)
        return sorted(i for i in ids if i is not None)

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float,
                 batch_size: int, prompt_len: int, seed: int, desc: str) -> list[Completion]:
        """Complete already-templated prompts; each prompt must fit in prompt_len tokens."""
        from tqdm.auto import tqdm
        from transformers import GenerationConfig

        torch = self.torch
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=0.95 if temperature > 0 else None, top_k=None,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
        )
        if self.static:
            gen.cache_implementation = "static"
        else:
            gen.disable_compile = True
        results: list[Completion] = []
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            # Fixed batch and prompt shapes on CUDA: one compiled graph serves every batch.
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk)) if self.static else chunk
            enc = self.tokenizer(padded, return_tensors="pt", padding="max_length"
                                 if self.static else "longest", max_length=prompt_len,
                                 truncation=True, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            torch.manual_seed(seed + start)
            with torch.inference_mode():
                try:
                    out = self.model.generate(**enc, generation_config=gen)
                except Exception as exc:
                    if not self.static:
                        raise
                    # a compile failure must not lose the run: finish eagerly
                    print(f"static/compiled generation failed ({type(exc).__name__}: "
                          f"{exc}); falling back to eager", flush=True)
                    self.static = False
                    gen.cache_implementation, gen.disable_compile = None, True
                    out = self.model.generate(**enc, generation_config=gen)
            new = out[:, enc["input_ids"].shape[1]:].cpu()
            for row in new[: len(chunk)].tolist():
                n, finished = len(row), False
                for i, tid in enumerate(row):
                    if tid in self.eos_ids:
                        n, finished = i, True
                        break
                text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
                results.append(Completion(text.strip(), n, finished))
            bar.update(len(chunk))
        bar.close()
        return results


def user_turn_prefix(tokenizer) -> str:
    """What the chat template puts before a user's words (system turn included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}],
                                         tokenize=False)
    if SENTINEL not in text:
        raise ValueError("cannot find the user-turn prefix in the chat template")
    return text[: text.index(SENTINEL)]


def _split(prompt: str, fraction: float) -> str:
    # stable across runs and machines: a row's split depends only on its prompt
    h = int(hashlib.sha1(normalise(prompt).encode()).hexdigest()[:8], 16)
    return "heldout" if h / 0xFFFFFFFF < fraction else "train"


def build_dataset(config: BuildConfig, log=print) -> dict:
    """Generate, answer, filter and write the set; returns counts for the caller/log."""
    started = time.perf_counter()
    rng = random.Random(config.seed)
    gen = BatchGenerator(config.model_path, config.device, config.compile)
    tok = gen.tokenizer
    name = Path(config.model_path).name
    counts: dict[str, int] = {}

    candidates: list[tuple[str, str, str]] = []  # (source, origin, user prompt)
    if config.num_magpie:
        prefix = user_turn_prefix(tok)
        # The same prefix for every row: sampling alone makes them differ. With a static
        # cache the answers' shapes are reused, so one compiled graph serves both passes;
        # prompts longer than prompt_tokens are then dropped.
        steps = config.max_new_tokens if gen.static else config.prompt_tokens
        prompt_len = config.max_prompt_len if gen.static else \
            len(tok(prefix, add_special_tokens=False)["input_ids"])
        outs = gen.generate([prefix] * config.num_magpie, steps, config.magpie_temperature,
                            config.batch_size, prompt_len=prompt_len,
                            seed=config.seed + 7919 * config.shard[0], desc="magpie prompts")
        kept = [o.text for o in outs
                if o.finished and o.tokens <= config.prompt_tokens and len(o.text) >= 12]
        counts["magpie_generated"], counts["magpie_finished"] = len(outs), len(kept)
        candidates += [("magpie", "self", text) for text in kept]
    if config.num_tasks:
        # every shard draws the same global list and keeps its own slice, so shards
        # built on different GPUs never repeat a task prompt
        index, count = config.shard
        everything = task_prompts(config.num_tasks * count, config.docs, rng, config.stdlib)
        candidates += everything[index::count]

    seen: set[str] = set()
    unique = []
    for source, origin, prompt in candidates:
        key = normalise(prompt)
        if key not in seen:
            seen.add(key)
            unique.append((source, origin, prompt))
    counts["prompts_unique"] = len(unique)
    asked = config.num_magpie + config.num_tasks
    if len(unique) < 0.9 * asked:
        log(f"warning: only {len(unique)} usable unique prompts of the {asked} asked for "
            "(Magpie prompts that did not end their turn, or task prompts repeating over a "
            "small text pool); ask for more, or add --docs folders, to reach a row count")

    templated, fitting = [], []
    for item in unique:
        text = tok.apply_chat_template([{"role": "user", "content": item[2]}], tokenize=False,
                                       add_generation_prompt=True)
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= config.max_prompt_len:
            templated.append(text)
            fitting.append(item)
    counts["prompts_fitting"] = len(fitting)
    answers = gen.generate(templated, config.max_new_tokens, config.temperature,
                           config.batch_size, prompt_len=config.max_prompt_len,
                           seed=config.seed + 1 + 7919 * config.shard[0], desc="answers")

    config.output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    decoding = {"temperature": config.temperature, "max_new_tokens": config.max_new_tokens}
    with open(config.output, "w", encoding="utf-8") as fh:
        for (source, origin, prompt), ans in zip(fitting, answers):
            if ans.tokens < config.min_response_tokens or not ans.text:
                continue
            if not ans.finished and not config.keep_truncated:
                continue
            row = {
                "id": f"{source}-{config.shard[0]}-{written:06d}",
                "messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": ans.text}],
                "source": source, "origin": origin, "generator": name,
                "decoding": decoding, "response_tokens": ans.tokens,
                "finished": ans.finished, "split": _split(prompt, config.heldout_fraction),
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
            counts[f"rows_{source}"] = counts.get(f"rows_{source}", 0) + 1
    counts["rows"] = written
    counts["seconds"] = round(time.perf_counter() - started, 1)
    log(f"wrote {written} rows to {config.output}: {json.dumps(counts)}")
    return counts


def merge_shards(paths: list[Path], output: Path, log=print) -> int:
    """Concatenate shard files, dropping rows whose prompt repeats an earlier one."""
    seen: set[str] = set()
    kept = 0
    with open(output, "w", encoding="utf-8") as out:
        for path in paths:
            assert_not_benchmark(path)
            with open(path, encoding="utf-8") as fh:
                lines = fh.readlines()
            for line in lines:
                if not line.strip():
                    continue
                row = json.loads(line)
                key = normalise(row["messages"][0]["content"])
                if key in seen:
                    continue
                seen.add(key)
                out.write(line if line.endswith("\n") else line + "\n")
                kept += 1
    log(f"merged {len(paths)} shards into {output}: {kept} rows")
    return kept
