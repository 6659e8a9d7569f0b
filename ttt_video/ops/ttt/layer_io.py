"""Triton kernels for the memory-bound work around the TTT op in a layer, forward only (inference).

`inner_inputs(qkv, cos, sin, ln_weight, ln_bias, num_heads)` and `merge_heads(o, weight, bias)`
compute what `ttt_video.layers.ttt._inner_inputs` / `_merge_heads` compute, each in one pass over
memory: one program per (batch x head, token block) reads that head's q, k, v columns of the
projection, normalises, rotates and re-targets them in float32 and writes them head-major; one
program per token block gathers every head of o and layer-norms the row. Intermediate values are
not rounded to the activation dtype between steps as the eager functions round them, so results
agree within that rounding.
"""

import triton
import triton.language as tl

from .triton import _ln


@triton.jit
def _rotated(x, BL: tl.constexpr, DH: tl.constexpr):
    """Adjacent pairs (x0, x1) -> (-x1, x0), in registers."""
    even, odd = tl.split(tl.reshape(x, (BL, DH // 2, 2)))
    return tl.reshape(tl.join(-odd, even), (BL, DH))


@triton.jit
def _inputs_kernel(qkv_ptr, cos_ptr, sin_ptr, lnw_ptr, lnb_ptr, q_ptr, k_ptr, v_ptr, L, H,
                   DH: tl.constexpr, BL: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = lb * BL + tl.arange(0, BL)
    cols = tl.arange(0, DH)
    m = (rows < L)[:, None]
    D = H * DH
    src = qkv_ptr + (b * L + rows[:, None]) * (3 * D) + h * DH
    cos = tl.load(cos_ptr + rows[:, None] * DH + cols[None, :], mask=m, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + rows[:, None] * DH + cols[None, :], mask=m, other=0.0).to(tl.float32)

    q = tl.load(src + cols[None, :], mask=m, other=0.0).to(tl.float32)
    qn = 1.0 / tl.maximum(tl.sqrt(tl.sum(q * q, 1, keep_dims=True)), 1e-12)
    q = (q * cos + _rotated(q, BL, DH) * sin) * qn

    k = tl.load(src + D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    kn = 1.0 / tl.maximum(tl.sqrt(tl.sum(k * k, 1, keep_dims=True)), 1e-12)
    k = (k * cos + _rotated(k, BL, DH) * sin) * kn

    d, _ = _ln(tl.load(src + 2 * D + cols[None, :], mask=m, other=0.0).to(tl.float32) - k, DH, 1e-6)
    lnw = tl.load(lnw_ptr + h * DH + cols).to(tl.float32)[None, :]
    lnb = tl.load(lnb_ptr + h * DH + cols).to(tl.float32)[None, :]
    v = d * lnw + lnb + k

    dst = (bh * L + rows[:, None]) * DH + cols[None, :]
    tl.store(q_ptr + dst, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(k_ptr + dst, k.to(k_ptr.dtype.element_ty), mask=m)
    tl.store(v_ptr + dst, v.to(v_ptr.dtype.element_ty), mask=m)


@triton.jit
def _merge_kernel(o_ptr, w_ptr, b_ptr, y_ptr, L, H, DH: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    lb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    D = H * DH
    rows = lb * BL + tl.arange(0, BL)
    cols = tl.arange(0, BD)
    m = (rows < L)[:, None] & (cols < D)[None, :]
    head = cols // DH
    src = o_ptr + ((b * H + head[None, :]) * L + rows[:, None]) * DH + (cols % DH)[None, :]
    x = tl.load(src, mask=m, other=0.0).to(tl.float32)
    mu = tl.sum(x, 1, keep_dims=True) / D
    xc = tl.where(m, x - mu, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1, keep_dims=True) / D + 1e-6)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    y = xc * rstd * w + bias
    tl.store(y_ptr + (b * L + rows[:, None]) * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


def inner_inputs(qkv, cos, sin, ln_weight, ln_bias, num_heads):
    """qkv `[B, L, 3 D]` -> q, k, v `[B, H, L, Dh]` in qkv's dtype (see `layers.ttt._inner_inputs`)."""
    B, L, D3 = qkv.shape
    DH = D3 // 3 // num_heads
    qkv = qkv.contiguous()
    q, k, v = (qkv.new_empty(B, num_heads, L, DH) for _ in range(3))
    BL = 32
    _inputs_kernel[(B * num_heads, triton.cdiv(L, BL))](
        qkv, cos.float().contiguous(), sin.float().contiguous(), ln_weight.contiguous(), ln_bias.contiguous(),
        q, k, v, L, num_heads, DH=DH, BL=BL, num_warps=4)
    return q, k, v


def merge_heads(o, weight, bias):
    """o `[B, H, L, Dh]` -> layer-normed `[B, L, H * Dh]` (see `layers.ttt._merge_heads`)."""
    B, H, L, DH = o.shape
    o = o.contiguous()
    y = o.new_empty(B, L, H * DH)
    BL = 4
    _merge_kernel[(triton.cdiv(L, BL), B)](o, weight.contiguous(), bias.contiguous(), y, L, H, DH=DH,
                                          BD=triton.next_power_of_2(H * DH), BL=BL, num_warps=8)
    return y
