"""Triton kernels for the memory-bound work around the TTT op and around attention in a layer, forward
and backward.

`inner_inputs(qkv, cos, sin, ln_weight, ln_bias, num_heads, reverse)` and `merge_heads(o, weight, bias,
reverse)` compute what `ttt_video.layers.ttt._inner_inputs` / `_merge_heads` compute, each in one pass
over memory, and are differentiable: one program per (batch x head, token block) reads that head's
q, k, v columns of the projection, normalises, rotates and re-targets them in float32 and writes
them head-major; one program per token block gathers every head of o and layer-norms the row. With
`reverse` the head-major side holds the tokens last to first (a reversed scan's order): the kernels
write and read it at mirrored rows, so no flipped copy of the sequence is made. `norm_rope(x, weight,
bias, cos, sin, eps)` does what `ttt_video.layers.rope.norm_rope` does to attention's q or k: one
program per (batch x head, token block) reads that head's rows of the projection (any strides with
the head dim contiguous), layer-norms and rotates them and writes them with each token's heads together
(`[B, L, H, Dh]` memory: attention gives its output in q's layout, which the output projection then
reads as it is).
`modulated_norm(x, weight, bias, shift, scale, eps)` does what `ttt_video.layers.dit.modulated_norm`
does (adaLN: a LayerNorm, then each batch element's scale and shift), and `gated_residual(x, gate, y)`
what `ttt_video.layers.dit.gated_residual` does (x + gate y, the gate a batch element's or everyone's):
one program per block of rows. Each
backward kernel recomputes its forward from the saved input in the same pass (nothing else is
saved) and writes per-program partial sums of the LayerNorm weight and bias gradients, summed on
the host. Intermediate values are not rounded to the activation dtype between steps as the eager
functions round them, so results agree within that rounding.
"""

import math

import torch
import triton
import triton.language as tl

from .triton import _ln, _ln_bwd


@triton.jit
def _order(rows, L, REV: tl.constexpr):
    """Rows on the head-major side: mirrored for a reversed scan."""
    if REV:
        rows = L - 1 - rows
    return rows


