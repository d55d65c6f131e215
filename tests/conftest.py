"""Test setup: Triton's interpreter runs the generated kernels when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton` (Triton reads it when decorating its stdlib).
    os.environ.setdefault("TRITON_INTERPRET", "1")
