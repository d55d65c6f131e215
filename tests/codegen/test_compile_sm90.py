"""Every chunked kernel a real call launches compiles for a Hopper GPU (sm_90), on a machine
without one: Triton's compiler rejects code its interpreter runs (an early return in a
constexpr branch was one), and shared memory past the GPU's limit only shows when compiled.

Each case runs ``benchmarks/preflight.py`` for one op in a fresh process (the compiler, not
the interpreter, must be selected before triton is imported) at the benchmark's head and
state sizes (H=16, K=V=128, bf16), forward and backward. It is skipped where Triton has no
bundled ptxas. gated_deltanet's case also checks which of its MMAs take bf16 operands.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PREFLIGHT = Path(__file__).resolve().parents[2] / "benchmarks" / "preflight.py"
#: one op per kernel mode: diagonal (strict readout and bonus for rwkv6), scalar, normalizer,
#: the delta rule with diagonal gates, and the low rank; chunk and causal parallel forms;
#: wide heads take the loops over K and V tiles that are not unrolled (gla at K = V = 256;
#: gated_deltanet at fla's default K = 256, V = 512)
CASES = [("gla", "chunk,parallel", 128, 128), ("rwkv6", "chunk", 128, 128),
         ("retnet", "chunk,parallel", 128, 128), ("linear_attention", "chunk", 128, 128),
         ("kda", "chunk", 128, 128), ("rwkv7", "chunk", 128, 128), ("gla", "chunk", 256, 256),
         ("gated_deltanet", "chunk", 256, 512)]


def _ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _preflight(op: str, forms: str, K: int, V: int, tmp_path) -> list[dict]:
    """preflight.py's rows for one op: every kernel its calls launch, compiled for sm_90."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(PREFLIGHT), "--one", op, "--forms", forms,
                           "--T", "64", "--K", str(K), "--V", str(V)], env=env,
                          capture_output=True, text=True,
                          cwd=PREFLIGHT.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _ptxas(), reason="Triton without its bundled ptxas")
@pytest.mark.parametrize("op,forms,K,V", CASES)
def test_every_kernel_compiles_for_sm90(op, forms, K, V, tmp_path):
    rows = _preflight(op, forms, K, V, tmp_path)
    assert [r["form"] for r in rows] == forms.split(",")
    for r in rows:
        names = {k["kernel"] for k in r["kernels"]}
        assert any(n.startswith("chunk_") for n in names), names
        # forward and backward both launched kernels
        assert {k["phase"] for k in r["kernels"]} == {"fwd", "bwd"}
        over = [(k["kernel"], k["shared"]) for k in r["kernels"] if k["over_shared"]]
        assert not over, f"{op} {r['form']}: shared memory over the H100/H200 limit: {over}"
        if op == "gated_deltanet":
            _check_bf16_tiles_multiply_in_bf16(r["kernels"])


def _check_bf16_tiles_multiply_in_bf16(kernels: list[dict]) -> None:
    """The delta rules' half path takes tf32 dots, but a dot of two tiles that are bf16 as
    loaded takes bf16 operands (``_mm_of_loaded``): the same numbers, since bf16 products
    are exact in fp32, at half the tensor cores' time. In the SASS: the output kernel's
    q.k and q S in bf16 beside its scores times u in tf32 (none of its MMAs were bf16
    before), and the bf16 q.k of the local dU and gradient kernels."""
    sass = {(k["kernel"], k["phase"]): k["sass"] for k in kernels}
    output = sass[("chunk_output_kernel", "fwd")]
    assert 0 < output["mma_bf16"] < output["mma"], output
    assert sass[("chunk_local_du_kernel", "bwd")]["mma_bf16"] > 0
    assert sass[("chunk_grads_kernel", "bwd")]["mma_bf16"] > 0

