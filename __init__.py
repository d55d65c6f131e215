"""linforge: a compiler for linear attention.

Write a variant as a short spec (state update plus readout); ``linforge.compile`` parses it,
proves the structure of its update and returns a differentiable op::

    attn = linforge.compile(open("gla.lin").read())
    o, state = attn(q=q, k=k, v=v, g=g, output_final_state=True)
"""

from .codegen.launch import ensure_backend

ensure_backend()  # before anything imports triton

from . import library  # noqa: E402
from .api import Attention, compile, load  # noqa: E402
from .dsl.errors import SpecError  # noqa: E402
from .ir.transition import TransitionClass  # noqa: E402
from . import nn  # noqa: E402  (linforge.nn.LinearAttention; torch.nn stays torch.nn)

__all__ = ["Attention", "SpecError", "TransitionClass", "compile", "library", "load", "nn"]
__version__ = "0.1.0"
