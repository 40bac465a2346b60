"""msn-serve kernels: paged KV cache and the Triton kernels that read and write it.

Triton has no CPU backend, but its interpreter runs the very same kernels on CPU
tensors (slowly), which is how CI tests them. Triton decides between compiling
and interpreting when a kernel is *decorated*, so the switch has to be set here,
before any kernel module is imported. An explicit TRITON_INTERPRET wins.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
