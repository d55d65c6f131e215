"""Preflight: compile every kernel that real calls launch, for a Hopper GPU, on a machine
without one, and report each kernel's compile time, registers, spills and shared memory.

Usage (no GPU needed; use the device's Triton, 3.6, whose wheel is on this machine's disk:
a virtualenv with torch==2.13.0 triton==3.6.0 numpy lark sympy):

    python benchmarks/preflight.py [--ops gla,deltanet] [--forms chunk] [--T 256] \
        [--out benchmarks/results] [--ir DIR] [--set DELTA_HALF_DOT=0] \
        [--set delta_states.num_warps=4]

Each op runs in a fresh process with an empty Triton cache, with the benchmark's head and
state sizes (H=16, K=V=128, bf16) but a short sequence (the kernels are the same for any
T). Launches go to ``linforge.codegen.launch.PREFLIGHT``: they compile with exactly the
arguments, constexprs, warps and stages a GPU call would use, and nothing runs (outputs are
left uninitialised). So this catches what the interpreter does not (code the compiler
rejects, shared memory over the GPU's limit, heavy spilling) and gives the first call's
compile time per op and direction before any device time is spent. Compile times are this
machine's CPU; the device's may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

#: a Hopper GPU's largest shared memory per block (H100 and H200), bytes
SHARED_LIMIT = 232448
SIZES = dict(H=16, K=128, V=128)
#: key sizes of ops whose feature maps grow with K (Based's 1 + K + K^2 features: K=16 in
#: its paper, 16513 features at K=128)
OP_K = {"based": 16}


def _fake_driver():
    """The three things Triton's launcher asks the driver while it compiles."""
    from triton.backends.compiler import GPUTarget

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    return Driver()


#: SASS opcode families counted per kernel (static counts: unrolled loops count every copy)
SASS_FAMILIES = {"mma": ("HGMMA", "HMMA", "WGMMA"), "exp": ("MUFU",), "bar": ("BAR",),
                 "shared": ("LDS", "STS", "LDSM", "STSM"), "global": ("LDG", "STG", "LDGSTS"),
                 "local": ("LDL", "STL"), "shuffle": ("SHFL",)}


def sass_instructions(cubin: bytes) -> list[tuple[int, str, str]]:
    """A compiled kernel's SASS as (address, opcode without modifiers, whole text)."""
    from compile_check import cuobjdump

    out = []
    for line in cuobjdump(cubin, "-sass").splitlines():
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?);", line)
        if found:
            body = found.group(2).strip().lstrip("{").strip()
            words = body.split()
            op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
            out.append((int(found.group(1), 16), op.split(".")[0], body))
    return out


def _families(ins: list[tuple[int, str, str]]) -> dict:
    counts = {"all": len(ins)}
    for family, prefixes in SASS_FAMILIES.items():
        counts[family] = sum(op in prefixes for _, op, _ in ins)
    # the MMAs' operand type: bf16 ones run at twice tf32's rate
    counts["mma_bf16"] = sum(op in SASS_FAMILIES["mma"] and ".BF16" in text
                             for _, op, text in ins)
    return counts


def sass_counts(cubin: bytes) -> dict:
    """Instruction counts of a compiled kernel's SASS: all, and per family (tensor-core
    MMAs, of them those on bf16 operands, MUFU (exp), barriers, shared, global and local
    (spill) loads and stores)."""
    return _families(sass_instructions(cubin))


def sass_loops(cubin: bytes) -> list[dict]:
    """The same counts for the body of each loop the SASS has (a branch back to an earlier
    address): what one trip of a loop costs, which static counts of the whole kernel hide
    when a loop runs many times."""
    ins = sass_instructions(cubin)
    loops = []
    for addr, op, body in ins:
        targets = re.findall(r"0x([0-9a-f]+)", body) if op == "BRA" else []
        if targets and int(targets[-1], 16) < addr:
            start = int(targets[-1], 16)
            loops.append(dict(start=start, **_families(
                [i for i in ins if start <= i[0] <= addr])))
    return loops


