"""Session-wide test settings that must be in place before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    # Triton has no CPU backend; its interpreter runs the same kernels on CPU tensors. jit decoration reads this
    # once, so it must be set before the first import of triton (vLLM imports it too).
    os.environ.setdefault("TRITON_INTERPRET", "1")