@triton.jit
def _rotated(x, BL: tl.constexpr, DH: tl.constexpr):
    """Adjacent pairs (x0, x1) -> (-x1, x0), in registers."""
    even, odd = tl.split(tl.reshape(x, (BL, DH // 2, 2)))
    return tl.reshape(tl.join(-odd, even), (BL, DH))


@triton.jit
def _unit_rope(x, cos, sin, BL: tl.constexpr, DH: tl.constexpr):
    """RoPE of x / max(|x|, eps); also the unit vector and |x| for the backward."""
    norm = tl.sqrt(tl.sum(x * x, 1, keep_dims=True))
    unit = x / tl.maximum(norm, 1e-12)
    return unit * cos + _rotated(unit, BL, DH) * sin, unit, norm


@triton.jit
def _unit_rope_bwd(g, unit, norm, cos, sin, BL: tl.constexpr, DH: tl.constexpr):
    """Gradient at x from the gradient `g` at `_unit_rope(x)`: RoPE transposed, then the normalisation."""
    gu = g * cos - _rotated(g * sin, BL, DH)
    radial = tl.where(norm > 1e-12, tl.sum(gu * unit, 1, keep_dims=True), 0.0)
    return (gu - unit * radial) / tl.maximum(norm, 1e-12)


@triton.jit
def _head_rows(qkv_ptr, cos_ptr, sin_ptr, b, h, rows, cols, m, L, H, DH: tl.constexpr, BL: tl.constexpr):
    """One head's q, k, v for a block of tokens: rotated unit q and k (with their units and norms), the
    normalised difference v - k and its rstd."""
    D = H * DH
    src = qkv_ptr + (b * L + rows[:, None]) * (3 * D) + h * DH + cols[None, :]
    cos = tl.load(cos_ptr + rows[:, None] * DH + cols[None, :], mask=m, other=0.0)
    sin = tl.load(sin_ptr + rows[:, None] * DH + cols[None, :], mask=m, other=0.0)
    q, qu, qn = _unit_rope(tl.load(src, mask=m, other=0.0).to(tl.float32), cos, sin, BL, DH)
    k, ku, kn = _unit_rope(tl.load(src + D, mask=m, other=0.0).to(tl.float32), cos, sin, BL, DH)
    d, rstd = _ln(tl.load(src + 2 * D, mask=m, other=0.0).to(tl.float32) - k, DH, 1e-6)
    return cos, sin, q, qu, qn, k, ku, kn, d, rstd


@triton.jit
def _head_block(BH, BL: tl.constexpr):
    """A per-head forward program's (batch x head) index and token rows: programs on one grid axis, the BH
    heads fastest (a token block's programs share its RoPE rows in L2), so any length fits the grid."""
    pid = tl.program_id(0).to(tl.int64)
    return pid % BH, pid // BH * BL + tl.arange(0, BL)


@triton.jit
def _inputs_kernel(qkv_ptr, cos_ptr, sin_ptr, lnw_ptr, lnb_ptr, q_ptr, k_ptr, v_ptr, L, H, BH,
                   DH: tl.constexpr, BL: tl.constexpr, REV: tl.constexpr):
    bh, rows = _head_block(BH, BL)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, DH)
    m = (rows < L)[:, None]
    cos, sin, q, qu, qn, k, ku, kn, d, rstd = _head_rows(qkv_ptr, cos_ptr, sin_ptr, b, h, rows, cols, m, L, H,
                                                         DH, BL)
    lnw = tl.load(lnw_ptr + h * DH + cols).to(tl.float32)[None, :]
    lnb = tl.load(lnb_ptr + h * DH + cols).to(tl.float32)[None, :]
    dst = (bh * L + _order(rows, L, REV)[:, None]) * DH + cols[None, :]
    tl.store(q_ptr + dst, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(k_ptr + dst, k.to(k_ptr.dtype.element_ty), mask=m)
    tl.store(v_ptr + dst, (d * lnw + lnb + k).to(v_ptr.dtype.element_ty), mask=m)


@triton.jit
def _inputs_bwd_kernel(qkv_ptr, cos_ptr, sin_ptr, lnw_ptr, gq_ptr, gk_ptr, gv_ptr, gqkv_ptr, dlnw_ptr, dlnb_ptr,
                       L, H, DH: tl.constexpr, BL: tl.constexpr, R: tl.constexpr, REV: tl.constexpr):
    """Program (batch x head, p) takes R token blocks from p R on; writes `[B H, P, DH]` partial sums."""
    bh = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    b = bh // H
    h = bh % H
    D = H * DH
    cols = tl.arange(0, DH)
    lnw = tl.load(lnw_ptr + h * DH + cols).to(tl.float32)[None, :]
    dlnw = tl.zeros([DH], dtype=tl.float32)
    dlnb = tl.zeros([DH], dtype=tl.float32)
    for r in range(0, R):
        rows = (p * R + r) * BL + tl.arange(0, BL)
        m = (rows < L)[:, None]
        cos, sin, q, qu, qn, k, ku, kn, d, rstd = _head_rows(qkv_ptr, cos_ptr, sin_ptr, b, h, rows, cols, m, L, H,
                                                             DH, BL)
        src = (bh * L + _order(rows, L, REV)[:, None]) * DH + cols[None, :]
        gv = tl.load(gv_ptr + src, mask=m, other=0.0).to(tl.float32)
        dlnw += tl.sum(gv * d, 0)
        dlnb += tl.sum(gv, 0)
        gdiff = _ln_bwd(gv * lnw, d, rstd, DH)  # at v - k
        gk = tl.load(gk_ptr + src, mask=m, other=0.0).to(tl.float32) + gv - gdiff
        gq = tl.load(gq_ptr + src, mask=m, other=0.0).to(tl.float32)
        dst = gqkv_ptr + (b * L + rows[:, None]) * (3 * D) + h * DH + cols[None, :]
        ty = gqkv_ptr.dtype.element_ty
        tl.store(dst, _unit_rope_bwd(gq, qu, qn, cos, sin, BL, DH).to(ty), mask=m)
        tl.store(dst + D, _unit_rope_bwd(gk, ku, kn, cos, sin, BL, DH).to(ty), mask=m)
        tl.store(dst + 2 * D, gdiff.to(ty), mask=m)
    part = (bh * tl.num_programs(1) + p) * DH + cols
    tl.store(dlnw_ptr + part, dlnw)
    tl.store(dlnb_ptr + part, dlnb)


@triton.jit
def _ln_rows(x, m, D, eps):
    """LayerNorm of x's rows over their first D columns (m masks the padding, which comes out 0): the
    normalised rows and rstd."""
    xc = tl.where(m, x - tl.sum(x, 1, keep_dims=True) / D, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1, keep_dims=True) / D + eps)
    return xc * rstd, rstd


@triton.jit
def _merged_rows(o_ptr, b, rows, cols, m, L, H, DH: tl.constexpr):
    """Rows of o `[B, H, L, DH]` gathered across heads `[BL, BD]` (zero-padded), normalised; and rstd."""
    D = H * DH
    head = cols // DH
    src = ((b * H + head[None, :]) * L + rows[:, None]) * DH + (cols % DH)[None, :]
    xh, rstd = _ln_rows(tl.load(o_ptr + src, mask=m, other=0.0).to(tl.float32), m, D, 1e-6)
    return xh, rstd, src


@triton.jit
def _merge_kernel(o_ptr, w_ptr, b_ptr, y_ptr, L, H, DH: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
                  REV: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    D = H * DH
    rows = tl.program_id(0) * BL + tl.arange(0, BL)
    cols = tl.arange(0, BD)
    m = (rows < L)[:, None] & (cols < D)[None, :]
    xh, rstd, src = _merged_rows(o_ptr, b, _order(rows, L, REV), cols, m, L, H, DH)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + (b * L + rows[:, None]) * D + cols[None, :], (xh * w + bias).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _merge_bwd_kernel(o_ptr, w_ptr, gy_ptr, go_ptr, dw_ptr, db_ptr, L, H, DH: tl.constexpr, BD: tl.constexpr,
                      BL: tl.constexpr, REV: tl.constexpr):
    """Program (p, batch) takes the token blocks p, p + P, ...; writes `[B P, BD]` partial sums."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    D = H * DH
    cols = tl.arange(0, BD)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BD], dtype=tl.float32)
    db = tl.zeros([BD], dtype=tl.float32)
    for lb in range(p, tl.cdiv(L, BL), P):
        rows = lb * BL + tl.arange(0, BL)
        m = (rows < L)[:, None] & (cols < D)[None, :]
        xh, rstd, src = _merged_rows(o_ptr, b, _order(rows, L, REV), cols, m, L, H, DH)
        gy = tl.load(gy_ptr + (b * L + rows[:, None]) * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dw += tl.sum(gy * xh, 0)
        db += tl.sum(gy, 0)
        gx = _ln_bwd(gy * w, xh, rstd, D)
        tl.store(go_ptr + src, gx.to(go_ptr.dtype.element_ty), mask=m)
    part = (b * P + p) * BD + cols
    tl.store(dw_ptr + part, dw)
    tl.store(db_ptr + part, db)


@triton.jit
def _norm_rope_rows(x_ptr, cos_ptr, sin_ptr, w_ptr, b_ptr, bh, H, rows, cols, m, sb, sh, sl, eps, DH: tl.constexpr,
                    BL: tl.constexpr, ROPE: tl.constexpr):
    """A block of one head's rows of x (strides sb, sh, sl over batch, head and token), layer-normed and
    rotated; also the normalised rows, rstd, the LayerNorm weight, cos and sin."""
    x = tl.load(x_ptr + (bh // H) * sb + (bh % H) * sh + rows[:, None] * sl + cols[None, :], mask=m, other=0.0)
    xh, rstd = _ln(x.to(tl.float32), DH, eps)
    w = tl.load(w_ptr + cols).to(tl.float32)[None, :]
    y = xh * w + tl.load(b_ptr + cols).to(tl.float32)[None, :]
    cos = y  # unread without ROPE
    sin = y
    if ROPE:
        cos = tl.load(cos_ptr + rows[:, None] * DH + cols[None, :], mask=m, other=0.0)
        sin = tl.load(sin_ptr + rows[:, None] * DH + cols[None, :], mask=m, other=0.0)
        y = y * cos + _rotated(y, BL, DH) * sin
    return y, xh, rstd, w, cos, sin


@triton.jit
def _norm_rope_kernel(x_ptr, cos_ptr, sin_ptr, w_ptr, b_ptr, y_ptr, H, L, BH, sb, sh, sl, yb, yh, yl, eps,
                      DH: tl.constexpr, BL: tl.constexpr, ROPE: tl.constexpr):
    """y has strides yb, yh, yl over batch, head and token."""
    bh, rows = _head_block(BH, BL)
    cols = tl.arange(0, DH)
    m = (rows < L)[:, None]
    y, xh, rstd, w, cos, sin = _norm_rope_rows(x_ptr, cos_ptr, sin_ptr, w_ptr, b_ptr, bh, H, rows, cols, m, sb, sh,
                                               sl, eps, DH, BL, ROPE)
    tl.store(y_ptr + (bh // H) * yb + (bh % H) * yh + rows[:, None] * yl + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _norm_rope_bwd_kernel(x_ptr, cos_ptr, sin_ptr, w_ptr, b_ptr, gy_ptr, gx_ptr, dw_ptr, db_ptr, H, L, sb, sh, sl,
                          yb, yh, yl, gb, gh, gl, eps, DH: tl.constexpr, BL: tl.constexpr, R: tl.constexpr,
                          ROPE: tl.constexpr):
    """Program (batch x head, p) takes R token blocks from p R on; gy has strides yb, yh, yl, gx gb, gh, gl;
    writes `[B H, P, DH]` partial sums."""
    bh = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    cols = tl.arange(0, DH)
    dw = tl.zeros([DH], dtype=tl.float32)
    db = tl.zeros([DH], dtype=tl.float32)
    for r in range(0, R):
        rows = (p * R + r) * BL + tl.arange(0, BL)
        m = (rows < L)[:, None]
        y, xh, rstd, w, cos, sin = _norm_rope_rows(x_ptr, cos_ptr, sin_ptr, w_ptr, b_ptr, bh, H, rows, cols, m, sb,
                                                   sh, sl, eps, DH, BL, ROPE)
        g = tl.load(gy_ptr + (bh // H) * yb + (bh % H) * yh + rows[:, None] * yl + cols[None, :], mask=m,
                    other=0.0).to(tl.float32)
        if ROPE:  # RoPE transposed
            g = g * cos - _rotated(g * sin, BL, DH)
        dw += tl.sum(g * xh, 0)
        db += tl.sum(g, 0)
        gx = _ln_bwd(g * w, xh, rstd, DH)
        tl.store(gx_ptr + (bh // H) * gb + (bh % H) * gh + rows[:, None] * gl + cols[None, :],
                 gx.to(gx_ptr.dtype.element_ty), mask=m)
    part = (bh * tl.num_programs(1) + p) * DH + cols
    tl.store(dw_ptr + part, dw)
    tl.store(db_ptr + part, db)


@triton.jit
def _modulated_rows(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, b, rows, cols, m, sb, ss, D, eps,
                    AFFINE: tl.constexpr):
    """Rows of batch element b of x (batch stride sb, rows contiguous) layer-normed over D (zero-padded
    columns), through the LayerNorm's weight and bias where AFFINE; also the normalised rows, rstd, the
    weight (1 without AFFINE) and 1 + scale (scale and shift have batch stride ss)."""
    xh, rstd = _ln_rows(tl.load(x_ptr + b * sb + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32),
                        m, D, eps)
    w = 1.0
    a = xh
    if AFFINE:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        a = xh * w + tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    scale1 = 1.0 + tl.load(scale_ptr + b * ss + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    shift = tl.load(shift_ptr + b * ss + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    return a * scale1 + shift, a, xh, rstd, w, scale1


@triton.jit
def _modulated_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, y_ptr, M, D, sb, ss, eps, BD: tl.constexpr,
                      BL: tl.constexpr, AFFINE: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BL + tl.arange(0, BL)
    cols = tl.arange(0, BD)
    m = (rows < M)[:, None] & (cols < D)[None, :]
    y, a, xh, rstd, w, scale1 = _modulated_rows(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, b, rows, cols, m, sb,
                                                ss, D, eps, AFFINE)
    tl.store(y_ptr + (b * M + rows[:, None]) * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _modulated_bwd_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, gy_ptr, gx_ptr, dw_ptr, db_ptr, dshift_ptr,
                          dscale_ptr, M, D, sb, gsb, ss, eps, BD: tl.constexpr, BL: tl.constexpr,
                          AFFINE: tl.constexpr):
    """Program (p, batch element) takes the row blocks p, p + P, ...; gx has batch stride gsb; writes
    `[B, P, BD]` partial sums for the weight, bias, shift and scale."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BD)
    dw = tl.zeros([BD], dtype=tl.float32)
    db = tl.zeros([BD], dtype=tl.float32)
    dscale = tl.zeros([BD], dtype=tl.float32)
    dshift = tl.zeros([BD], dtype=tl.float32)
    for lb in range(p, tl.cdiv(M, BL), P):
        rows = lb * BL + tl.arange(0, BL)
        m = (rows < M)[:, None] & (cols < D)[None, :]
        y, a, xh, rstd, w, scale1 = _modulated_rows(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, b, rows, cols, m,
                                                    sb, ss, D, eps, AFFINE)
        gy = tl.load(gy_ptr + (b * M + rows[:, None]) * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dshift += tl.sum(gy, 0)
        dscale += tl.sum(gy * a, 0)
        ga = gy * scale1
        dw += tl.sum(ga * xh, 0)
        db += tl.sum(ga, 0)
        tl.store(gx_ptr + b * gsb + rows[:, None] * D + cols[None, :],
                 _ln_bwd(ga * w, xh, rstd, D).to(gx_ptr.dtype.element_ty), mask=m)
    part = (b * P + p) * BD + cols
    tl.store(dw_ptr + part, dw)
    tl.store(db_ptr + part, db)
    tl.store(dshift_ptr + part, dshift)
    tl.store(dscale_ptr + part, dscale)


@triton.jit
def _gated_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, M, D, sx, sy, sg, BD: tl.constexpr, BL: tl.constexpr):
    """Rows of batch element b: x + gate y (x and y with batch strides sx, sy and rows contiguous; the gate's
    batch stride sg, 0 for one gate)."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BL + tl.arange(0, BL)
    cols = tl.arange(0, BD)
    m = (rows < M)[:, None] & (cols < D)[None, :]
    at = rows[:, None] * D + cols[None, :]
    g = tl.load(gate_ptr + b * sg + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    x = tl.load(x_ptr + b * sx + at, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * sy + at, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * M * D + at, (x + g * y).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_bwd_kernel(gate_ptr, y_ptr, gout_ptr, gy_ptr, dg_ptr, M, D, sy, sg, BD: tl.constexpr, BL: tl.constexpr,
                      GATE_GRAD: tl.constexpr):
    """Program (p, batch element) takes the row blocks p, p + P, ...: the gradient at y (contiguous) and, where
    GATE_GRAD, `[B, P, BD]` partial sums of the gate's."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BD)
    g = tl.load(gate_ptr + b * sg + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    dg = tl.zeros([BD], dtype=tl.float32)
    for lb in range(p, tl.cdiv(M, BL), P):
        rows = lb * BL + tl.arange(0, BL)
        m = (rows < M)[:, None] & (cols < D)[None, :]
        at = rows[:, None] * D + cols[None, :]
        go = tl.load(gout_ptr + b * M * D + at, mask=m, other=0.0).to(tl.float32)
        if GATE_GRAD:
            dg += tl.sum(go * tl.load(y_ptr + b * sy + at, mask=m, other=0.0).to(tl.float32), 0)
        tl.store(gy_ptr + b * M * D + at, (go * g).to(gy_ptr.dtype.element_ty), mask=m)
    if GATE_GRAD:
        tl.store(dg_ptr + (b * P + p) * BD + cols, dg)


HEAD_BLOCK = 32  # tokens a program of the per-head kernels takes (q, k, v preparation; q / k norm and RoPE)
HEAD_BWD_BLOCKS = 16  # token blocks per backward program
ROWS_BLOCK = 4  # rows a program of the whole-row kernels takes (head merge, adaLN, gated residual)
ROWS_BWD_PROGRAMS = 512  # their backward programs per batch element


def _rows_of(shape):
    """A `[B, ..., D]` shape as B batch elements of M rows of D, padded to BD (a power of two) in the kernels."""
    B, D = shape[0], shape[-1]
    return B, math.prod(shape[1:]) // D, D, triton.next_power_of_2(D)


def _rows_bwd_programs(M):
    """Programs per batch element of a whole-row backward over M rows."""
    return min(ROWS_BWD_PROGRAMS, triton.cdiv(M, ROWS_BLOCK))


class _InnerInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, ln_weight, ln_bias, num_heads, reverse):
        B, L, D3 = qkv.shape
        DH = D3 // 3 // num_heads
        qkv, cos, sin = qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous()
        q, k, v = (qkv.new_empty(B, num_heads, L, DH) for _ in range(3))
        _inputs_kernel[(B * num_heads * triton.cdiv(L, HEAD_BLOCK), )](
            qkv, cos, sin, ln_weight.contiguous(), ln_bias.contiguous(), q, k, v, L, num_heads, B * num_heads, DH=DH,
            BL=HEAD_BLOCK, REV=reverse, num_warps=4)
        ctx.save_for_backward(qkv, cos, sin, ln_weight)
        ctx.num_heads, ctx.reverse = num_heads, reverse
        return q, k, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        qkv, cos, sin, ln_weight = ctx.saved_tensors
        H = ctx.num_heads
        B, L, D3 = qkv.shape
        DH = D3 // 3 // H
        grads = [torch.zeros(B, H, L, DH, device=qkv.device, dtype=qkv.dtype) if g is None else g.contiguous()
                 for g in (gq, gk, gv)]
        P = triton.cdiv(L, HEAD_BLOCK * HEAD_BWD_BLOCKS)
        gqkv = torch.empty_like(qkv)
        dlnw = qkv.new_empty(B * H, P, DH, dtype=torch.float32)
        dlnb = torch.empty_like(dlnw)
        _inputs_bwd_kernel[(B * H, P)](qkv, cos, sin, ln_weight.contiguous(), *grads, gqkv, dlnw, dlnb, L, H, DH=DH,
                                       BL=HEAD_BLOCK, R=HEAD_BWD_BLOCKS, REV=ctx.reverse, num_warps=8)
        dlnw = dlnw.view(B, H, P, DH).sum((0, 2)).to(ln_weight.dtype)
        dlnb = dlnb.view(B, H, P, DH).sum((0, 2)).to(ln_weight.dtype)
        return gqkv, None, None, dlnw, dlnb, None, None


class _MergeHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, weight, bias, reverse):
        B, H, L, DH = o.shape
        o = o.contiguous()
        y = o.new_empty(B, L, H * DH)
        BD = triton.next_power_of_2(H * DH)
        _merge_kernel[(triton.cdiv(L, ROWS_BLOCK), B)](o, weight.contiguous(), bias.contiguous(), y, L, H, DH=DH,
                                                       BD=BD, BL=ROWS_BLOCK, REV=reverse, num_warps=8)
        ctx.save_for_backward(o, weight)
        ctx.reverse = reverse
        return y

    @staticmethod
    def backward(ctx, gy):
        o, weight = ctx.saved_tensors
        B, H, L, DH = o.shape
        D, BD = H * DH, triton.next_power_of_2(H * DH)
        P = _rows_bwd_programs(L)
        go = torch.empty_like(o)
        dw = o.new_empty(B * P, BD, dtype=torch.float32)
        db = torch.empty_like(dw)
        _merge_bwd_kernel[(P, B)](o, weight.contiguous(), gy.contiguous(), go, dw, db, L, H, DH=DH, BD=BD,
                                  BL=ROWS_BLOCK, REV=ctx.reverse, num_warps=8)
        return go, dw[:, :D].sum(0).to(weight.dtype), db[:, :D].sum(0).to(weight.dtype), None


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cos, sin, eps):
        B, H, L, DH = x.shape
        if x.stride(3) != 1:
            x = x.contiguous()
        rope = cos is not None
        cos, sin = (cos.float().contiguous(), sin.float().contiguous()) if rope else (weight, bias)  # unread without
        weight, bias = weight.contiguous(), bias.contiguous()
        # each token's heads together: attention gives its output in q's layout, which the output projection
        # then reads as it is
        y = x.new_empty(B, L, H, DH).transpose(1, 2)
        _norm_rope_kernel[(B * H * triton.cdiv(L, HEAD_BLOCK), )](
            x, cos, sin, weight, bias, y, H, L, B * H, *x.stride()[:3], *y.stride()[:3], eps, DH=DH, BL=HEAD_BLOCK,
            ROPE=rope, num_warps=4)
        ctx.save_for_backward(x, weight, bias, cos, sin)
        ctx.rope, ctx.eps = rope, eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, cos, sin = ctx.saved_tensors
        B, H, L, DH = x.shape
        P = triton.cdiv(L, HEAD_BLOCK * HEAD_BWD_BLOCKS)
        gx = torch.empty_like(x)  # x's strides where x is dense (a view of the projection), else contiguous
        dw = x.new_empty(B * H, P, DH, dtype=torch.float32)
        db = torch.empty_like(dw)
        if gy.stride(3) != 1:
            gy = gy.contiguous()
        _norm_rope_bwd_kernel[(B * H, P)](x, cos, sin, weight, bias, gy, gx, dw, db, H, L, *x.stride()[:3],
                                          *gy.stride()[:3], *gx.stride()[:3], ctx.eps, DH=DH, BL=HEAD_BLOCK,
                                          R=HEAD_BWD_BLOCKS, ROPE=ctx.rope, num_warps=4)
        return gx, dw.sum((0, 1)).to(weight.dtype), db.sum((0, 1)).to(bias.dtype), None, None, None


def _rows_in_order(t):
    """t, or a copy of it, whose batch elements each hold their rows one after another."""
    return t if t[0].stride() == t[0].contiguous().stride() else t.contiguous()


class _ModulatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, eps):
        B, M, D, BD = _rows_of(x.shape)
        x = _rows_in_order(x)
        ctx.shift_shape = shift.shape
        shift, scale = shift.reshape(B, D), scale.reshape(B, D)
        if shift.stride() != scale.stride() or shift.stride(1) != 1:
            shift, scale = shift.contiguous(), scale.contiguous()
        affine = weight is not None
        weight, bias = (weight.contiguous(), bias.contiguous()) if affine else (shift, shift)  # unread without
        y = x.new_empty(x.shape)
        _modulated_kernel[(triton.cdiv(M, ROWS_BLOCK), B)](x, weight, bias, shift, scale, y, M, D, x.stride(0),
                                                           shift.stride(0), eps, BD=BD, BL=ROWS_BLOCK, AFFINE=affine,
                                                           num_warps=8)
        ctx.save_for_backward(x, weight, bias, shift, scale)
        ctx.affine, ctx.eps = affine, eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, shift, scale = ctx.saved_tensors
        B, M, D, BD = _rows_of(x.shape)
        P = _rows_bwd_programs(M)
        gx = torch.empty_like(x)  # x's strides where x is dense, else contiguous
        parts = x.new_empty(4, B * P, BD, dtype=torch.float32)
        _modulated_bwd_kernel[(P, B)](x, weight, bias, shift, scale, gy.contiguous(), gx, *parts, M, D, x.stride(0),
                                      gx.stride(0), shift.stride(0), ctx.eps, BD=BD, BL=ROWS_BLOCK,
                                      AFFINE=ctx.affine, num_warps=8)
        dw, db, dshift, dscale = parts[..., :D].reshape(4, B, P, D).sum(2)
        grads = [dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)] if ctx.affine else [None, None]
        shape = ctx.shift_shape
        return gx, *grads, dshift.view(shape).to(shift.dtype), dscale.view(shape).to(scale.dtype), None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        B, M, D, BD = _rows_of(x.shape)
        x, y = _rows_in_order(x), _rows_in_order(y)
        ctx.gate_shape = gate.shape
        g = gate.reshape(-1, D)  # [B, D], or [1, D] for one gate
        g = g if g.stride(1) == 1 else g.contiguous()
        out = x.new_empty(x.shape)
        _gated_kernel[(triton.cdiv(M, ROWS_BLOCK), B)](x, g, y, out, M, D, x.stride(0), y.stride(0),
                                                       g.stride(0) if g.shape[0] > 1 else 0, BD=BD, BL=ROWS_BLOCK,
                                                       num_warps=4)
        ctx.gate_grad, ctx.y_dtype = ctx.needs_input_grad[1], y.dtype
        ctx.save_for_backward(g, y if ctx.gate_grad else None)  # y only for the gate's gradient, as eager `*`
        return out

    @staticmethod
    def backward(ctx, gout):
        g, y = ctx.saved_tensors
        B, M, D, BD = _rows_of(gout.shape)  # y's shape, as the output's
        P = _rows_bwd_programs(M)
        gout = gout.contiguous()
        gy = gout.new_empty(gout.shape, dtype=ctx.y_dtype)
        dg = gout.new_empty(B * P, BD, dtype=torch.float32)
        _gated_bwd_kernel[(P, B)](g, gout if y is None else y, gout, gy, dg, M, D, 0 if y is None else y.stride(0),
                                  g.stride(0) if g.shape[0] > 1 else 0, BD=BD, BL=ROWS_BLOCK, GATE_GRAD=ctx.gate_grad,
                                  num_warps=4)
        if not ctx.gate_grad:
            return gout, None, gy
        dg = dg[:, :D].reshape(B, P, D).sum(1)
        dg = dg if g.shape[0] > 1 else dg.sum(0)
        return gout, dg.reshape(ctx.gate_shape).to(g.dtype), gy


