"""The reference runner: a transformers causal LM decoded step by step with TR-Jacobi.

One step feeds the last accepted token (root) plus the tree's draft nodes, each at
position prefix + depth, under a mask that lets a node see the prefix, its ancestors and
itself. The model's own next token at every node decides the longest accepted path
(`proposers.verify`); its KV rows are moved to contiguous slots and the rest is simply
left to be overwritten. `ar` is the same loop with a root-only tree, `jacobi` a chain
template, `pld` a retrieval chain without noise, `tr-jacobi` the full tree.

On CUDA the draft steps run as captured CUDA graphs over a static cache (the host is too
slow to launch an eager step of a small model; architecture.md), one graph per step size,
and so does each prompt's prefill, padded to one of a few lengths (`prefill_bucket`).
With `compile_steps` the decode steps and the prompt's prefill run the model through
`torch.compile` first: Inductor fuses the norms, rotary embedding, activations and
residual adds, so a captured step replays far fewer kernels (a small model's step on a
GPU is bound by its kernel count, not by its FLOPs or bytes).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from proposers.candidates import CandidateTable
from proposers.detok import TextStream, eos_token_ids
from proposers.reference.cache import StaticKVCache
from proposers.retrieval import NgramIndex
from proposers.templates import TreeTemplate, load_template
from proposers.tree import TreeSpec, compile_tree
from proposers.verify import accept, sample_targets

METHODS = ("ar", "jacobi", "tr-jacobi", "pld")
DEFAULT_TEMPLATES = {"jacobi": "chain-5", "tr-jacobi": "paper-68-r16", "pld": "retrieval-10"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class GenerationConfig:
    method: str = "tr-jacobi"
    max_new_tokens: int = 128
    template: str | None = None  # bundled name or JSON path; default per method
    stop: Sequence[str] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    max_ngram: int = 3  # retrieval n-gram length (paper: 3)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.method == "ar" and self.template:
            raise ValueError("method 'ar' verifies no drafts and takes no template")


@dataclass(slots=True)
class StepOutput:
    token_ids: list[int]  # new tokens (trimmed at EOS / stop string / max tokens)
    text: str  # newly final text
    num_drafted: int  # draft nodes verified this step
    accepted_depth: int  # drafts accepted this step
    draft_depth: int  # deepest draft verified this step (0 = no drafts; pruning shrinks it)
    finish_reason: str | None = None  # "stop" | "length" on the last step
    eos: bool = False  # the model emitted EOS here (not in token_ids; it counts for MAT)


@dataclass(slots=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    num_steps: int
    mat: float
    tokens_per_s: float
    method: str
    finish_reason: str
    prompt_tokens: int
    elapsed_s: float
    num_generated: int = 0  # token_ids plus a final EOS: the tokens MAT counts
    accepted_per_depth: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "num_steps": self.num_steps,
            "mat": round(self.mat, 4), "tokens_per_s": round(self.tokens_per_s, 3),
            "method": self.method, "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens, "elapsed_s": round(self.elapsed_s, 4),
        }


class ReferenceRunner:
    def __init__(self, model, tokenizer, device: torch.device, *, use_cuda_graphs: bool | None = None,
                 graph_capacity: int = 4096, attn_backend: str = "sdpa",
                 compile_steps: bool = False):
        """`attn_backend`: "sdpa" (transformers' SDPA over our static cache) or
        "paged-triton" / "paged-torch" (our paged cache and tree-attention kernels, or
        their PyTorch references; this switches `model`'s attention implementation).
        `compile_steps`: run decode steps and prefills through `torch.compile(model,
        dynamic=True)` (compiled once each for one-token steps, larger steps and prefills;
        on our paged backends the prefill runs an SDPA twin of the model, compiled on its
        own; the first of each kind pays the compile; `warm_up` does that up front)."""
        self.attn_backend = attn_backend
        self.compile_steps = compile_steps
        self._compiled_model = self._compiled_twin = None
        self._prefill_twin = None
        if attn_backend == "sdpa":
            self._make_cache = StaticKVCache.for_model
        else:
            from kernels.transformers_backend import use_paged_attention

            # Prompts prefill through a twin of the model on transformers' SDPA (the same
            # parameter tensors, its own config) into a static cache, then move into the
            # pool in one copy per K/V: a prefill is causal and compute-bound, where SDPA
            # is the right kernel (kernels/prefill.py), and with no cache of ours inside,
            # the compiled prefill is one graph instead of pieces between our per-layer
            # cache calls (which cost more than the eager prefill on an H200).
            shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
            self._prefill_twin = copy.deepcopy(model, shared).eval()
            self._prefill_twin.set_attn_implementation("sdpa")
            self._make_cache = use_paged_attention(model, attn_backend)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.max_context = int(getattr(self.config, "max_position_embeddings", 2048))
        self.eos_ids = eos_token_ids(getattr(model, "generation_config", None),
                                     model.config, tokenizer)
        self.use_cuda_graphs = device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.graph_capacity = min(graph_capacity, self.max_context + 128)
        self._trees: dict[str, TreeSpec] = {}
        # Graphs by (step size, key bound): on our paged kernels the launch shape (key
        # splits, tiles) depends on the prefix, so each step size gets a graph per
        # power-of-two prefix bucket; transformers' SDPA reads the whole cache (bound 0).
        self._graphs: dict[tuple[int, int], _GraphStep] = {}
        self._graph_pool = None
        self._graph_cache: StaticKVCache | None = None
        # Prefill graphs by padded length (`prefill_bucket`), and on our paged backends
        # the static cache their SDPA twin fills (shared: one prefill at a time).
        self._prefill_graphs: dict[int, _PrefillGraph] = {}
        self._twin_cache: StaticKVCache | None = None
        # Slots above graph_capacity that only graph warm-up and capture write to: a graph
        # may be captured in the middle of a request, and its dry runs must not overwrite
        # that request's KV rows.
        self.graph_scratch = 256
        # Diagnostics (benchmarks/reference/host_profile.py): a list makes every graph
        # step append (step size, staging s, replay launch s, wait for the result s).
        self.step_timer: list[tuple[int, float, float, float]] | None = None

    @classmethod
    def load(cls, model_path: str | Path, device: str = "cpu", dtype: str = "float32",
             **kwargs) -> ReferenceRunner:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=DTYPES[dtype], attn_implementation="sdpa"
        ).to(dev)
        return cls(model, tok, dev, **kwargs)

    # ---- prompts ---------------------------------------------------------------------

    def encode_chat(self, messages: list[dict] | str) -> list[int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- trees -----------------------------------------------------------------------

    def tree_for(self, cfg: GenerationConfig) -> TreeSpec:
        key = f"{cfg.method}:{cfg.template}"
        if key not in self._trees:
            if cfg.method == "ar":
                template = TreeTemplate("ar", top_k=1, max_depth=1, paths=())
            else:
                template = load_template(cfg.template or DEFAULT_TEMPLATES[cfg.method])
            if self.use_cuda_graphs and template.top_k > _GraphStep.TOPK:
                # The graph keeps a fixed top-K; wider columns would silently become noise.
                raise ValueError(f"template {template.name!r} has top_k {template.top_k}; "
                                 f"CUDA-graph steps support up to {_GraphStep.TOPK}")
            if self.use_cuda_graphs and template.max_depth > _GraphStep.MAX_DEPTH:
                raise ValueError(f"template {template.name!r} is {template.max_depth} deep; "
                                 f"CUDA-graph steps support up to {_GraphStep.MAX_DEPTH}")
            self._trees[key] = compile_tree(template)
        return self._trees[key]

    # ---- decoding --------------------------------------------------------------------

    def warm_up(self, methods: Sequence[str] = ("ar", "tr-jacobi"), max_new_tokens: int = 8,
                *, second_prefill: bool = True) -> None:
        """A short generation per method: compiles the prefill and the steps
        (`compile_steps`: one-token and larger steps compile apart) and captures their
        first graphs. Then a prefill of a second padded length: a compiled prefill
        specializes on the first length it sees and compiles its dynamic-length code at
        the second (on an H200 that took minutes; without this, a server's first prompt
        of another length would wait for it)."""
        prompt = self.encode_chat("Say hello.")
        for method in methods:
            self.generate(prompt, GenerationConfig(method=method, max_new_tokens=max_new_tokens,
                                                   ignore_eos=True))
        if not second_prefill or not methods:
            return
        first = self.prefill_bucket(len(prompt) - 1)
        longer = prompt
        while self.prefill_bucket(len(longer) - 1) == first and len(longer) < first + 8:
            longer = self.encode_chat("Say hello. " * (len(longer) // 2))
        if len(longer) + 2 <= self.max_context:
            self.generate(longer, GenerationConfig(method=methods[0], max_new_tokens=2,
                                                   ignore_eos=True))

    def generate(self, prompt_ids: Sequence[int], cfg: GenerationConfig) -> GenerationResult:
        start = time.perf_counter()
        tokens: list[int] = []
        text: list[str] = []
        steps = generated = 0
        finish = "length"
        tree = self.tree_for(cfg)
        per_depth = [0] * (tree.max_depth + 1)
        for out in self.stream(prompt_ids, cfg):
            steps += 1
            generated += len(out.token_ids) + out.eos
            tokens += out.token_ids
            text.append(out.text)
            per_depth[out.accepted_depth] += 1
            finish = out.finish_reason or finish
        self._sync()
        elapsed = time.perf_counter() - start
        return GenerationResult(
            text="".join(text), token_ids=tokens, num_steps=steps,
            mat=generated / max(steps, 1), tokens_per_s=len(tokens) / max(elapsed, 1e-9),
            method=cfg.method, finish_reason=finish, prompt_tokens=len(prompt_ids),
            elapsed_s=elapsed, num_generated=generated, accepted_per_depth=per_depth,
        )

    @torch.inference_mode()
    def stream(self, prompt_ids: Sequence[int], cfg: GenerationConfig, *,
               observe: Callable[[np.ndarray, int], None] | None = None) -> Iterator[StepOutput]:
        """Decode step by step; closing the generator cancels generation.

        `observe(table, position)`, when given, sees a copy of each step's candidate
        table (depth x column, `EMPTY` where noise will go) and the root's position in
        prompt + output: what tree calibration (`proposers.tree_fit`) learns from."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        tree = self.tree_for(cfg)
        need = len(prompt_ids) + cfg.max_new_tokens
        if need > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) = "
                f"{need} exceeds the model's context of {self.max_context} tokens"
            )
        gen = torch.Generator().manual_seed(cfg.seed if cfg.seed is not None else 0)
        table = CandidateTable(tree, gen, max_ngram=cfg.max_ngram, fill_noise=cfg.method != "pld")
        capacity = need + tree.num_nodes + 1
        cache = self._cache_for(capacity)
        texts = TextStream(self.tokenizer, cfg.stop)

        # The context (prompt + output) grows in place in one buffer; the retrieval
        # branch looks its suffix up in an index updated by each step's new tokens (a
        # scan of the whole context every step grows with the text).
        buffer = torch.empty(need + tree.max_depth + 1, dtype=torch.long)
        length = len(prompt_ids)
        buffer[:length] = torch.tensor(list(prompt_ids), dtype=torch.long)
        context = buffer[:length]
        index = NgramIndex(cfg.max_ngram) if tree.template.uses_retrieval else None
        prefix = length - 1  # tokens in the cache; the last prompt token is the root
        if prefix:
            self._prefill(cache, context[:-1])
        root = int(context[-1])
        emitted = 0
        graphs = self._graph_steps(cfg)
        # Graph steps compact the last step's accepted rows at the start of the next
        # replay (no launches from here); eager steps compact right away.
        pending: tuple[int, list[int]] | None = None
        while True:
            if index is not None:
                index.sync(context.numpy())
                table.set_retrieval(context, index.match(tree.max_depth)[0])
            if observe is not None:
                observe(table.table.numpy().copy(), length - 1)
            node_tokens, keep = table.node_tokens(root, context)
            step_tree = tree.subtree(keep)
            target, topk = self._step(cache, step_tree, node_tokens, prefix, cfg, gen, pending)
            acc = accept(step_tree, node_tokens, target)
            pending = None
            if acc.num_accepted and graphs:
                pending = (prefix, acc.path)
            elif acc.num_accepted:
                path = torch.tensor(acc.path, device=self.device)
                cache.compact(prefix + path, prefix + 1 + torch.arange(acc.num_accepted, device=self.device))
            chain_nodes = step_tree.feedback_chain(acc.node)
            table.set_feedback(topk[chain_nodes] if chain_nodes else topk[:0])

            new, finish = self._trim(acc.tokens, emitted, cfg)
            eos = finish == "eos"
            finish = "stop" if eos else finish
            pushed = texts.push(new)
            if pushed.stopped:
                new, finish = new[: pushed.num_tokens], "stop"
            emitted += len(new)
            text = pushed.text + (texts.flush() if finish else "")
            yield StepOutput(new, text, step_tree.num_nodes, acc.num_accepted,
                             step_tree.max_node_depth, finish, eos and not pushed.stopped)
            if finish:
                return
            prefix += acc.num_accepted + 1
            root = acc.tokens[-1]
            buffer[length : length + len(acc.tokens)] = torch.tensor(acc.tokens)
            length += len(acc.tokens)
            context = buffer[:length]

    def _trim(self, tokens: list[int], emitted: int, cfg: GenerationConfig):
        if not cfg.ignore_eos:
            for i, tok in enumerate(tokens):
                if tok in self.eos_ids:
                    return tokens[:i], "eos"
        room = cfg.max_new_tokens - emitted
        if len(tokens) >= room:
            return tokens[:room], "length"
        return tokens, None

    # ---- forward passes --------------------------------------------------------------

    def _cache_for(self, capacity: int) -> StaticKVCache:
        if self.use_cuda_graphs:
            if capacity > self.graph_capacity:
                raise ValueError(
                    f"request needs {capacity} cache slots; the CUDA-graph cache holds "
                    f"{self.graph_capacity} (raise graph_capacity)"
                )
            if self._graph_cache is None:
                self._graph_cache = self._make_cache(
                    self.config, self.graph_capacity + self.graph_scratch, self.dtype, self.device)
            return self._graph_cache
        return self._make_cache(self.config, capacity, self.dtype, self.device)

    def compiled_model(self):
        """The module decode steps and prefills call: the model, or with `compile_steps`
        its compiled wrapper (same weights)."""
        if not self.compile_steps:
            return self.model
        if self._compiled_model is None:
            if self.attn_backend != "sdpa":
                # The paged cache and attention run eagerly (graph breaks), so each layer's
                # pieces compile per layer (their layer index is a constant): let all compile.
                import torch._dynamo.config as dynamo_config

                pieces = 8 * self.config.num_hidden_layers
                dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, pieces)
                dynamo_config.accumulated_recompile_limit = max(
                    dynamo_config.accumulated_recompile_limit, 4 * pieces)
            self._compiled_model = torch.compile(self.model, dynamic=True)
        return self._compiled_model

    def _compiled_prefill_twin(self):
        """`compiled_model` for the paged backends' SDPA prefill twin."""
        if not self.compile_steps:
            return self._prefill_twin
        if self._compiled_twin is None:
            self._compiled_twin = torch.compile(self._prefill_twin, dynamic=True)
        return self._compiled_twin

    def _forward(self, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, logits_to_keep: int = 0, *, eager: bool = False,
                 twin: bool = False) -> torch.Tensor:
        if eager:
            model = self._prefill_twin if twin else self.model
        else:
            model = self._compiled_prefill_twin() if twin else self.compiled_model()
        out = model(
            input_ids=ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
            attention_mask=mask[None, None], past_key_values=cache, use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits[0]

    def _prefill(self, cache: StaticKVCache, ids: torch.Tensor, *,
                 eager: bool = False) -> torch.Tensor | None:
        """Causal forward of `ids` into an empty cache; the logits after the last token.

        Into the CUDA-graph cache (not `eager`) it replays a captured prefill of a padded
        length instead and returns None (`_PrefillGraph`): a compiled prefill launched
        from the host takes several times its GPU time, once per request."""
        if self.use_cuda_graphs and not eager and cache is self._graph_cache:
            size = self.prefill_bucket(ids.numel())
            graph = self._prefill_graphs.get(size)
            if graph is None:
                graph = self._prefill_graphs[size] = _PrefillGraph(self, cache, size)
            graph.run(ids)
            return None
        n = ids.numel()
        dev = self.device
        target = cache
        if self._prefill_twin is not None:  # our paged cache: SDPA twin, then one copy
            cache = StaticKVCache.for_model(self.config, n, self.dtype, dev)
        cache.slots = torch.arange(n, device=dev)
        cache.kv_len = n
        _mask_from_forward(target)
        mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        # Only the KV rows matter: skip the LM head over the prompt (prompt x vocab logits).
        logits = self._forward(cache, ids.to(dev), cache.slots, mask, logits_to_keep=1,
                               eager=eager, twin=target is not cache)[-1]
        if target is not cache:
            target.write_prompt(cache.keys, cache.values)
        return logits

    MIN_PREFILL_BUCKET = 64

    def prefill_bucket(self, n: int) -> int:
        """The padded length a graph prefill of `n` tokens runs at: 64, 96, 128, 192, 256,
        ... (powers of two and the points halfway between, so at most half of a prefill
        is padding), capped at the graph cache's capacity."""
        if n > self.graph_capacity:
            raise ValueError(f"prefill of {n} tokens exceeds the graph cache's "
                             f"{self.graph_capacity} slots")
        size = self.MIN_PREFILL_BUCKET
        while size < n:
            size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
        return min(size, self.graph_capacity)

    @torch.inference_mode()
    def next_token_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """The model's logits after `ids`, from one eager forward over a fresh cache of the
        runner's kind (so it holds on every attention backend)."""
        cache = self._make_cache(self.config, len(ids), self.dtype, self.device)
        return self._prefill(cache, torch.tensor(list(ids), dtype=torch.long), eager=True)

    def _graph_steps(self, cfg: GenerationConfig) -> bool:
        return self.use_cuda_graphs and cfg.temperature == 0

    def _step(self, cache: StaticKVCache, tree: TreeSpec, node_tokens: torch.Tensor,
              prefix: int, cfg: GenerationConfig, gen: torch.Generator,
              pending: tuple[int, list[int]] | None = None):
        """One verification forward. Returns per-node targets and top-K ids (on CPU).
        `pending` (graph steps only): the previous step's prefix and accepted nodes,
        compacted first."""
        k = tree.template.top_k
        if self._graph_steps(cfg):
            key = (node_tokens.numel(), self._key_bound(prefix + node_tokens.numel(), cache))
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = _GraphStep(self, cache, *key, tree=tree)
            return graph.run(tree, node_tokens, prefix, k, pending)
        assert pending is None, "eager steps compact right after acceptance"
        _mask_from_forward(cache)
        dev = self.device
        q = node_tokens.numel()
        cache.slots = prefix + torch.arange(q, device=dev)
        cache.kv_len = prefix + q
        mask = torch.ones(q, prefix + q, dtype=torch.bool, device=dev)
        mask[:, prefix:] = tree.ancestors.to(dev)
        logits = self._forward(cache, node_tokens.to(dev), tree.positions(prefix).to(dev), mask)
        topk = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).indices.cpu()
        target = sample_targets(logits.cpu() if cfg.temperature > 0 else logits,
                                cfg.temperature, cfg.top_p, gen)
        return target.cpu(), topk

    MIN_KEY_BOUND = 512

    def _key_bound(self, keys: int, cache) -> int:
        """The graph bucket of a step reading `keys` keys: the next power of two from
        MIN_KEY_BOUND (capped at the cache), or 0 where the launch ignores it."""
        if not hasattr(cache, "key_bound"):
            return 0
        bound = self.MIN_KEY_BOUND
        while bound < keys:
            bound *= 2
        return min(bound, cache.capacity)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _mask_from_forward(cache) -> None:
    """An eager forward passes its own mask: drop the tree bitmask graph steps left on
    our paged cache (the graph cache serves eager prefills and sampled steps too)."""
    if getattr(cache, "tree_bits", None) is not None:
        cache.tree_bits = None


