"""Which chunk kernel faults with bf16 dot operands: run retnet's chunked forward+backward
with every kernel on tf32 dots but one on bf16, each in its own process (a fault spoils the
CUDA context). Usage: python benchmarks/isolate_dot.py [op]."""

import json
import subprocess
import sys

CHILD = r"""
import sys, torch, json
import linforge, linforge.codegen.chunk_op as c
from bench_chunk import inputs, B, T, H, V
name, kernel = sys.argv[1], sys.argv[2]
attn = linforge.library.get(name)
x = {k: v.detach().requires_grad_() for k, v in inputs(name).items()}
c.FORCE_DOT = 1
o_ref = attn(**x, form="chunk")[0].float()
o_ref.sum().backward()
g_ref = {k: v.grad.clone() for k, v in x.items() if v.grad is not None}
for v in x.values():
    v.grad = None
c.KERNEL_DOT[kernel] = 0
o = attn(**x, form="chunk")[0].float()
o.sum().backward()
torch.cuda.synchronize()
err = {k: ((x[k].grad - g).abs().max() / g.abs().max()).item() for k, g in g_ref.items()}
err["o"] = ((o - o_ref).abs().max() / o_ref.abs().max()).item()
print(json.dumps({"op": name, "bf16_kernel": kernel, "ok": True, "rel_diff_vs_tf32": err}))
"""

name = sys.argv[1] if len(sys.argv) > 1 else "retnet"
for kernel in ("states", "output", "dstates", "grads"):
    r = subprocess.run([sys.executable, "-c", CHILD, name, kernel], capture_output=True,
                       text=True, timeout=120, env=dict(__import__("os").environ,
                                                        CUDA_LAUNCH_BLOCKING="1"))
    if r.returncode:
        print(json.dumps({"op": name, "bf16_kernel": kernel, "ok": False,
                          "error": r.stderr.strip().splitlines()[-1][:200]}))
    else:
        print(r.stdout.strip())