def inner_inputs(qkv, cos, sin, ln_weight, ln_bias, num_heads, reverse=False):
    """qkv `[B, L, 3 D]` -> q, k, v `[B, H, L, Dh]` in qkv's dtype (see `layers.ttt._inner_inputs`)."""
    return _InnerInputs.apply(qkv, cos, sin, ln_weight, ln_bias, num_heads, bool(reverse))


def merge_heads(o, weight, bias, reverse=False):
    """o `[B, H, L, Dh]` -> layer-normed `[B, L, H * Dh]` (see `layers.ttt._merge_heads`)."""
    return _MergeHeads.apply(o, weight, bias, bool(reverse))


def norm_rope(x, weight, bias, cos=None, sin=None, eps=1e-6):
    """x `[B, H, L, Dh]` -> layer-normed and rotated `[B, H, L, Dh]` in x's dtype (see `layers.rope.norm_rope`)."""
    return _NormRope.apply(x, weight, bias, cos, sin, eps)


def modulated_norm(x, weight, bias, shift, scale, eps=1e-5):
    """x `[B, ..., D]` -> adaLN `[B, ..., D]` in x's dtype (see `layers.dit.modulated_norm`)."""
    return _ModulatedNorm.apply(x, weight, bias, shift, scale, eps)


def gated_residual(x, gate, y):
    """x, y `[B, ..., D]`, gate `[B, 1, ..., D]` or `[D]` -> x + gate y in x's dtype (see
    `layers.dit.gated_residual`)."""
    return _GatedResidual.apply(x, gate, y)
