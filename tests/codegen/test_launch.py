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