def ctas_per_sm(resources: str, num_warps: int, shared: int) -> int:
    """How many programs of a kernel fit on one Hopper SM at once, by registers (64K per
    SM, allocated per warp in units of 256) and shared memory (228 KiB per SM, 1 KiB of it
    reserved per program); at most 32."""
    found = re.search(r"REG:(\d+)", resources)
    if not found:
        return 0
    per_warp = -(-int(found.group(1)) * 32 // 256) * 256
    by_regs = 65536 // (per_warp * num_warps)
    by_shared = 233472 // (shared + 1024)
    return min(by_regs, by_shared, 32)


class Recorder:
    """Stands in for every launch: compiles the kernel for sm_90, records its resources."""

    def __init__(self, ir_dir: str | None = None):
        self.rows: list[dict] = []
        self.phase = "fwd"
        self.ir_dir = ir_dir

    def __call__(self, fn, grid, args, constexprs) -> None:
        from compile_check import _resources

        t0 = time.perf_counter()
        kernel = fn.warmup(*args, grid=grid, **constexprs)
        seconds = time.perf_counter() - t0
        key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        if any(r["key"] == key for r in self.rows):
            return
        res = _resources(kernel.asm["cubin"])
        if self.ir_dir:     # Triton's GPU IR (layouts, conversions) and the SASS
            stem = os.path.join(self.ir_dir, f"{self.phase}_{fn.__name__}_{len(self.rows)}")
            with open(stem + ".ttgir", "w") as f:
                f.write(kernel.asm["ttgir"])
            with open(stem + ".sass", "w") as f:
                from compile_check import cuobjdump
                f.write(cuobjdump(kernel.asm["cubin"], "-sass"))
        modes = {k: v for k, v in constexprs.items()
                 if k in ("DECAY", "DELTA", "LOW_RANK", "NORM", "SECOND", "STRICT", "PARALLEL",
                          "FROM_STATES", "LOAD_INVERSE", "INVERSE", "STORE_DV", "DOT", "BK",
                          "BV", "BKW", "num_warps", "num_stages")}
        self.rows.append(dict(key=key, phase=self.phase, kernel=fn.__name__, modes=modes,
                              compile_s=round(seconds, 2), shared=kernel.metadata.shared,
                              resources=res, sass=sass_counts(kernel.asm["cubin"]),
                              sass_loops=sass_loops(kernel.asm["cubin"]),
                              ctas_per_sm=ctas_per_sm(res, constexprs.get("num_warps", 4),
                                                      kernel.metadata.shared),
                              over_shared=kernel.metadata.shared > SHARED_LIMIT))


def run_op(name: str, forms: list[str], T: int, K: int | None = None, V: int | None = None,
           ir_dir: str | None = None, settings: list[str] = ()) -> list[dict]:
    """Compile every kernel of ``name``'s calls in ``forms``, forward then backward (with
    ``ir_dir``: each kernel's TTGIR and SASS written there), with ``settings`` applied
    (``switches.apply_settings``)."""
    import torch

    import linforge
    import linforge.codegen.launch as launch
    import triton
    from switches import apply_settings

    apply_settings(list(settings))

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from spec_inputs import make_inputs, spec_sizes

    triton.runtime.driver.set_active(_fake_driver())
    if ir_dir:
        ir_dir = os.path.join(ir_dir, name)
        os.makedirs(ir_dir, exist_ok=True)
    recorder = Recorder(ir_dir)
    launch.PREFLIGHT = recorder
    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=K or OP_K.get(name, SIZES["K"]), V=V or SIZES["V"])
    x = make_inputs(attn, B=1, T=T, H=SIZES["H"], sizes=sizes, seed=0)
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() and v.dim() >= 3 else v
         for k, v in x.items()}
    rows = []
    for form in forms:
        if form not in attn.info()["forms"]:
            continue
        recorder.rows, recorder.phase = [], "fwd"
        t0 = time.perf_counter()
        with torch.no_grad():
            attn(**x, form=form)
        fwd_s = time.perf_counter() - t0
        recorder.phase = "bwd"
        grads = {k: v.detach().requires_grad_() for k, v in x.items() if v.is_floating_point()}
        t0 = time.perf_counter()
        o, _ = attn(**{**x, **grads}, form=form)
        o.float().sum().backward()
        bwd_s = time.perf_counter() - t0
        for r in recorder.rows:
            r.pop("key")
        rows.append(dict(op=name, form=form, first_fwd_s=round(fwd_s, 1),
                         first_bwd_added_s=round(bwd_s, 1), kernels=recorder.rows))
    return rows


def _table(results: list[dict]) -> str:
    lines = ["| op | form | first fwd s | bwd added s | kernel | phase | modes | compile s | "
             "shared KiB | programs per SM | resources |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for i, k in enumerate(r["kernels"]):
            head = (f"| {r['op']} | {r['form']} | {r['first_fwd_s']} | {r['first_bwd_added_s']} "
                    if i == 0 else "| | | | ")
            flag = " **over the limit**" if k["over_shared"] else ""
            modes = " ".join(f"{a}={b}" for a, b in k["modes"].items())
            lines.append(f"{head}| {k['kernel']} | {k['phase']} | {modes} | {k['compile_s']} | "
                         f"{k['shared'] / 1024:.0f}{flag} | {k.get('ctas_per_sm', '-')} | "
                         f"{k['resources']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="retnet,gla,rwkv6,linear_attention,mamba2,deltanet,"
                                     "gated_deltanet,kda,rwkv7")
    ap.add_argument("--forms", default="chunk")
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--K", type=int, default=None, help="key size (default 128; Based 16)")
    ap.add_argument("--V", type=int, default=None, help="value size (default 128)")
    ap.add_argument("--out", default=None, help="write preflight.json and preflight.md here")
    ap.add_argument("--ir", default=None, help="write each kernel's TTGIR and SASS here")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a chunk_op switch or KERNEL.OPTION for the run (repeatable)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # (the child process)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_op(args.one, args.forms.split(","), args.T, args.K, args.V,
                                args.ir, args.set)))
        return
    results = []
    for name in args.ops.split(","):
        env = dict(os.environ, TRITON_INTERPRET="0",
                   TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="preflight-"))
        sizes = [a for d in ("K", "V", "ir") if getattr(args, d)
                 for a in (f"--{d}", str(getattr(args, d)))]
        settings = [a for item in args.set for a in ("--set", item)]
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--forms", args.forms,
                               "--T", str(args.T), *sizes, *settings], env=env,
                              capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        if proc.returncode:
            print(f"{name}: FAILED\n{proc.stderr[-4000:]}", flush=True)
            results.append(dict(op=name, form=args.forms, error=proc.stderr[-4000:],
                                kernels=[], first_fwd_s=None, first_bwd_added_s=None))
            continue
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        for r in rows:
            worst = max((k["shared"] for k in r["kernels"]), default=0)
            print(f"{name} {r['form']}: first fwd {r['first_fwd_s']} s, bwd added "
                  f"{r['first_bwd_added_s']} s, {len(r['kernels'])} kernels, largest shared "
                  f"{worst / 1024:.0f} KiB", flush=True)
        results += rows
    table = _table([r for r in results if "error" not in r])
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "preflight.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "preflight.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
