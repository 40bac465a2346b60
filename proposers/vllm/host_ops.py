"""Row reductions over logits on the host CPU, faster than torch's own there.

On vLLM-CPU the runner reduces logits rows on the CPU every step: the greedy token of
each row (vLLM's sampler, and our tree acceptance over every drafted node) and the top-K
of each drafted node (Jacobi feedback). Over a 49,152-token vocabulary on 2 cores,
torch's `argmax` took ~0.4 ms for 8 rows and ~1.7 ms for 17 (one request's tree of 16
nodes), `topk(10)` about as long, and vLLM's own CPU greedy kernel ~0.2 ms for 8 rows;
numpy's vectorised `argmax` takes 0.04 / 0.1 ms, and a top-K that first ranks blocks of
64 columns by their maxima, ~0.2-0.8 ms.

- `argmax_rows` is exactly `torch.argmax(x, -1)`: the first maximal index, NaN counted as
  maximal (numpy's rules too; `tests/test_host_ops.py` checks ties, NaN and -inf rows
  against torch and vLLM's CPU kernel). Greedy output depends on it, so it stays exact.
- `topk_rows` returns the indices of the K largest values, largest first, like
  `torch.topk(x, K).indices`, except that indices of values tied with the K-th may be
  different ones: it feeds drafts only (they are verified), never an output token.

Other devices and dtypes (CUDA, bf16) use torch's ops, and so does the runner with
`TRJacobiConfig(host_ops=False)` (side-by-side benchmarks).
"""

from __future__ import annotations

import numpy as np
import torch

# Columns per block of `topk_rows`' first pass.
TOPK_BLOCK = 64


def _numpy_ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not x.requires_grad and x.dim() == 2)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`torch.argmax(x, -1)` of a `[rows, n]` tensor (int64)."""
    if not _numpy_ok(x) or x.shape[1] == 0:
        return x.argmax(-1)
    return torch.from_numpy(np.argmax(x.numpy(), axis=-1))


def topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices `[rows, k]` of the k largest values of each row, largest first.

    Every block of TOPK_BLOCK columns whose maximum is outside the k largest block maxima
    holds only values <= the k-th largest value of the row (the k chosen blocks' maxima are
    k values at least as large), so the k largest values all lie in the chosen blocks, up
    to values tied with the k-th."""
    rows, n = x.shape if x.dim() == 2 else (0, 0)
    blocks = n // TOPK_BLOCK
    if not _numpy_ok(x) or n % TOPK_BLOCK or blocks <= k:
        return x.topk(k, -1).indices
    a = x.numpy()
    maxima = torch.from_numpy(a.reshape(rows, blocks, TOPK_BLOCK).max(axis=-1))
    chosen = maxima.topk(k, -1).indices  # [rows, k] block numbers
    cand = (chosen[..., None] * TOPK_BLOCK + torch.arange(TOPK_BLOCK)).reshape(rows, -1)
    pick = x.gather(1, cand).topk(k, -1).indices
    return cand.gather(1, pick)


def fast_greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """A drop-in for vLLM's `Sampler.greedy_sample` (flat int64 token ids)."""
    return argmax_rows(logits).view(-1)
