"""Launching generated kernels: errors a user can act on."""

import pytest


def test_a_kernel_over_the_gpus_shared_memory_gets_a_clear_error():
    """Triton's OutOfResources (a kernel asking more shared memory than the GPU has, e.g.
    the RWKV-7 backward at 32 V lanes on Triton 3.6: 248 KB against an H200's 227 KB)
    becomes an error naming the kernel, the amounts, its tiles and the knob to turn."""
    from triton.runtime.errors import OutOfResources

    from linforge.codegen.launch import Launcher

    class TooBig:
        __name__ = "low_rank_pair_grads_kernel"
        arg_names = ["x"]

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(253952, 232448, "shared memory")
            return launch

    with pytest.raises(RuntimeError, match=r"'low_rank_pair_grads_kernel' needs 253952 shared "
                                           r"memory per block and this GPU allows 232448 "
                                           r"\(its tiles: BK=128, BV=32\).*FORCE_BLOCK_V"):
        Launcher(TooBig())((1,), 0, BK=128, BV=32, DOT=1)


def test_launch_options_set_tiles_within_the_dim_and_the_tile_count_follows(monkeypatch):
    """A kernel's GPU launch options (``KERNEL_OPTIONS``) may narrow or widen its V tile,
    never past the dim's power of two, and the tile count (which the grid reads) follows;
    interpreted launches (no ``num_warps``) keep the call's tiles."""
    import linforge.codegen.chunk_op as chunk_op

    blocks = dict(V=100, BV=32, NV=4, num_warps=8)
    monkeypatch.setitem(chunk_op.KERNEL_OPTIONS, "delta_states", {"BV": 64, "num_warps": 4})
    assert chunk_op._for("delta_states", blocks) == dict(V=100, BV=64, NV=2, num_warps=4)
    monkeypatch.setitem(chunk_op.KERNEL_OPTIONS, "delta_states", {"BV": 256})
    assert chunk_op._for("delta_states", blocks)["BV"] == 128
    assert chunk_op._for("delta_states", blocks)["NV"] == 1
    monkeypatch.setitem(chunk_op.KERNEL_OPTIONS, "delta_states", {"BV": 16})
    assert chunk_op._for("delta_states", blocks)["NV"] == 7
    cpu = dict(V=100, BV=128, NV=1)
    assert chunk_op._for("delta_states", cpu) == cpu


def test_launch_options_for_fp32_operands_apply_to_non_bf16_dots_only():
    """The delta rule's ordered kernels run 4 warps with bf16 dot operands and 8 with fp32
    ones (``fp32_operands``: tf32, tf32x3 or ieee), which would spill at 4."""
    import linforge.codegen.chunk_op as chunk_op
    from linforge.codegen.chunk import DOT_BF16, DOT_IEEE, DOT_TF32, DOT_TF32X3

    for kernel in ("delta_states", "delta_dstates"):
        blocks = dict(V=128, BV=32, NV=4, num_warps=4)
        assert chunk_op._for(kernel, dict(blocks, DOT=DOT_BF16))["num_warps"] == 4
        for dot in (DOT_TF32, DOT_IEEE, DOT_TF32X3):
            out = chunk_op._for(kernel, dict(blocks, DOT=dot))
            assert out["num_warps"] == 8 and "fp32_operands" not in out


@pytest.mark.parametrize("K, expected", [
    (128, dict(DOT=0, num_warps=4, PREDECAYED=True)),
    (256, dict(DOT=1, num_warps=8, PREDECAYED=False))])
def test_rwkv7_wide_heads_take_the_ordered_kernels_that_passed_on_the_gpu(K, expected,
                                                                          monkeypatch):
    """RWKV-7's ordered kernels (states, state gradients) at K > 128 take tf32 operands at
    8 warps and the states one stage (``WIDE_LOW_RANK_ORDERED_DOT``): the bf16 ones hit an
    illegal memory access on an H100 at K = V = 256. K = 128 keeps bf16 operands at 4 warps
    on predecayed inputs. The launches as a GPU would make them (the preflight hook: nothing
    runs), bf16 inputs."""
    import torch

    import linforge
    import linforge.codegen.launch as launch
    from spec_inputs import make_inputs, spec_sizes

    seen = []
    monkeypatch.setattr(launch, "PREFLIGHT",
                        lambda fn, grid, args, constexprs: seen.append((fn.__name__, constexprs)))
    attn = linforge.library.get("rwkv7")
    x = make_inputs(attn, B=1, T=64, H=1, sizes=spec_sizes(attn, K=K, V=K), seed=0)
    x = {n: t.to(torch.bfloat16).requires_grad_() for n, t in x.items()}
    attn(**x, form="chunk")[0].float().sum().backward()
    ordered = {n: c for n, c in seen if n in ("chunk_states_kernel", "chunk_dstates_kernel")}
    assert len(ordered) == 2
    for name, constexprs in ordered.items():
        assert {k: constexprs[k] for k in expected} == expected, name
    assert ordered["chunk_states_kernel"]["num_stages"] == (2 if K == 128 else 1)


@pytest.mark.parametrize("name, expected", [("deltanet", dict(BK=64, BV=64)),
                                            ("gated_deltanet", dict(BK=32, BV=64)),
                                            ("kda", dict(BK=32, BV=64))])
def test_delta_gradient_kernel_tiles_follow_the_decay(name, expected, monkeypatch):
    """The delta rule's gradient kernel launches at K 32 / V 64 with decays and at K 64 /
    V 64 without (``delta_grads_no_decay``): the tiles session 14's H100 sweep found
    fastest for each. The launches as a GPU would make them (the preflight hook: nothing
    runs), bf16 inputs at K = V = 128."""
    import torch

    import linforge
    import linforge.codegen.launch as launch
    from spec_inputs import make_inputs, spec_sizes

    seen = []
    monkeypatch.setattr(launch, "PREFLIGHT",
                        lambda fn, grid, args, constexprs: seen.append((fn.__name__, constexprs)))
    attn = linforge.library.get(name)
    x = make_inputs(attn, B=1, T=64, H=1, sizes=spec_sizes(attn, K=128, V=128), seed=0)
    x = {n: t.to(torch.bfloat16).requires_grad_() for n, t in x.items()}
    attn(**x, form="chunk")[0].float().sum().backward()
    grads = [c for n, c in seen if n == "chunk_grads_kernel"]
    assert len(grads) == 1
    assert {k: grads[0][k] for k in expected} == expected
