"""A kernel that writes the TTT-MLP kernels' GELU parts, for the test that checks them. Imported
only inside that test, once the interpreter question is settled (see test_ttt_triton.py)."""

import triton
import triton.language as tl

from ttt_video.ops.ttt.triton import _gelu_parts


@triton.jit
def gelu_parts_kernel(z_ptr, out_ptr, N: tl.constexpr, FAST: tl.constexpr):
    i = tl.arange(0, N)
    g0, g1, g2 = _gelu_parts(tl.load(z_ptr + i), FAST)
    tl.store(out_ptr + i, g0)
    tl.store(out_ptr + N + i, g1)
    tl.store(out_ptr + 2 * N + i, g2)
