"""Context parallelism: shards of one sequence on 2 and 4 gloo ranks (and shard after shard
in one process) give the single-process outputs, final states and every gradient."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spec_inputs import kernel_sizes, make_inputs, make_state

import linforge
from linforge.context_parallel import run_sharded

TESTS = os.path.dirname(os.path.abspath(__file__))


def _problem(name, T, seed=0):
    attn = linforge.library.get(name)
    x = make_inputs(attn, B=2, T=T, H=2, sizes=kernel_sizes(attn), seed=seed)
    params = {n: x.pop(n) for n in list(x) if n in attn.program.params}
    init = make_state(attn, N=2, H=2, sizes=kernel_sizes(attn), seed=seed + 1)
    return attn, x, params, init


def _weights(o, final, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(o.shape, generator=g).to(o.device),
            {s: torch.randn(final[s].shape, generator=g).to(o.device) for s in sorted(final)})


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _whole(attn, x, params, init, form):
    """Single process, whole sequence: o, final, grads (inputs, params, initial state)."""
    leaves = {n: t.clone().requires_grad_() for n, t in {**x, **params}.items()}
    s0 = {s: t.clone().requires_grad_() for s, t in init.items()}
    o, final = attn(**leaves, initial_state=s0, output_final_state=True, form=form)
    wo, wf = _weights(o, final)
    ((o * wo).sum() + sum((final[s] * wf[s]).sum() for s in final)).backward()
    grads = {n: t.grad for n, t in leaves.items()} | {f"{s}0": t.grad for s, t in s0.items()}
    return o.detach(), {s: f.detach() for s, f in final.items()}, grads, wo, wf


def _worker(rank, world, path, name, cuts, form, out, ref):
    sys.path.insert(0, TESTS)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                            world_size=world)
    attn, x, params, init = _problem(name, cuts[-1])
    o_ref, f_ref, g_ref, wo, wf = torch.load(ref)    # the single-process run, made once
    lo, hi = cuts[rank], cuts[rank + 1]
    local = {n: t[:, lo:hi].clone().requires_grad_() for n, t in x.items()}
    ps = {n: t.clone().requires_grad_() for n, t in params.items()}
    s0 = {s: t.clone().requires_grad_() for s, t in init.items()}
    o, final = attn(**local, **ps, initial_state=s0, output_final_state=True, form=form,
                    cp_group=dist.group.WORLD)
    loss = (o * wo[:, lo:hi]).sum()
    if rank == 0:      # the whole sequence's final state is on every rank: count it once
        loss = loss + sum((final[s] * wf[s]).sum() for s in final)
    loss.backward()
    errors = {"o": _rel(o, o_ref[:, lo:hi])}
    errors.update({f"final {s}": _rel(final[s], f_ref[s]) for s in f_ref})
    errors.update({f"d{n}": _rel(t.grad, g_ref[n][:, lo:hi]) for n, t in local.items()})
    for n, t in [*ps.items(), *((f"{s}0", v) for s, v in s0.items())]:
        g = t.grad.clone()
        dist.all_reduce(g)                 # params and S0: the ranks' parts add up
        errors[f"d{n}"] = _rel(g, g_ref[n])
    torch.save(errors, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    # results are saved; skip interpreter teardown, where a gloo thread now and then aborts
    # the process ("terminate called without an active exception") after the work is done
    os._exit(0)


# every class over gloo: identity (2 ranks), scalar (4), DPLR (2) here; diagonal and delta
# rules with packed sequences over 3 ranks below
@pytest.mark.parametrize("world, name, form", [
    (2, "linear_attention", "chunk"), (4, "retnet", "chunk"), (2, "rwkv7", "recurrent")])
def test_context_parallel_over_gloo_ranks_equals_one_process(world, name, form, tmp_path):
    cuts = {2: [0, 23, 60], 4: [0, 9, 30, 31, 60]}[world]   # unequal shards, one of 1 token
    torch.save(_whole(*_problem(name, cuts[-1]), form), tmp_path / "ref")
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), name, cuts, form,
                            str(tmp_path / "errors"), str(tmp_path / "ref")), nprocs=world)
    for rank in range(world):
        errors = torch.load(f"{tmp_path / 'errors'}.{rank}")
        bad = {k: f"{e:.1e}" for k, e in errors.items() if not e < 1e-4}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("name, form", [("linear_attention", "chunk"), ("mamba2", "chunk"),
                                        ("rwkv6", "chunk"), ("kda", "recurrent")])
def test_shard_after_shard_in_one_process_equals_the_whole_sequence(name, form):
    """Three unequal shards; KDA (K = 12 > V = 10) summarised by a K x K matrix from runs of
    identity columns (RWKV-7's diagonal plus low rank: over gloo ranks above)."""
    # the kernels run in the interpreter: short sequences keep CI fast (the chunked shards
    # still hold partial chunks and chunks that cross shard boundaries of the whole run)
    cuts = [0, 20, 45, 70] if form == "chunk" else [0, 12, 31, 40]
    attn, x, params, init = _problem(name, cuts[-1], seed=3)
    o_ref, f_ref, g_ref, wo, wf = _whole(attn, x, params, init, form)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    ps = {n: t.clone().requires_grad_() for n, t in params.items()}
    s0 = {s: t.clone().requires_grad_() for s, t in init.items()}
    shards = [{n: t[:, lo:hi] for n, t in leaves.items()} for lo, hi in zip(cuts, cuts[1:])]
    outs, final = run_sharded(attn, shards, ps, initial_state=s0, output_final_state=True,
                              form=form)
    o = torch.cat(outs, 1)
    ((o * wo).sum() + sum((final[s] * wf[s]).sum() for s in final)).backward()
    assert _rel(o, o_ref) < 1e-4
    for s in f_ref:
        assert _rel(final[s], f_ref[s]) < 1e-4, s
    for n, t in [*leaves.items(), *ps.items(), *((f"{s}0", v) for s, v in s0.items())]:
        assert _rel(t.grad, g_ref[n]) < 1e-4, n


def test_unsupported_transitions_say_so():
    attn, x, params, init = _problem("mamba", 8)
    with pytest.raises(NotImplementedError, match="full elementwise decay transitions.*not "
                                                  "generated yet"):
        run_sharded(attn, [x], params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gla", "retnet", "linear_attention", "mamba2", "rwkv6"])
def test_two_shards_of_16k_tokens_on_the_gpu_equal_the_whole_sequence(name):
    """The GPU kernels' part of the algorithm: T = 16384 in two unequal shards, one after the
    other in one process, against the whole sequence in one chunked call (fp32): outputs, the
    final state and the gradients of every input, param and the initial state."""
    attn = linforge.library.get(name)
    sizes = dict(kernel_sizes(attn), K=64, V=64)
    x = make_inputs(attn, B=1, T=16384, H=2, sizes=sizes, seed=7, device="cuda")
    params = {n: x.pop(n) for n in list(x) if n in attn.program.params}
    init = make_state(attn, N=1, H=2, sizes=sizes, seed=8, device="cuda")
    o_ref, f_ref, g_ref, wo, wf = _whole(attn, x, params, init, "chunk")
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    ps = {n: t.clone().requires_grad_() for n, t in params.items()}
    s0 = {s: t.clone().requires_grad_() for s, t in init.items()}
    shards = [{n: t[:, :7000] for n, t in leaves.items()},
              {n: t[:, 7000:] for n, t in leaves.items()}]
    outs, final = run_sharded(attn, shards, ps, initial_state=s0, output_final_state=True,
                              form="chunk")
    o = torch.cat(outs, 1)
    ((o * wo).sum() + sum((final[s] * wf[s]).sum() for s in final)).backward()
    assert _rel(o, o_ref) < 1e-4
    for s in f_ref:
        assert _rel(final[s], f_ref[s]) < 1e-4, s
    for n, t in [*leaves.items(), *ps.items(), *((f"{s}0", v) for s, v in s0.items())]:
        assert _rel(t.grad, g_ref[n]) < 1e-4, n


def _packed_problem(name, T, n_seqs):
    attn = linforge.library.get(name)
    sizes = kernel_sizes(attn)
    x = make_inputs(attn, B=1, T=T, H=2, sizes=sizes, seed=9)
    params = {n: x.pop(n) for n in list(x) if n in attn.program.params}
    return attn, x, params, make_state(attn, N=n_seqs, H=2, sizes=sizes, seed=10)


def _packed_whole(name, T, cu, form):
    """The packed batch in one process: o, final states, every gradient, the loss weights."""
    attn, x, params, init = _packed_problem(name, T, len(cu) - 1)
    leaves = {n: t.clone().requires_grad_() for n, t in {**x, **params}.items()}
    s0 = {s: t.clone().requires_grad_() for s, t in init.items()}
    o_ref, f_ref = attn(**leaves, initial_state=s0, output_final_state=True, form=form,
                        cu_seqlens=torch.tensor(cu))
    wo, wf = _weights(o_ref, f_ref)
    ((o_ref * wo).sum() + sum((f_ref[s] * wf[s]).sum() for s in f_ref)).backward()
    g_ref = {n: t.grad for n, t in leaves.items()} | {f"{s}0": t.grad for s, t in s0.items()}
    return o_ref.detach(), {s: f.detach() for s, f in f_ref.items()}, g_ref, wo, wf


def _packed_worker(rank, world, path, name, cuts, cu, form, out, ref):
    sys.path.insert(0, TESTS)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                            world_size=world)
    attn, x, params, init = _packed_problem(name, cuts[-1], len(cu) - 1)
    cu_t = torch.tensor(cu)
    o_ref, f_ref, g_ref, wo, wf = torch.load(ref)    # the single-process run, made once
    lo, hi = cuts[rank], cuts[rank + 1]
    local = {n: t[:, lo:hi].clone().requires_grad_() for n, t in x.items()}
    ps = {n: t.clone().requires_grad_() for n, t in params.items()}
    s0 = {s: t.clone().requires_grad_() for s, t in init.items()}
    o, final = attn(**local, **ps, initial_state=s0, output_final_state=True, form=form,
                    cu_seqlens=cu_t, cp_group=dist.group.WORLD)
    loss = (o * wo[:, lo:hi]).sum()
    if rank == 0:
        loss = loss + sum((final[s] * wf[s]).sum() for s in final)
    loss.backward()
    errors = {"o": _rel(o, o_ref[:, lo:hi])}
    errors.update({f"final {s}": _rel(final[s], f_ref[s]) for s in f_ref})
    errors.update({f"d{n}": _rel(t.grad, g_ref[n][:, lo:hi]) for n, t in local.items()})
    for n, t in [*ps.items(), *((f"{s}0", v) for s, v in s0.items())]:
        g = t.grad.clone()
        dist.all_reduce(g)
        errors[f"d{n}"] = _rel(g, g_ref[n])
    torch.save(errors, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("name, form", [("gla", "chunk"), ("gated_deltanet", "recurrent")])
def test_packed_sequences_crossing_shards_over_three_ranks(name, form, tmp_path):
    """Sequences [0, 5), [5, 50) (from rank 0 through all of rank 1 into rank 2), [50, 52),
    [52, 70): per-sequence initial and final states, every gradient."""
    cuts, cu = [0, 10, 30, 70], [0, 5, 50, 52, 70]
    torch.save(_packed_whole(name, cuts[-1], cu, form), tmp_path / "ref")
    mp.spawn(_packed_worker, args=(3, str(tmp_path / "store"), name, cuts, cu, form,
                                   str(tmp_path / "errors"), str(tmp_path / "ref")), nprocs=3)
    for rank in range(3):
        errors = torch.load(f"{tmp_path / 'errors'}.{rank}")
        bad = {k: f"{e:.1e}" for k, e in errors.items() if not e < 1e-4}
        assert not bad, f"rank {rank}: {bad}"
