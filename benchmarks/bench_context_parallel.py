"""Context parallelism over several GPUs: one long sequence split across G ranks (NCCL).

Usage (a machine with several GPUs):
    python benchmarks/bench_context_parallel.py --out DIR --gpus 2,4 \
        --lengths 131072,262144,524288,1048576 --ops gated_deltanet,gla
Smoke run on CPU (gloo, Triton's interpreter): --device cpu --gpus 2 --lengths 256 --heads 2
--dim 16 --iters 1.

For every op, world size G and length T (B = 1, H = 16, K = V = 128, bf16 by default) each
rank holds a contiguous shard of T / G tokens and runs forward + backward through
``attn(..., cp_group=group)``; one process with the whole sequence on one device is the
baseline (G = 1), and where it fits (``--check-max``) the shards' outputs and gradients are
compared with it at bf16 tolerance. Writes DIR/context_parallel.json and .md: tokens per
second (T / median step time), peak memory per device, and the share of a step's device
time spent in communication kernels (NCCL, from the torch profiler on rank 0). NVLink
multicast stays off (NCCL_NVLS_ENABLE=0), as the device notes ask.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FORM = {"gla": "chunk", "gated_deltanet": "recurrent"}  # no chunked delta backward yet


def make_inputs(name: str, T: int, H: int, D: int, device, dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device)
    x = {"q": rnd(1, T, H, D), "k": rnd(1, T, H, D), "v": rnd(1, T, H, D)}
    if name == "gla":
        x["g"] = torch.nn.functional.logsigmoid(rnd(1, T, H, D)) / 16
    if name == "gated_deltanet":
        x["g"] = torch.nn.functional.logsigmoid(rnd(1, T, H)) / 16
        x["beta"] = torch.sigmoid(rnd(1, T, H))
    return {k: (v.to(dtype) if k in ("q", "k", "v") else v.float()) for k, v in x.items()}


def problems(args, device):
    """Every (op, its form, compiled spec, T, inputs, output gradient) of the run, the same
    tensors in every process (seeded on the CPU)."""
    import linforge
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for name in args.ops.split(","):
        attn = linforge.library.get(name)
        for T in map(int, args.lengths.split(",")):
            x = make_inputs(name, T, args.heads, args.dim, device, dtype)
            do = torch.randn(1, T, args.heads, args.dim, generator=torch.Generator()
                             .manual_seed(1)).to(device, dtype)
            yield name, FORM.get(name, "chunk"), attn, T, x, do


def step(attn, x: dict, do: torch.Tensor, form: str, group=None):
    """Forward + backward; returns o and the inputs' gradients."""
    xs = {k: v.detach().requires_grad_() for k, v in x.items()}
    o, _ = attn(**xs, form=form, cp_group=group)
    o.backward(do)
    return o.detach(), {k: v.grad for k, v in xs.items()}


def timed(fn, iters: int, device) -> list[float]:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def comm_share(fn, device) -> float | None:
    """Share of one call's device time in communication kernels (NCCL); None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = comm = 0.0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0) or 0
        total += t
        if "nccl" in e.key.lower():
            comm += t
    return comm / total if total else None


def worker(rank: int, world: int, store: str, args, out: str) -> None:
    import faulthandler
    import sys
    faulthandler.dump_traceback_later(float(os.environ.get("CP_DEBUG_S", "1e9")), exit=True,
                                      file=sys.stderr)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{store}", rank=rank, world_size=world)
    rows = []
    for name, form, attn, T, x, do in problems(args, device):
        lo, hi = rank * T // world, (rank + 1) * T // world
        local = {k: v[:, lo:hi].contiguous() for k, v in x.items()}
        row = {"op": name, "form": form, "T": T, "gpus": world}
        try:
            run = lambda: step(attn, local, do[:, lo:hi], form, dist.group.WORLD)  # noqa
            run()                                    # compile, warm up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = timed(run, args.iters, device)
            row["step_s"] = statistics.median(times)
            row["tokens_per_s"] = T / row["step_s"]
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            row["comm_share"] = comm_share(run, device)
            if T <= args.check_max:
                o, g = run()            # every rank: the collectives need them all
            if T <= args.check_max and rank == 0:
                o_ref, g_ref = step(attn, x, do, form)   # the whole sequence on rank 0
                row["max_rel_err_o"] = ((o.float() - o_ref[:, lo:hi].float()).abs().max()
                                        / o_ref.float().abs().max()).item()
                row["max_rel_err_grad"] = max(
                    ((g[k].float() - g_ref[k][:, lo:hi].float()).abs().max()
                     / g_ref[k].float().abs().max()).item() for k in g)
        except Exception as e:       # a length that does not fit is recorded, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        if rank == 0:
            print(json.dumps(row), flush=True)
            rows.append(row)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def single(args) -> list[dict]:
    """The baseline: the whole sequence in one process on one device."""
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    rows = []
    for name, form, attn, T, x, do in problems(args, device):
        row = {"op": name, "form": form, "T": T, "gpus": 1}
        try:
            run = lambda: step(attn, x, do, form)  # noqa: E731
            run()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row["step_s"] = statistics.median(timed(run, args.iters, device))
            row["tokens_per_s"] = T / row["step_s"]
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def report(rows: list[dict], out: str) -> None:
    """DIR/context_parallel.json and .md (and a plot where matplotlib is installed)."""
    meta = {"torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with open(os.path.join(out, "context_parallel.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"Device: {meta['device']}; torch {meta['torch']}.", "",
             "| op | form | T | GPUs | tokens/s | step s | peak GiB per GPU | comm share | "
             "max rel err o / grads vs 1 GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['form']} | {r['T']} | {r['gpus']} | "
                         f"{r['error'][:60]} | | | | |")
            continue
        share = f"{r['comm_share']:.1%}" if r.get("comm_share") is not None else "-"
        err = (f"{r['max_rel_err_o']:.1e} / {r['max_rel_err_grad']:.1e}"
               if "max_rel_err_o" in r else "-")
        lines.append(f"| {r['op']} | {r['form']} | {r['T']} | {r['gpus']} | "
                     f"{r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
                     f"{r.get('peak_gib', float('nan')):.2f} | {share} | {err} |")
    with open(os.path.join(out, "context_parallel.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for op in sorted({r["op"] for r in rows}):
        for g in sorted({r["gpus"] for r in rows}):
            pts = [(r["T"], r["tokens_per_s"]) for r in rows
                   if r["op"] == op and r["gpus"] == g and "tokens_per_s" in r]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=f"{op}, {g} GPU")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the sequence")
    ax.set_ylabel("forward+backward tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "context_parallel.png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="gated_deltanet,gla")
    ap.add_argument("--gpus", default="2,4")
    ap.add_argument("--lengths", default="131072,262144,524288,1048576")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--check-max", type=int, default=262144,
                    help="compare with the whole sequence on rank 0 up to this length")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rows = single(args)
    for world in map(int, args.gpus.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            mp.spawn(worker, args=(world, os.path.join(tmp, "store"), args, out),
                     nprocs=world)
            with open(out) as f:
                rows += json.load(f)
    report(rows, args.out)


if __name__ == "__main__":
    main()