class _GraphStep:
    """A CUDA graph of one greedy step of fixed size over the full static cache.

    Everything a step needs from the host is one small copy into a static buffer: node
    tokens, prefix length, and the previous step's prefix and accepted nodes. Inside the
    graph the step first compacts those accepted rows (`compact_path`), then derives
    write slots, RoPE positions and the mask from the prefix and the tree's depth and
    ancestor buffers (copied only when the tree changes), runs the model, and packs
    argmax and top-K into one output, the one copy back. On CPU (tests) the same body
    runs eagerly instead of being captured.
    """

    TOPK = 16
    MAX_DEPTH = 16  # accepted nodes a replay can compact (the deepest bundled template: 16, paper-68-r16)

    def __init__(self, runner: ReferenceRunner, cache: StaticKVCache, q: int, key_bound: int = 0,
                 *, tree: TreeSpec):
        dev = runner.device
        self.runner, self.cache, self.q, self.key_bound = runner, cache, q, key_bound
        if q > runner.graph_scratch:
            raise ValueError(f"step of {q} tokens exceeds the graph scratch of {runner.graph_scratch}")
        self.captured = dev.type == "cuda"
        n = q + 2 + self.MAX_DEPTH
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=self.captured)
        self.host_np = self.host.numpy()
        self.inp = torch.zeros(n, dtype=torch.long, device=dev)
        self.ids, self.prefix = self.inp[:q], self.inp[q : q + 1]
        self.prev_prefix, self.prev_path = self.inp[q + 1 : q + 2], self.inp[q + 2 :]
        self.depth = torch.zeros(q, dtype=torch.long, device=dev)
        self.anc = torch.zeros(q, q, dtype=torch.bool, device=dev)
        self.tree: TreeSpec | None = None
        self.slots = torch.zeros(q, dtype=torch.long, device=dev)
        self.pos = torch.zeros(q, dtype=torch.long, device=dev)
        self.mask = torch.zeros(q, cache.capacity, dtype=torch.bool, device=dev)
        self.rows = torch.arange(q, device=dev)
        self.col = torch.arange(cache.capacity, device=dev)
        # Our paged cache takes the tree as the kernel's bitmask, packed on the host when
        # the tree changes: no mask is built in the graph (SDPA needs the dense one).
        self.bits = (torch.zeros(q, -(-q // 32), dtype=torch.int32, device=dev)
                     if hasattr(cache, "tree_bits") else None)
        self._set_tree(tree)
        if not self.captured:
            return
        # Dry runs (warm-up, capture) write only the scratch slots at the top of the
        # cache and compact nothing: a graph may be captured in the middle of a request.
        self._stage(torch.zeros(q, dtype=torch.long), cache.capacity - q, None)
        self.inp.copy_(self.host)
        self._bind()
        self.graph, self.out = _capture(runner, self._body)

    def _set_tree(self, tree: TreeSpec) -> None:
        self.depth.copy_(tree.depth)
        self.anc.copy_(tree.ancestors)
        if self.bits is not None:
            from kernels.tree_attention import pack_visibility

            visible = torch.zeros(self.q, self.bits.shape[1] * 32, dtype=torch.bool)
            visible[:, : self.q] = tree.ancestors
            self.bits.copy_(pack_visibility(visible))
        self.tree = tree

    def _stage(self, node_tokens: torch.Tensor, prefix: int,
               pending: tuple[int, list[int]] | None) -> None:
        q, h = self.q, self.host_np
        h[:q] = node_tokens.numpy()
        h[q] = prefix
        h[q + 2 :] = -1
        h[q + 1] = 0
        if pending is not None:
            prev, path = pending
            if len(path) > self.MAX_DEPTH:
                raise ValueError(f"accepted {len(path)} nodes; graph steps compact up to "
                                 f"{self.MAX_DEPTH}")
            h[q + 1] = prev
            h[q + 2 : q + 2 + len(path)] = path

    def _bind(self) -> None:
        self.cache.kv_len = None
        self.cache.slots = self.slots
        if self.bits is not None:
            self.cache.tree_bits = self.bits
        if self.key_bound:
            self.cache.key_bound = self.key_bound

    def _body(self) -> torch.Tensor:
        self.cache.compact_path(self.prev_prefix, self.prev_path)
        prefix = self.prefix
        self.slots.copy_(prefix + self.rows)
        self.pos.copy_(prefix + self.depth)
        if self.bits is None:
            rel = (self.col - prefix).clamp(0, self.q - 1)
            tree_cols = (self.col >= prefix) & (self.col < prefix + self.q)
            self.mask.copy_((self.col < prefix) | (self.anc[:, rel] & tree_cols))
        logits = self.runner._forward(self.cache, self.ids, self.pos, self.mask)
        k = min(self.TOPK, logits.shape[-1])
        return torch.cat([logits.argmax(-1, keepdim=True), torch.topk(logits, k, dim=-1).indices],
                         dim=-1)

    def run(self, tree: TreeSpec, node_tokens: torch.Tensor, prefix: int, k: int,
            pending: tuple[int, list[int]] | None = None):
        timer = self.runner.step_timer
        t0 = time.perf_counter() if timer is not None else 0.0
        self._stage(node_tokens, prefix, pending)
        self.inp.copy_(self.host, non_blocking=True)
        if tree is not self.tree:
            self._set_tree(tree)
        self._bind()
        t1 = time.perf_counter() if timer is not None else 0.0
        if self.captured:
            self.graph.replay()
            t2 = time.perf_counter() if timer is not None else 0.0
            out = self.out.cpu()
        else:
            t2 = t1
            out = self._body().cpu()
        if timer is not None:
            timer.append((self.q, t1 - t0, t2 - t1, time.perf_counter() - t2))
        return out[:, 0], out[:, 1 : k + 1]


def _capture(runner: ReferenceRunner, body: Callable[[], torch.Tensor | None]):
    """Run `body` twice on a side stream (allocator, lazy init, compilation), then
    capture it into a CUDA graph in the runner's one memory pool (its graphs replay one
    at a time). Returns the graph and the captured call's output."""
    dev = runner.device
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        for _ in range(2):
            body()
    torch.cuda.current_stream(dev).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if runner._graph_pool is None:
        runner._graph_pool = torch.cuda.graph_pool_handle()
    with torch.cuda.graph(graph, pool=runner._graph_pool):
        out = body()
    return graph, out


class _PrefillGraph:
    """A CUDA graph of one prompt's prefill, padded to `size` tokens.

    The prompt goes into a static buffer with zeros after it and the graph runs the
    causal forward over all `size` positions: the causal mask keeps the padding out of
    the prompt's rows, and the padding's K/V rows land after the prompt, in slots that
    steps overwrite before they read them or never see (a step sees the prefix and its
    own rows). On our paged backends the graph runs the SDPA twin into a static cache
    and copies its rows into the pool, as the eager prefill does. The prompt's logits
    are not computed (the runner decodes from its last token, which it feeds as the
    first step's root). On CPU (tests) the same padded body runs eagerly.
    """

    def __init__(self, runner: ReferenceRunner, cache: StaticKVCache, size: int):
        dev = runner.device
        self.runner, self.target, self.size = runner, cache, size
        self.captured = dev.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=self.captured)
        self.ids = torch.zeros(size, dtype=torch.long, device=dev)
        self.positions = torch.arange(size, device=dev)
        self.mask = torch.ones(size, size, dtype=torch.bool, device=dev).tril()
        self.cache = cache
        if runner._prefill_twin is not None:
            if runner._twin_cache is None:
                runner._twin_cache = StaticKVCache.for_model(
                    runner.config, runner.graph_capacity, runner.dtype, dev)
            self.cache = runner._twin_cache.prefix_view(size)
        if self.captured:
            # Dry runs write rows 0..size-1, which this request's prefill rewrites.
            self.graph, _ = _capture(runner, self._body)

    def _body(self) -> None:
        self.cache.slots = self.positions
        self.cache.kv_len = self.size
        twin = self.cache is not self.target
        self.runner._forward(self.cache, self.ids, self.positions, self.mask,
                             logits_to_keep=1, twin=twin)
        if twin:
            self.target.write_prompt(self.cache.keys, self.cache.values)

    def run(self, ids: torch.Tensor) -> None:
        n = ids.numel()
        self.host[:n] = ids
        self.host[n:] = 0
        self.ids.copy_(self.host, non_blocking=self.captured)
        _mask_from_forward(self.target)
        if self.captured:
            self.graph.replay()
        else:
            self._body()

