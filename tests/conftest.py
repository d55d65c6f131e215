"""Test setup: Triton's interpreter runs the generated kernels when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton` (Triton reads it when decorating its stdlib).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import linforge  # noqa: E402

# The repository root is the package. pytest imports a root package's __init__.py under the
# folder's name (e.g. "main") when it collects tests below it; a second copy of linforge
# would register its own custom ops and IR enums. Alias the folder name to the one copy.
sys.modules.setdefault(Path(linforge.__file__).parent.name, linforge)
