"""Triton TTT-MLP / TTT-Linear: one program per (batch, head) chain, forward and backward kernels.

Layout: q, k, v `[B, H, T, D]`; eta `[B, H, T]`; inside, chains `N = B * H`, tokens `[N, T, D]`
and inner state in float32 `[N, ...]`. Semantics are those of `reference.py`, computed in the
dual form of `torch.py`: with `G` the eta-scaled inner gradient at a mini-batch's pre-activations,
    Z_q = Q W + b - (M * (Q X^T + 1)) G,   W' = W - X^T G,   b' = b - sum(G).
Without the causal mask M that is Z_q = Q W' + b', which TTT-Linear's forward and the 4-warp builds
of TTT-MLP compute instead (the primal form: fewer products; `_mlp_primal`).

Forward walks the mini-batches and stores the inner state at every `checkpoint_group`-th
mini-batch border. Backward walks the groups in reverse: it recomputes the states inside a group
from its checkpoint into a scratch buffer, then runs reverse mode through each mini-batch, newest
first, carrying the adjoint of the state. TTT-Linear keeps its state and the adjoint in registers, and
its backward runs windows of groups on two kernels: one recomputes a window's groups side by side with
each mini-batch's queries' half (what needs no adjoint), the other carries the adjoint (`_linear_backward`);
TTT-MLP keeps them in global memory (per chain, so it stays in L2) and streams the hidden dim in
chunks of `FC` columns of W1 / rows of W2. Where the GPU has room for them all, its forward splits
the hidden dim over several programs per chain, and its backward runs each mini-batch's queries'
half (which needs no adjoint) on a second program per chain, ahead of the one carrying the
adjoint. State, LayerNorm and gelu math are float32; matrix products accumulate in float32 from
bf16-rounded operands for 16-bit inputs (tf32 for float32), and with those the gelu's tanh is the
GPU's approximate instruction; with those the MLP backward also keeps in bf16 the recomputed W1 and W2
(only products' operands) and the largest parts the queries' half leaves the keys' half, and the split
forward's programs exchange their partial sums in bf16. On an H100 some TTT-MLP forward launches run the
Gluon kernel of `hopper.py` instead (`_hopper_forward` says which).
"""

import ctypes
import functools
import types

import torch
import triton
import triton.language as tl

from .. import memo
from .buffers import linear_backward_scratch, mlp_backward_padding, mlp_backward_scratch

MLP_KEYS = ("w1", "b1", "w2", "b2")
LINEAR_KEYS = ("w1", "b1")
HEAD_DIMS = (16, 32, 64, 128)
MINI_BATCH_SIZES = (16, 32, 64, 128)


def supports(q, mlp=True, mini_batch_size=64):
    """True where these kernels run: NVIDIA CUDA (sm80+), float16, bfloat16 or float32 with head dim
    16, 32, 64 or 128 and mini-batch 16, 32, 64 or 128, where the tiles fit (`_over_shared_memory`)."""
    if not q.is_cuda or torch.version.hip or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if mini_batch_size not in MINI_BATCH_SIZES or _over_shared_memory(q, mlp, mini_batch_size):
        return False
    return q.shape[-1] in HEAD_DIMS and torch.cuda.get_device_capability(q.device)[0] >= 8


def _over_shared_memory(q, mlp, mini_batch_size):
    """Cases that compile to more shared memory per program than an H100 or H200 has (232,448 bytes):
    float32 TTT-MLP above head dim 32 (320 KB at 64) and head dim 128 at mini-batch 128 (288 KB for
    TTT-Linear, 320 KB for TTT-MLP). The interpreter has no such limit."""
    if not q.is_cuda:
        return False
    D = q.shape[-1]
    return (mlp and q.dtype == torch.float32 and D > 32) or (D >= 128 and mini_batch_size >= 128)


def _empty_like(x):
    return torch.empty_like(x)


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    """FAST: the GPU's one-instruction approximation (relative error ~2^-11, below the bfloat16
    rounding of the products it feeds)."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x >= 0, t, -t)
    return t


@triton.jit
def _gelu_parts(z, LP: tl.constexpr):
    """gelu (tanh approximation) and its first and second derivatives; LP (bfloat16 products) takes
    the fast tanh."""
    c = 0.7978845608028654
    ca = c * 0.044715
    z2 = z * z
    t = _tanh(z * (c + ca * z2), LP)
    hz = 0.5 * z
    g0 = hz * t + hz
    s = 1.0 - t * t
    du = c + (3.0 * ca) * z2  # d/dz of the tanh argument
    g1 = 0.5 * t + 0.5 + hz * s * du
    g2 = s * (du - (z * t) * (du * du) + (3.0 * ca) * z2)
    return g0, g1, g2


@triton.jit
def _gelu(z, LP: tl.constexpr):
    g0, g1, g2 = _gelu_parts(z, LP)
    return g0


@triton.jit
def _gelu_d(z, LP: tl.constexpr):
    g0, g1, g2 = _gelu_parts(z, LP)
    return g0, g1


@triton.jit
def _ln(z, D: tl.constexpr, eps):
    mu = tl.sum(z, 1, keep_dims=True) / D
    zc = z - mu
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 1, keep_dims=True) / D + eps)
    return zc * rstd, rstd


@triton.jit
def _ln_bwd(dxh, xh, rstd, D):
    """Gradient at the LayerNorm input from the gradient `dxh` at its normalised output; rows of
    length D (zero-padded columns, where `dxh` and `xh` are 0, add nothing)."""
    return rstd * (dxh - tl.sum(dxh, 1, keep_dims=True) / D - xh * (tl.sum(dxh * xh, 1, keep_dims=True) / D))


@triton.jit
def _inner_grad(z, target, lnw, lnb, D: tl.constexpr, eps):
    """Gradient of 0.5 |LN(z) - target|^2 at z (the target is v - k), with the pieces its own backward needs."""
    xh, rstd = _ln(z, D, eps)
    dy = xh * lnw + lnb - target
    dxh = dy * lnw
    return xh, rstd, dy, dxh, _ln_bwd(dxh, xh, rstd, D)


@triton.jit
def _inner_grad_bwd(dgr, xh, rstd, dy, dxh, lnw, D: tl.constexpr):
    """Reverse mode of `_inner_grad`: dz, d(dy) (= dk = -dv) and the LayerNorm weight/bias parts."""
    c2 = tl.sum(dxh * xh, 1, keep_dims=True) / D
    bracket = dxh - tl.sum(dxh, 1, keep_dims=True) / D - xh * c2
    d_rstd = tl.sum(dgr * bracket, 1, keep_dims=True)
    u = rstd * dgr
    m_uxh = tl.sum(u * xh, 1, keep_dims=True) / D
    d_dxh = u - tl.sum(u, 1, keep_dims=True) / D - xh * m_uxh
    d_dy = d_dxh * lnw
    d_xh = d_dy * lnw - u * c2 - dxh * m_uxh
    dz = _ln_bwd(d_xh, xh, rstd, D) - d_rstd * rstd * rstd * xh / D
    return dz, d_dy, tl.sum(d_dxh * dy + d_dy * xh, 0), tl.sum(d_dy, 0)


@triton.jit
def _operand(x, LP: tl.constexpr):
    """x rounded as `_dot` rounds its operands: kept in that form, a float32 copy need not stay live."""
    if LP:
        x = x.to(tl.bfloat16)
    return x


@triton.jit
def _dot(a, b, LP: tl.constexpr):
    """a @ b with float32 accumulation; LP rounds the operands to bfloat16 (else tf32 on GPU)."""
    return tl.dot(_operand(a, LP), _operand(b, LP))


@triton.jit
def _scores(a, b, rows, CAUSAL: tl.constexpr, LP: tl.constexpr):
    """M * (a b^T + 1)."""
    s = _dot(a, tl.trans(b), LP) + 1.0
    if CAUSAL:
        s = tl.where(rows[:, None] >= rows[None, :], s, 0.0)
    return s


@triton.jit
def _load_rows(ptr, t0, T, rows, cols, D: tl.constexpr):
    m = (t0 + rows) < T
    return tl.load(ptr + (t0 + rows)[:, None] * D + cols[None, :], mask=m[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, x, t0, T, rows, cols, D: tl.constexpr):
    m = (t0 + rows) < T
    tl.store(ptr + (t0 + rows)[:, None] * D + cols[None, :], x.to(ptr.dtype.element_ty), mask=m[:, None])


@triton.jit
def _load_eta(ptr, t0, T, rows):
    return tl.load(ptr + t0 + rows, mask=(t0 + rows) < T, other=0.0).to(tl.float32)


@triton.jit
def _linear_step(q, k, v, eta, lnw, lnb, w, b, rows, D: tl.constexpr, CAUSAL: tl.constexpr, LP: tl.constexpr, eps):
    z = _dot(k, w, LP) + b  # [BS, D]
    xh, rstd, dy, dxh, gr = _inner_grad(z, v - k, lnw, lnb, D, eps)
    g = eta[:, None] * gr
    if CAUSAL:  # dual form: row i sees the updates of rows <= i
        zq = _dot(q, w, LP) + b - _dot(_scores(q, k, rows, CAUSAL, LP), g, LP)
    w = w - _dot(tl.trans(k), g, LP)
    b = b - tl.sum(g, 0, keep_dims=True)
    if not CAUSAL:  # every row sees the whole update (v25)
        zq = _dot(q, w, LP) + b
    xhq, rstdq = _ln(zq, D, eps)
    return q + xhq * lnw + lnb, w, b


@triton.jit
def _linear_fwd_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, o_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, cw_ptr, cb_ptr,
                       T, H, NG, eps, D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
                       CAUSAL: tl.constexpr, SAVE: tl.constexpr, LP: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    rows = tl.arange(0, BS)
    cols = tl.arange(0, D)
    wofs = cols[:, None] * D + cols[None, :]
    lnw = tl.load(lnw_ptr + h * D + cols)[None, :]
    lnb = tl.load(lnb_ptr + h * D + cols)[None, :]
    w = tl.load(w_ptr + pid * D * D + wofs)  # [D, D]
    b = tl.load(b_ptr + pid * D + cols)[None, :]  # [1, D]
    q_ptr += pid * T * D
    k_ptr += pid * T * D
    v_ptr += pid * T * D
    o_ptr += pid * T * D
    eta_ptr += pid * T
    for n in range(0, tl.cdiv(T, BS)):
        if SAVE:
            if n % G == 0:
                c = pid * NG + n // G
                tl.store(cw_ptr + c * D * D + wofs, w)
                tl.store(cb_ptr + c * D + cols[None, :], b)
        t0 = n * BS
        q = _load_rows(q_ptr, t0, T, rows, cols, D)
        k = _load_rows(k_ptr, t0, T, rows, cols, D)
        v = _load_rows(v_ptr, t0, T, rows, cols, D)
        eta = _load_eta(eta_ptr, t0, T, rows)
        out, w, b = _linear_step(q, k, v, eta, lnw, lnb, w, b, rows, D, CAUSAL, LP, eps)
        _store_rows(o_ptr, out, t0, T, rows, cols, D)
    tl.store(w_ptr + pid * D * D + wofs, w)
    tl.store(b_ptr + pid * D + cols[None, :], b)


@triton.jit
def _linear_bwd_tiles(lnw_ptr, lnb_ptr, h, D: tl.constexpr, BS: tl.constexpr):
    """A TTT-Linear backward program's row and column indices, the offsets of a `[D, D]` and a `[BS, D]`
    tile, and head h's LayerNorm weight and bias rows."""
    rows = tl.arange(0, BS)
    cols = tl.arange(0, D)
    lnw = tl.load(lnw_ptr + h * D + cols)[None, :]
    lnb = tl.load(lnb_ptr + h * D + cols)[None, :]
    return rows, cols, cols[:, None] * D + cols[None, :], rows[:, None] * D + cols[None, :], lnw, lnb


@triton.jit
def _linear_queries_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, do_ptr, lnw_ptr, lnb_ptr, cw_ptr, cb_ptr, sw_ptr, sb_ptr,
                           dg_ptr, pw_ptr, pb_ptr, dq_ptr, dk_ptr, dlnw_ptr, dlnb_ptr, T, H, NG, g_lo, ng, eps,
                           D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr, CAUSAL: tl.constexpr,
                           LP: tl.constexpr):
    """TTT-Linear backward, the queries' halves of a window of `ng` checkpoint groups from `g_lo` on: program
    (chain, group) steps the group's states from its checkpoint and runs each mini-batch's reverse mode as
    far as it needs no adjoint of the state. It stores dq, dk's part ds^T q (in dk, which the keys' half
    completes) and, for the keys' half, in the window's slots of the chain: the state before the
    mini-batch (sw, sb), dg's part -A1^T dZq (dg), the adjoint's part Q^T dZq and its column sums (pw, pb).
    Its LayerNorm gradients' parts go to row `pid` of dlnw, dlnb."""
    pid = tl.program_id(0).to(tl.int64)
    chain = pid // ng
    grp = g_lo + pid % ng
    h = chain % H
    rows, cols, wofs, rofs, lnw, lnb = _linear_bwd_tiles(lnw_ptr, lnb_ptr, h, D, BS)
    dlnw = tl.zeros([D], dtype=tl.float32)
    dlnb = tl.zeros([D], dtype=tl.float32)
    q_ptr += chain * T * D
    k_ptr += chain * T * D
    v_ptr += chain * T * D
    do_ptr += chain * T * D
    dq_ptr += chain * T * D
    dk_ptr += chain * T * D
    eta_ptr += chain * T
    w = tl.load(cw_ptr + (chain * NG + grp) * D * D + wofs)
    b = tl.load(cb_ptr + (chain * NG + grp) * D + cols[None, :])
    slot = pid * G  # the window's slots of this chain and group, one a mini-batch
    for j in range(0, tl.minimum(G, tl.cdiv(T, BS) - grp * G)):
        t0 = (grp * G + j) * BS
        tl.store(sw_ptr + (slot + j) * D * D + wofs, w)
        tl.store(sb_ptr + (slot + j) * D + cols[None, :], b)
        q = _load_rows(q_ptr, t0, T, rows, cols, D)
        k = _load_rows(k_ptr, t0, T, rows, cols, D)
        v = _load_rows(v_ptr, t0, T, rows, cols, D)
        do = _load_rows(do_ptr, t0, T, rows, cols, D)
        eta = _load_eta(eta_ptr, t0, T, rows)[:, None]
        z = _dot(k, w, LP) + b
        xh, rstd, dy, dxh, gr = _inner_grad(z, v - k, lnw, lnb, D, eps)
        g = eta * gr
        a1 = _scores(q, k, rows, CAUSAL, LP)
        zq = _dot(q, w, LP) + b - _dot(a1, g, LP)
        xhq, rstdq = _ln(zq, D, eps)
        dlnw += tl.sum(do * xhq, 0)
        dlnb += tl.sum(do, 0)
        dzq = _ln_bwd(do * lnw, xhq, rstdq, D)
        ds = -_dot(dzq, tl.trans(g), LP)
        if CAUSAL:
            ds = tl.where(rows[:, None] >= rows[None, :], ds, 0.0)
        _store_rows(dq_ptr, do + _dot(dzq, tl.trans(w), LP) + _dot(ds, k, LP), t0, T, rows, cols, D)
        _store_rows(dk_ptr, _dot(tl.trans(ds), q, LP), t0, T, rows, cols, D)
        tl.store(dg_ptr + (slot + j) * BS * D + rofs, -_dot(tl.trans(a1), dzq, LP))
        tl.store(pw_ptr + (slot + j) * D * D + wofs, _dot(tl.trans(q), dzq, LP))
        tl.store(pb_ptr + (slot + j) * D + cols[None, :], tl.sum(dzq, 0, keep_dims=True))
        w = w - _dot(tl.trans(k), g, LP)
        b = b - tl.sum(g, 0, keep_dims=True)
    tl.store(dlnw_ptr + pid * D + cols, dlnw)
    tl.store(dlnb_ptr + pid * D + cols, dlnb)


@triton.jit
def _linear_keys_kernel(k_ptr, v_ptr, eta_ptr, lnw_ptr, lnb_ptr, sw_ptr, sb_ptr, dg_ptr, pw_ptr, pb_ptr, dw_ptr,
                        db_ptr, dk_ptr, dv_ptr, deta_ptr, dlnw_ptr, dlnb_ptr, T, H, n_lo, n_hi, slots, eps,
                        D: tl.constexpr, BS: tl.constexpr, LP: tl.constexpr):
    """TTT-Linear backward, the keys' halves of mini-batches n_hi - 1 down to n_lo (a window; `slots` a chain
    in its scratch), one program a chain: carries the adjoint of the state (dw, db, in place) back through
    them from what the queries' halves left, completes dk and stores dv and deta; adds its LayerNorm
    gradients' parts to the chain's row of dlnw, dlnb."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    rows, cols, wofs, rofs, lnw, lnb = _linear_bwd_tiles(lnw_ptr, lnb_ptr, h, D, BS)
    dw = tl.load(dw_ptr + pid * D * D + wofs)  # adjoint of the state after mini-batch n_hi - 1
    db = tl.load(db_ptr + pid * D + cols[None, :])
    dlnw = tl.zeros([D], dtype=tl.float32)
    dlnb = tl.zeros([D], dtype=tl.float32)
    k_ptr += pid * T * D
    v_ptr += pid * T * D
    dk_ptr += pid * T * D
    dv_ptr += pid * T * D
    eta_ptr += pid * T
    deta_ptr += pid * T
    for jj in range(0, n_hi - n_lo):
        j = n_hi - n_lo - 1 - jj
        slot = pid * slots + j
        t0 = (n_lo + j) * BS
        w = tl.load(sw_ptr + slot * D * D + wofs)
        b = tl.load(sb_ptr + slot * D + cols[None, :])
        k = _load_rows(k_ptr, t0, T, rows, cols, D)
        v = _load_rows(v_ptr, t0, T, rows, cols, D)
        eta = _load_eta(eta_ptr, t0, T, rows)[:, None]
        xh, rstd, dy, dxh, gr = _inner_grad(_dot(k, w, LP) + b, v - k, lnw, lnb, D, eps)
        dk = _load_rows(dk_ptr, t0, T, rows, cols, D) - _dot(eta * gr, tl.trans(dw), LP)
        dg = tl.load(dg_ptr + slot * BS * D + rofs) - _dot(k, dw, LP) - db
        dz, d_dy, dlnw2, dlnb2 = _inner_grad_bwd(eta * dg, xh, rstd, dy, dxh, lnw, D)
        dlnw += dlnw2
        dlnb += dlnb2
        dw += tl.load(pw_ptr + slot * D * D + wofs) + _dot(tl.trans(k), dz, LP)
        db += tl.load(pb_ptr + slot * D + cols[None, :]) + tl.sum(dz, 0, keep_dims=True)
        _store_rows(dk_ptr, dk + d_dy + _dot(dz, tl.trans(w), LP), t0, T, rows, cols, D)
        _store_rows(dv_ptr, -d_dy, t0, T, rows, cols, D)
        tl.store(deta_ptr + t0 + rows, tl.sum(dg * gr, 1), mask=(t0 + rows) < T)
    tl.store(dw_ptr + pid * D * D + wofs, dw)
    tl.store(db_ptr + pid * D + cols[None, :], db)
    tl.store(dlnw_ptr + pid * D + cols, tl.load(dlnw_ptr + pid * D + cols) + dlnw)
    tl.store(dlnb_ptr + pid * D + cols, tl.load(dlnb_ptr + pid * D + cols) + dlnb)


@triton.jit
def _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D: tl.constexpr, F: tl.constexpr, CM: tl.constexpr):
    """Columns c:c+FC of W1 `[D, FC]` and b1 `[1, FC]`, rows c:c+FC of W2 `[FC, D]`; CM is the loads'
    cache modifier (".cg", past L1, for what another program wrote)."""
    w1 = tl.load(w1_ptr + cols[:, None] * F + (c + fcols)[None, :], cache_modifier=CM)
    b1 = tl.load(b1_ptr + c + fcols, cache_modifier=CM)[None, :]
    w2 = tl.load(w2_ptr + (c + fcols)[:, None] * D + cols[None, :], cache_modifier=CM)
    return w1, b1, w2


@triton.jit
def _mlp_store_chunk(w1_ptr, b1_ptr, w2_ptr, c, w1, b1, w2, cols, fcols, D: tl.constexpr, F: tl.constexpr):
    tl.store(w1_ptr + cols[:, None] * F + (c + fcols)[None, :], w1)
    tl.store(b1_ptr + c + fcols[None, :], b1)
    tl.store(w2_ptr + (c + fcols)[:, None] * D + cols[None, :], w2)


@triton.jit
def _mlp_chunk_w2t(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D: tl.constexpr, F: tl.constexpr):
    """`_mlp_chunk` with W2's rows as the columns of a `[D, FC]` tile, the form the split forward's
    products take best (v30). Written apart from `_mlp_chunk`: folding both into one function moved the
    MLP backward's compiled code and its register spills (NOTES.md, v30)."""
    w1 = tl.load(w1_ptr + cols[:, None] * F + (c + fcols)[None, :])
    b1 = tl.load(b1_ptr + c + fcols)[None, :]
    return w1, b1, tl.load(w2_ptr + (c + fcols)[None, :] * D + cols[:, None])


@triton.jit
def _mlp_store_chunk_w2t(w1_ptr, b1_ptr, w2_ptr, c, w1, b1, w2t, cols, fcols, D: tl.constexpr, F: tl.constexpr):
    tl.store(w1_ptr + cols[:, None] * F + (c + fcols)[None, :], w1)
    tl.store(b1_ptr + c + fcols[None, :], b1)
    tl.store(w2_ptr + (c + fcols)[None, :] * D + cols[:, None], w2t)


@triton.jit
def _mlp_copy(w1_ptr, b1_ptr, w2_ptr, b2_ptr, aw1_ptr, ab1_ptr, aw2_ptr, ab2_ptr, bw1_ptr, bb1_ptr, bw2_ptr, bb2_ptr,
              cols, D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr):
    """The state at w*_ptr and b2_ptr copied to a*_ptr and b*_ptr (each store casts to its buffer's
    dtype), loaded once."""
    fcols = tl.arange(0, FC)
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, "")
        _mlp_store_chunk(aw1_ptr, ab1_ptr, aw2_ptr, c, w1, b1, w2, cols, fcols, D, F)
        _mlp_store_chunk(bw1_ptr, bb1_ptr, bw2_ptr, c, w1, b1, w2, cols, fcols, D, F)
    b2 = tl.load(b2_ptr + cols)
    tl.store(ab2_ptr + cols, b2)
    tl.store(bb2_ptr + cols, b2)


@triton.jit
def _mlp_step(k, v, eta, lnw, lnb, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ow1_ptr, ob1_ptr, ow2_ptr, ob2_ptr, cols,
              D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, BS: tl.constexpr, LP: tl.constexpr, eps):
    """The state after one mini-batch, updated in place at w*_ptr (float32) and copied to ow*_ptr (whose
    W1 and W2 may be bfloat16): the update needs only the keys' path (the queries' output is not formed)."""
    fcols = tl.arange(0, FC)
    target = v - k
    k = _operand(k, LP)
    b2 = tl.load(b2_ptr + cols)[None, :]
    z2 = tl.zeros([BS, D], dtype=tl.float32) + b2
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, "")
        z2 += _dot(_gelu(_dot(k, w1, LP) + b1, LP), w2, LP)
    xh, rstd, dy, dxh, gr = _inner_grad(z2, target, lnw, lnb, D, eps)
    g2 = eta[:, None] * gr  # [BS, D]
    b2 -= tl.sum(g2, 0, keep_dims=True)
    tl.store(b2_ptr + cols[None, :], b2)
    tl.store(ob2_ptr + cols[None, :], b2)
    g2 = _operand(g2, LP)
    tl.debug_barrier()
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, "")
        x2, gp = _gelu_d(_dot(k, w1, LP) + b1, LP)
        g1 = _dot(g2, tl.trans(w2), LP) * gp  # [BS, FC]
        w1 -= _dot(tl.trans(k), g1, LP)
        b1 -= tl.sum(g1, 0, keep_dims=True)
        w2 -= _dot(tl.trans(x2), g2, LP)
        _mlp_store_chunk(w1_ptr, b1_ptr, w2_ptr, c, w1, b1, w2, cols, fcols, D, F)
        _mlp_store_chunk(ow1_ptr, ob1_ptr, ow2_ptr, c, w1, b1, w2, cols, fcols, D, F)


@triton.jit
def _signal(cnt_ptr):
    """Count this program's writes so far as done, for programs that `_wait` on the counter."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(cnt_ptr, target, patience):
    """Wait until the counter reaches `target`, spinning at most `patience` times; returns the
    patience left for later waits (0 once a wait timed out)."""
    spins = 0
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    while (seen < target) & (spins < patience):
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()
    return tl.where(seen < target, 0, patience)


@triton.jit
def _cluster_barrier(x):
    """Barrier of the thread-block cluster (Hopper and newer) with release / acquire order, so the global
    writes of every program in it before are seen by all after; returns x (what depends on it comes
    after the barrier)."""
    return tl.inline_asm_elementwise(
        "barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n\tmov.u32 $0, $1;",
        "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _chain_barrier(cnt_ptr, target, patience):
    """Wait until all the programs of this chain have counted themselves at the counter (`target`)."""
    _signal(cnt_ptr)
    return _wait(cnt_ptr, target, patience)


@triton.jit
def _mlp_out_rows(zq2, q_ptr, o_ptr, t0, T, rows, cols, lnw, lnb, D: tl.constexpr, eps):
    """Output rows `rows` of the mini-batch starting at token t0, from their Z_q2: layer-normed, plus q."""
    xhq, rstdq = _ln(zq2, D, eps)
    _store_rows(o_ptr, _load_rows(q_ptr, t0, T, rows, cols, D) + xhq * lnw + lnb, t0, T, rows, cols, D)


@triton.jit
def _mlp_fwd_out(xch_ptr, q_ptr, o_ptr, n, t0, T, rows, cols, lnw, lnb, S: tl.constexpr, BS: tl.constexpr,
                 D: tl.constexpr, eps):
    """Output rows `rows` of mini-batch n (starting at token t0) from the sum of the chain's S partial
    Z_q2 in `xch` (slot n % 2 of the queries' half)."""
    zq2 = tl.zeros([BS // S, D], dtype=tl.float32)
    for j in range(0, S):
        at = xch_ptr + ((2 + n % 2) * S + j) * BS * D
        zq2 += tl.load(at + rows[:, None] * D + cols[None, :], cache_modifier=".cg")
    _mlp_out_rows(zq2, q_ptr, o_ptr, t0, T, rows, cols, lnw, lnb, D, eps)


@triton.jit
def _mlp_fwd_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, o_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                    cw1_ptr, cb1_ptr, cw2_ptr, cb2_ptr, xch_ptr, cnt_ptr, ok_ptr, T, H, NG, eps, S: tl.constexpr,
                    D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
                    CAUSAL: tl.constexpr, SAVE: tl.constexpr, LP: tl.constexpr, PRIMAL: tl.constexpr,
                    CLUSTER: tl.constexpr):
    """Program (chain, s) owns hidden units [s F/S, (s+1) F/S): columns of W1, rows of W2. Partial sums
    of Z2 and Z_q2 go through `xch` `[N, 2 (Z2, Z_q2), 2 (mini-batch parity), S, BS, D]` (bf16 where the
    products are, v31; summed in float32), with one barrier a mini-batch among the chain's S programs,
    which must all be resident at once: where CLUSTER, the chain is a thread-block cluster and the
    barrier its hardware one (`_cluster_barrier`, v28), else a counter a chain in global memory;
    `ok_ptr` `[N * S]` gets 0 where a counter's barrier timed out.
    After the barrier of mini-batch n, program s writes its BS / S rows of mini-batch n - 1's output.
    At S = 1 the sums stay in registers. PRIMAL (not CAUSAL only): the queries' output through the
    updated state (`_mlp_primal`), else the dual form's scores."""
    pid = tl.program_id(0).to(tl.int64)
    chain = pid // S
    s = pid % S
    h = chain % H
    c0 = s * (F // S)
    rows = tl.arange(0, BS)
    mine = s * (BS // S) + tl.arange(0, BS // S)
    cols = tl.arange(0, D)
    fcols = tl.arange(0, FC)
    tile = rows[:, None] * D + cols[None, :]
    lnw = tl.load(lnw_ptr + h * D + cols)[None, :]
    lnb = tl.load(lnb_ptr + h * D + cols)[None, :]
    w1_ptr += chain * D * F
    b1_ptr += chain * F
    w2_ptr += chain * F * D
    b2 = tl.load(b2_ptr + chain * D + cols)[None, :]  # [1, D], updated alike in every program
    q_ptr += chain * T * D
    k_ptr += chain * T * D
    v_ptr += chain * T * D
    o_ptr += chain * T * D
    eta_ptr += chain * T
    xch_ptr += chain * 4 * S * BS * D
    cnt_ptr += chain
    patience = pid.to(tl.int32) * 0 + (1 << 22)
    NB = tl.cdiv(T, BS)
    # with checkpoints, one checkpoint group of G mini-batches an iteration, its checkpoint stored first
    # (out of the mini-batch loop, which then spills less at S = 4: v19); without, a single iteration
    for n0 in range(0, NB if SAVE else 1, G if SAVE else 1):
        if SAVE:
            c = chain * NG + n0 // G
            for cc in range(c0, c0 + F // S, FC):
                w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, cc, cols, fcols, D, F, "")
                _mlp_store_chunk(cw1_ptr + c * D * F, cb1_ptr + c * F, cw2_ptr + c * F * D, cc, w1, b1, w2,
                                 cols, fcols, D, F)
            if s == 0:
                tl.store(cb2_ptr + c * D + cols[None, :], b2)
        for n in range(n0, tl.minimum(n0 + G, NB) if SAVE else NB):
            t0 = n * BS
            q = _load_rows(q_ptr, t0, T, rows, cols, D)
            k = _load_rows(k_ptr, t0, T, rows, cols, D)
            v = _load_rows(v_ptr, t0, T, rows, cols, D)
            eta = _load_eta(eta_ptr, t0, T, rows)
            target = v - k
            k = _operand(k, LP)
            q = _operand(q, LP)
            part = tl.zeros([BS, D], dtype=tl.float32)
            for cc in range(c0, c0 + F // S, FC):
                w1, b1, w2t = _mlp_chunk_w2t(w1_ptr, b1_ptr, w2_ptr, cc, cols, fcols, D, F)
                part += _dot(_gelu(_dot(k, w1, LP) + b1, LP), tl.trans(w2t), LP)
            if S > 1:
                tl.store(xch_ptr + ((n % 2) * S + s) * BS * D + tile, part)
                if CLUSTER:
                    patience = _cluster_barrier(patience)
                else:
                    patience = _chain_barrier(cnt_ptr, S * (n + 1), patience)
                if n > 0:
                    _mlp_fwd_out(xch_ptr, q_ptr, o_ptr, n - 1, t0 - BS, T, mine, cols, lnw, lnb, S, BS, D, eps)
                z2 = tl.zeros([BS, D], dtype=tl.float32) + b2
                for j in range(0, S):
                    z2 += tl.load(xch_ptr + ((n % 2) * S + j) * BS * D + tile, cache_modifier=".cg")
            else:
                z2 = part + b2
            xh, rstd, dy, dxh, gr = _inner_grad(z2, target, lnw, lnb, D, eps)
            g2 = eta[:, None] * gr  # [BS, D]
            part = tl.zeros([BS, D], dtype=tl.float32)
            b2_old = b2
            b2 -= tl.sum(g2, 0, keep_dims=True)
            g2 = _operand(g2, LP)
            if s == 0:  # the output bias and the ones of the second layer's scores count once
                if CAUSAL:
                    part += b2_old - _dot(tl.where(rows[:, None] >= rows[None, :], 1.0, 0.0), g2, LP)
                else:  # every row sums all of g2: the updated bias (v20)
                    part += b2
            if PRIMAL:  # every row sees the whole update: the queries through each updated chunk
                for cc in range(c0, c0 + F // S, FC):
                    w1, b1, w2t = _mlp_chunk_w2t(w1_ptr, b1_ptr, w2_ptr, cc, cols, fcols, D, F)
                    x2, gp = _gelu_d(_dot(k, w1, LP) + b1, LP)
                    g1 = _dot(g2, w2t, LP) * gp  # [BS, FC]
                    w1 -= _dot(tl.trans(k), g1, LP)
                    b1 -= tl.sum(g1, 0, keep_dims=True)
                    # as the transpose of W2's update: `_dot(tl.trans(g2), x2)` is miscompiled (Triton 3.6, v30)
                    w2t -= tl.trans(_dot(tl.trans(x2), g2, LP))
                    _mlp_store_chunk_w2t(w1_ptr, b1_ptr, w2_ptr, cc, w1, b1, w2t, cols, fcols, D, F)
                    part += _dot(_gelu(_dot(q, w1, LP) + b1, LP), tl.trans(w2t), LP)
            else:  # dual form: row i sees the updates of rows <= i (of all rows without CAUSAL)
                a1 = _operand(_scores(q, k, rows, CAUSAL, LP), LP)
                s2 = tl.zeros([BS, BS], dtype=tl.float32)
                for cc in range(c0, c0 + F // S, FC):
                    w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, cc, cols, fcols, D, F, "")
                    x2, gp = _gelu_d(_dot(k, w1, LP) + b1, LP)
                    g1 = _dot(g2, tl.trans(w2), LP) * gp  # [BS, FC]
                    xq = _gelu(_dot(q, w1, LP) + b1 - _dot(a1, g1, LP), LP)
                    part += _dot(xq, w2, LP)
                    s2 += _dot(xq, tl.trans(x2), LP)
                    w1 -= _dot(tl.trans(k), g1, LP)
                    b1 -= tl.sum(g1, 0, keep_dims=True)
                    w2 -= _dot(tl.trans(x2), g2, LP)
                    _mlp_store_chunk(w1_ptr, b1_ptr, w2_ptr, cc, w1, b1, w2, cols, fcols, D, F)
                if CAUSAL:
                    s2 = tl.where(rows[:, None] >= rows[None, :], s2, 0.0)
                part -= _dot(s2, g2, LP)
            tl.debug_barrier()  # this step's state writes before the next step's reads
            if S > 1:
                tl.store(xch_ptr + ((2 + n % 2) * S + s) * BS * D + tile, part)
            else:
                _mlp_out_rows(part, q_ptr, o_ptr, t0, T, rows, cols, lnw, lnb, D, eps)
    if S > 1:
        if CLUSTER:
            patience = _cluster_barrier(patience)
        else:
            patience = _chain_barrier(cnt_ptr, S * (NB + 1), patience)
        _mlp_fwd_out(xch_ptr, q_ptr, o_ptr, NB - 1, (NB - 1) * BS, T, mine, cols, lnw, lnb, S, BS, D, eps)
    if s == 0:
        tl.store(b2_ptr + chain * D + cols[None, :], b2)
    tl.store(ok_ptr + pid, patience)


@triton.jit
def _par_offsets(D: tl.constexpr, F: tl.constexpr, BS: tl.constexpr, LP: tl.constexpr, PRIMAL: tl.constexpr):
    """Layout of what the queries' half leaves for the keys' half (`mlp_backward_scratch` sizes it).
    First, in the products' precision (bfloat16 where LP, each value then half a float32 slot), at
    offsets in its own units: in the dual form the gradient parts at G1 `[BS, F]` (offset 0) and X2
    `[BS, F]` (offset P_X2), then the adjoint parts W1 `[D, F]` and W2 `[F, D]`. Then float32, at
    float32 offsets from the start: the adjoint parts b1 `[F]` and b2 `[D]`, Z2 `[BS, D]`, and in the
    dual form the gradient part at G2 `[BS, D]` and the dk part `[BS, D]`. The primal form's queries'
    half leaves no gradient parts (they are zero there). The last value is the size in float32 slots."""
    P_X2: tl.constexpr = BS * F
    P_W1: tl.constexpr = 0 if PRIMAL else 2 * BS * F
    P_W2: tl.constexpr = P_W1 + D * F
    P_B1: tl.constexpr = (P_W2 + F * D) // 2 if LP else P_W2 + F * D
    P_B2: tl.constexpr = P_B1 + F
    P_Z2: tl.constexpr = P_B2 + D
    P_G2: tl.constexpr = P_Z2 + BS * D
    P_DK: tl.constexpr = P_G2 + BS * D
    return P_X2, P_W1, P_B1, P_W2, P_B2, P_G2, P_Z2, P_DK, P_G2 if PRIMAL else P_DK + BS * D


@triton.jit
def _low_ptr(ptr, LP: tl.constexpr):
    """A float32 pointer as one to the products' precision (bfloat16 where LP)."""
    return ptr.to(tl.pointer_type(tl.bfloat16 if LP else tl.float32), bitcast=True)


@triton.jit
def _mlp_bwd_queries(q, k, v, eta, do, lnw, lnb, w1_ptr, b1_ptr, w2_ptr, b2_ptr, par_ptr, rows, cols,
                     D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr,
                     LP: tl.constexpr, eps):
    """The queries' half of reverse mode through one mini-batch, from the state at w*_ptr: it needs
    no adjoint of the state, so it can run ahead of the keys' half
    (`_mlp_bwd_keys`). Returns dq and the output LayerNorm's weight and bias gradients; leaves in
    `par_ptr` (`_par_offsets`) what the keys' half takes: Z2, this half's parts of the gradients at
    G1, X2, G2 and k, and its part of the state's adjoint."""
    fcols = tl.arange(0, FC)
    fofs = rows[:, None] * F + fcols[None, :]
    tile = rows[:, None] * D + cols[None, :]
    causal = rows[:, None] >= rows[None, :]
    P_X2, P_W1, P_B1, P_W2, P_B2, P_G2, P_Z2, P_DK, P_END = _par_offsets(D, F, BS, LP, False)
    target = v - k
    k = _operand(k, LP)
    q = _operand(q, LP)
    # recompute the mini-batch
    b2 = tl.load(b2_ptr + cols)[None, :]
    z2 = tl.zeros([BS, D], dtype=tl.float32) + b2
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, "")
        z2 += _dot(_gelu(_dot(k, w1, LP) + b1, LP), w2, LP)
    tl.store(par_ptr + P_Z2 + tile, z2)
    xh, rstd, dy, dxh, gr = _inner_grad(z2, target, lnw, lnb, D, eps)
    g2 = _operand(eta * gr, LP)  # [BS, D]
    a1 = _operand(_scores(q, k, rows, CAUSAL, LP), LP)
    s2 = tl.zeros([BS, BS], dtype=tl.float32)
    zq2 = tl.zeros([BS, D], dtype=tl.float32) + b2
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, "")
        x2, gp = _gelu_d(_dot(k, w1, LP) + b1, LP)
        g1 = _dot(g2, tl.trans(w2), LP) * gp
        xq = _gelu(_dot(q, w1, LP) + b1 - _dot(a1, g1, LP), LP)
        zq2 += _dot(xq, w2, LP)
        s2 += _dot(xq, tl.trans(x2), LP)
    s2 += 1.0
    if CAUSAL:
        s2 = tl.where(causal, s2, 0.0)
    zq2 -= _dot(s2, g2, LP)
    xhq, rstdq = _ln(zq2, D, eps)
    # reverse mode: output LayerNorm, then the query path chunk by chunk
    dlnw = tl.sum(do * xhq, 0)
    dlnb = tl.sum(do, 0)
    dzq2 = _ln_bwd(do * lnw, xhq, rstdq, D)  # [BS, D]
    ds2 = -_dot(dzq2, tl.trans(g2), LP)
    if CAUSAL:
        ds2 = tl.where(causal, ds2, 0.0)
    ds2 = _operand(ds2, LP)
    tl.store(par_ptr + P_G2 + tile, -_dot(tl.trans(s2), dzq2, LP))
    tl.store(par_ptr + P_B2 + cols[None, :], tl.sum(dzq2, 0, keep_dims=True))
    dzq2 = _operand(dzq2, LP)
    dq = do
    ds1 = tl.zeros([BS, BS], dtype=tl.float32)
    low_ptr = _low_ptr(par_ptr, LP)
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, "")
        x2, gp = _gelu_d(_dot(k, w1, LP) + b1, LP)
        g1 = _dot(g2, tl.trans(w2), LP) * gp
        xq, gpq = _gelu_d(_dot(q, w1, LP) + b1 - _dot(a1, g1, LP), LP)
        dzq1 = (_dot(dzq2, tl.trans(w2), LP) + _dot(ds2, x2, LP)) * gpq  # [BS, FC]
        dq += _dot(dzq1, tl.trans(w1), LP)
        ds1 -= _dot(dzq1, tl.trans(g1), LP)
        tl.store(low_ptr + fofs + c, -_dot(tl.trans(a1), dzq1, LP))
        tl.store(low_ptr + P_X2 + fofs + c, _dot(tl.trans(ds2), xq, LP))
        _mlp_store_chunk(low_ptr + P_W1, par_ptr + P_B1, low_ptr + P_W2, c, _dot(tl.trans(q), dzq1, LP),
                         tl.sum(dzq1, 0, keep_dims=True), _dot(tl.trans(xq), dzq2, LP), cols, fcols, D, F)
    if CAUSAL:
        ds1 = tl.where(causal, ds1, 0.0)
    tl.store(par_ptr + P_DK + tile, _dot(tl.trans(ds1), q, LP))
    return dq + _dot(ds1, k, LP), dlnw, dlnb


@triton.jit
def _mlp_bwd_queries_primal(q, k, do, lnw, lnb, w1_ptr, b1_ptr, w2_ptr, b2_ptr, par_ptr, rows, cols,
                            D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, BS: tl.constexpr, LP: tl.constexpr,
                            eps):
    """`_mlp_bwd_queries` where every row sees the whole mini-batch's update (`_mlp_primal`): the output
    is the updated state's MLP of q, so the query path reaches the update only through that state, at
    the next slot (w*_ptr plus one state). Leaves in `par_ptr` Z2 and this half's part of the adjoint
    of the state after the mini-batch (the gradient parts at G1, X2, G2 and k are zero)."""
    fcols = tl.arange(0, FC)
    tile = rows[:, None] * D + cols[None, :]
    P_X2, P_W1, P_B1, P_W2, P_B2, P_G2, P_Z2, P_DK, P_END = _par_offsets(D, F, BS, LP, True)
    u1_ptr = w1_ptr + D * F
    ub1_ptr = b1_ptr + F
    u2_ptr = w2_ptr + F * D
    k = _operand(k, LP)
    q = _operand(q, LP)
    z2 = tl.zeros([BS, D], dtype=tl.float32) + tl.load(b2_ptr + cols)[None, :]
    zq2 = tl.zeros([BS, D], dtype=tl.float32) + tl.load(b2_ptr + D + cols)[None, :]
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, "")
        z2 += _dot(_gelu(_dot(k, w1, LP) + b1, LP), w2, LP)
        w1, b1, w2 = _mlp_chunk(u1_ptr, ub1_ptr, u2_ptr, c, cols, fcols, D, F, "")
        zq2 += _dot(_gelu(_dot(q, w1, LP) + b1, LP), w2, LP)
    tl.store(par_ptr + P_Z2 + tile, z2)
    xhq, rstdq = _ln(zq2, D, eps)
    dlnw = tl.sum(do * xhq, 0)
    dlnb = tl.sum(do, 0)
    dzq2 = _ln_bwd(do * lnw, xhq, rstdq, D)  # [BS, D]
    tl.store(par_ptr + P_B2 + cols[None, :], tl.sum(dzq2, 0, keep_dims=True))
    dzq2 = _operand(dzq2, LP)
    dq = do
    low_ptr = _low_ptr(par_ptr, LP)
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(u1_ptr, ub1_ptr, u2_ptr, c, cols, fcols, D, F, "")
        xq, gpq = _gelu_d(_dot(q, w1, LP) + b1, LP)
        dzq1 = _dot(dzq2, tl.trans(w2), LP) * gpq  # [BS, FC]
        dq += _dot(dzq1, tl.trans(w1), LP)
        _mlp_store_chunk(low_ptr + P_W1, par_ptr + P_B1, low_ptr + P_W2, c, _dot(tl.trans(q), dzq1, LP),
                         tl.sum(dzq1, 0, keep_dims=True), _dot(tl.trans(xq), dzq2, LP), cols, fcols, D, F)
    return dq, dlnw, dlnb


@triton.jit
def _mlp_bwd_keys(k, v, eta, lnw, lnb, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, par_ptr,
                  scr_ptr, rows, cols, D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, BS: tl.constexpr,
                  LP: tl.constexpr, CM: tl.constexpr, PRIMAL: tl.constexpr, KS: tl.constexpr, eps):
    """The keys' half of reverse mode through one mini-batch, with the queries' half's results at
    `par_ptr`: the adjoint at dw*_ptr moves from the state after the mini-batch to the state before
    it (at w*_ptr, loaded with cache modifier CM). The queries' part of the adjoint is of the state
    before (the dual form) or, with PRIMAL, of the state after, which the reverse step then carries
    whole (`_mlp_bwd_queries_primal`). Returns dk, dv, deta and the inner LayerNorm's weight and bias
    gradients.
    `scr_ptr` holds a `[BS, F]` partial dZ1 between the two passes over the hidden dim (in the products'
    precision: it feeds products and the float32 b1 sum), then, at float32 slot BS * F, the target
    `[BS, D]`, parked there instead of held in registers through the first pass. KS software-pipelines
    the second pass's loads (`_mlp_keys_stages`)."""
    fcols = tl.arange(0, FC)
    fofs = rows[:, None] * F + fcols[None, :]
    tile = rows[:, None] * D + cols[None, :]
    P_X2, P_W1, P_B1, P_W2, P_B2, P_G2, P_Z2, P_DK, P_END = _par_offsets(D, F, BS, LP, PRIMAL)
    target = v - k
    tl.store(scr_ptr + BS * F + tile, target)
    k = _operand(k, LP)
    xh, rstd, dy, dxh, gr = _inner_grad(tl.load(par_ptr + P_Z2 + tile, cache_modifier=".cg"), target, lnw, lnb,
                                        D, eps)
    g2 = _operand(eta * gr, LP)  # [BS, D]
    db2 = tl.load(db2_ptr + cols)[None, :]
    if PRIMAL:
        db2 += tl.load(par_ptr + P_B2 + cols[None, :], cache_modifier=".cg")
        dg2 = tl.zeros([BS, D], dtype=tl.float32) - db2
        dk = tl.zeros([BS, D], dtype=tl.float32)
    else:
        dg2 = tl.load(par_ptr + P_G2 + tile, cache_modifier=".cg") - db2
        dk = tl.load(par_ptr + P_DK + tile, cache_modifier=".cg")
    low_ptr = _low_ptr(par_ptr, LP)
    tl.debug_barrier()
    for c in range(0, F, FC):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, CM)
        dw1, db1, dw2 = _mlp_chunk(dw1_ptr, db1_ptr, dw2_ptr, c, cols, fcols, D, F, "")
        qw1, qb1, qw2 = _mlp_chunk(low_ptr + P_W1, par_ptr + P_B1, low_ptr + P_W2, c, cols, fcols, D, F, ".cg")
        if PRIMAL:
            dw1 += qw1
            db1 += qb1
            dw2 += qw2
        x2, gp, gpp = _gelu_parts(_dot(k, w1, LP) + b1, LP)
        p = _dot(g2, tl.trans(w2), LP)
        g1 = p * gp
        dg1 = -_dot(k, dw1, LP) - db1
        dx2 = -_dot(g2, tl.trans(dw2), LP)
        if not PRIMAL:
            dg1 += tl.load(low_ptr + fofs + c, cache_modifier=".cg")
            dx2 += tl.load(low_ptr + P_X2 + fofs + c, cache_modifier=".cg")
        dk -= _dot(g1, tl.trans(dw1), LP)
        dg2 -= _dot(x2, dw2, LP)
        dp = dg1 * gp
        dg2 += _dot(dp, w2, LP)
        tl.store(_low_ptr(scr_ptr, LP) + fofs + c, dg1 * p * gpp + dx2 * gp)
        if not PRIMAL:
            dw1 += qw1
            db1 += qb1
            dw2 += qw2
        _mlp_store_chunk(dw1_ptr, db1_ptr, dw2_ptr, c, dw1, db1, dw2 + _dot(tl.trans(dp), g2, LP), cols, fcols, D, F)
    # reverse mode of the inner gradient, then the key path
    tl.debug_barrier()
    xh, rstd, dy, dxh, gr = _inner_grad(tl.load(par_ptr + P_Z2 + tile, cache_modifier=".cg"),
                                        tl.load(scr_ptr + BS * F + tile), lnw, lnb, D, eps)
    deta = tl.sum(dg2 * gr, 1)
    dz2, d_dy, dlnw, dlnb = _inner_grad_bwd(eta * dg2, xh, rstd, dy, dxh, lnw, D)
    if not PRIMAL:
        db2 += tl.load(par_ptr + P_B2 + cols[None, :], cache_modifier=".cg")
    db2 += tl.sum(dz2, 0, keep_dims=True)
    tl.store(db2_ptr + cols[None, :], db2)
    dz2 = _operand(dz2, LP)
    tl.debug_barrier()
    for c in tl.range(0, F, FC, num_stages=KS):
        w1, b1, w2 = _mlp_chunk(w1_ptr, b1_ptr, w2_ptr, c, cols, fcols, D, F, CM)
        dw1, db1, dw2 = _mlp_chunk(dw1_ptr, db1_ptr, dw2_ptr, c, cols, fcols, D, F, "")
        x2, gp = _gelu_d(_dot(k, w1, LP) + b1, LP)
        dz1 = tl.load(_low_ptr(scr_ptr, LP) + fofs + c) + _dot(dz2, tl.trans(w2), LP) * gp
        dk += _dot(dz1, tl.trans(w1), LP)
        _mlp_store_chunk(dw1_ptr, db1_ptr, dw2_ptr, c, dw1 + _dot(tl.trans(k), dz1, LP),
                         db1 + tl.sum(dz1, 0, keep_dims=True), dw2 + _dot(tl.trans(x2), dz2, LP), cols, fcols, D, F)
    return dk + d_dy, -d_dy, deta, dlnw, dlnb


@triton.jit
def _mlp_group_states(k_ptr, v_ptr, eta_ptr, cw1_ptr, cb1_ptr, cw2_ptr, cb2_ptr, sw1_ptr, sb1_ptr, sw2_ptr, sb2_ptr,
                      run_ptr, n0, L, T, lnw, lnb, rows, cols, D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr,
                      BS: tl.constexpr, LP: tl.constexpr, eps):
    """The states before each of L steps from mini-batch n0 on and the one after them (L + 1 states), from
    the checkpoint at cw*_ptr into the scratch at sw*_ptr, stepping a float32 copy at run_ptr (W1, b1,
    W2, b2 one after another)."""
    rw1_ptr = run_ptr
    rb1_ptr = rw1_ptr + D * F
    rw2_ptr = rb1_ptr + F
    rb2_ptr = rw2_ptr + F * D
    tl.debug_barrier()
    _mlp_copy(cw1_ptr, cb1_ptr, cw2_ptr, cb2_ptr, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, sw1_ptr, sb1_ptr, sw2_ptr,
              sb2_ptr, cols, D, F, FC)
    for j in range(0, L):
        t0 = (n0 + j) * BS
        k = _load_rows(k_ptr, t0, T, rows, cols, D)
        v = _load_rows(v_ptr, t0, T, rows, cols, D)
        eta = _load_eta(eta_ptr, t0, T, rows)
        tl.debug_barrier()
        _mlp_step(k, v, eta, lnw, lnb, rw1_ptr, rb1_ptr, rw2_ptr, rb2_ptr, sw1_ptr + (j + 1) * D * F,
                  sb1_ptr + (j + 1) * F, sw2_ptr + (j + 1) * F * D, sb2_ptr + (j + 1) * D, cols, D, F, FC, BS, LP, eps)


@triton.jit
def _mlp_bwd_rows(k_ptr, v_ptr, eta_ptr, lnw_ptr, lnb_ptr, t0, T, D: tl.constexpr, BS: tl.constexpr):
    """What both halves of the backward load for the mini-batch at token t0: rows, cols, the
    LayerNorm's weight and bias `[1, D]`, k and v `[BS, D]`, eta `[BS, 1]`."""
    rows = tl.arange(0, BS)
    cols = tl.arange(0, D)
    lnw = tl.load(lnw_ptr + cols)[None, :]
    lnb = tl.load(lnb_ptr + cols)[None, :]
    k = _load_rows(k_ptr, t0, T, rows, cols, D)
    v = _load_rows(v_ptr, t0, T, rows, cols, D)
    return rows, cols, lnw, lnb, k, v, _load_eta(eta_ptr, t0, T, rows)[:, None]


@triton.jit
def _add_rows(a_ptr, b_ptr, a, b, cols):
    """Adds the rows a and b to the rows at a_ptr and b_ptr."""
    tl.store(a_ptr + cols, tl.load(a_ptr + cols) + a)
    tl.store(b_ptr + cols, tl.load(b_ptr + cols) + b)


@triton.jit(noinline=True)
def _mlp_bwd_queries_at(q_ptr, k_ptr, v_ptr, eta_ptr, do_ptr, dq_ptr, lnw_ptr, lnb_ptr, dlnw_ptr, dlnb_ptr,
                        w1_ptr, b1_ptr, w2_ptr, b2_ptr, par_ptr, t0, T, D: tl.constexpr, F: tl.constexpr,
                        FC: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr, LP: tl.constexpr,
                        PRIMAL: tl.constexpr, eps):
    """`_mlp_bwd_queries` (`_mlp_bwd_queries_primal` where PRIMAL) on the mini-batch at token t0: dq
    stored, the LayerNorm gradients added at dlnw_ptr / dlnb_ptr. A function of its own in the compiled
    code (not inlined), as is `_mlp_bwd_keys_at`: ptxas then allocates each half's registers apart, and
    the backward's speed no longer rests on how it allocates the whole kernel (NOTES.md, v21)."""
    rows, cols, lnw, lnb, k, v, eta = _mlp_bwd_rows(k_ptr, v_ptr, eta_ptr, lnw_ptr, lnb_ptr, t0, T, D, BS)
    q = _load_rows(q_ptr, t0, T, rows, cols, D)
    do = _load_rows(do_ptr, t0, T, rows, cols, D)
    tl.debug_barrier()
    if PRIMAL:
        dq, dlnw, dlnb = _mlp_bwd_queries_primal(q, k, do, lnw, lnb, w1_ptr, b1_ptr, w2_ptr, b2_ptr, par_ptr, rows,
                                                 cols, D, F, FC, BS, LP, eps)
    else:
        dq, dlnw, dlnb = _mlp_bwd_queries(q, k, v, eta, do, lnw, lnb, w1_ptr, b1_ptr, w2_ptr, b2_ptr, par_ptr,
                                          rows, cols, D, F, FC, BS, CAUSAL, LP, eps)
    _store_rows(dq_ptr, dq, t0, T, rows, cols, D)
    _add_rows(dlnw_ptr, dlnb_ptr, dlnw, dlnb, cols)


@triton.jit(noinline=True)
def _mlp_bwd_keys_at(k_ptr, v_ptr, eta_ptr, dk_ptr, dv_ptr, deta_ptr, lnw_ptr, lnb_ptr, dlnw_ptr, dlnb_ptr,
                     w1_ptr, b1_ptr, w2_ptr, b2_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, par_ptr, scr_ptr, t0, T,
                     D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, BS: tl.constexpr, LP: tl.constexpr,
                     CM: tl.constexpr, PRIMAL: tl.constexpr, KS: tl.constexpr, eps):
    """`_mlp_bwd_keys` on the mini-batch at token t0: dk, dv, deta stored, the LayerNorm gradients
    added at dlnw_ptr / dlnb_ptr; not inlined (`_mlp_bwd_queries_at`)."""
    rows, cols, lnw, lnb, k, v, eta = _mlp_bwd_rows(k_ptr, v_ptr, eta_ptr, lnw_ptr, lnb_ptr, t0, T, D, BS)
    tl.debug_barrier()
    dk, dv, deta, dlnw, dlnb = _mlp_bwd_keys(k, v, eta, lnw, lnb, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dw1_ptr, db1_ptr,
                                             dw2_ptr, db2_ptr, par_ptr, scr_ptr, rows, cols, D, F, FC, BS, LP, CM,
                                             PRIMAL, KS, eps)
    _store_rows(dk_ptr, dk, t0, T, rows, cols, D)
    _store_rows(dv_ptr, dv, t0, T, rows, cols, D)
    tl.store(deta_ptr + t0 + rows, deta, mask=(t0 + rows) < T)
    _add_rows(dlnw_ptr, dlnb_ptr, dlnw, dlnb, cols)


@triton.jit
def _mlp_bwd_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, do_ptr, lnw_ptr, lnb_ptr, cw1_ptr, cb1_ptr, cw2_ptr, cb2_ptr,
                    sw1_ptr, sb1_ptr, sw2_ptr, sb2_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, par_ptr, scr_ptr,
                    dq_ptr, dk_ptr, dv_ptr, deta_ptr, dlnw_ptr, dlnb_ptr, cnt_ptr, ok_ptr, T, H, NG, eps,
                    S: tl.constexpr, D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, BS: tl.constexpr,
                    G: tl.constexpr, CAUSAL: tl.constexpr, LP: tl.constexpr, PRIMAL: tl.constexpr,
                    KS: tl.constexpr):
    """Reverse mode through the groups, newest first: the group's states (G slots a group, G + 1 with
    PRIMAL, where the queries' half reads the state after its mini-batch too) are recomputed into the
    scratch at sw*_ptr, then each mini-batch, newest first, runs its queries' half (`_mlp_bwd_queries`)
    and its keys' half (`_mlp_bwd_keys`). At S = 1 one program per chain does all of it. At S = 2
    program (chain, 1) recomputes the states and runs the queries' halves, ahead of program
    (chain, 0), which runs the keys' halves: they keep two groups of states and of the queries'
    results in flight (scratch `[N, S * GS, ...]` and `[N, S * G, ...]`), ordered by two counters
    a chain (`cnt_ptr` `[N, 2]`: groups freed by the keys' half, mini-batches done by the queries' half);
    both programs must be resident at once, and `ok_ptr` `[N * S]` gets 0 where a wait timed out."""
    pid = tl.program_id(0).to(tl.int64)
    chain = pid // S
    role = pid % S
    h = chain % H
    rows = tl.arange(0, BS)
    cols = tl.arange(0, D)
    P_X2, P_W1, P_B1, P_W2, P_B2, P_G2, P_Z2, P_DK, P_END = _par_offsets(D, F, BS, LP, PRIMAL)
    GS: tl.constexpr = G + 1 if PRIMAL else G  # state slots a group
    lnw = tl.load(lnw_ptr + h * D + cols)[None, :]
    lnb = tl.load(lnb_ptr + h * D + cols)[None, :]
    tl.store(dlnw_ptr + pid * D + cols, tl.zeros([D], dtype=tl.float32))
    tl.store(dlnb_ptr + pid * D + cols, tl.zeros([D], dtype=tl.float32))
    dw1_ptr += chain * D * F
    db1_ptr += chain * F
    dw2_ptr += chain * F * D
    db2_ptr += chain * D
    sw1_ptr += chain * S * GS * D * F
    sb1_ptr += chain * S * GS * F
    sw2_ptr += chain * S * GS * F * D
    sb2_ptr += chain * S * GS * D
    par_ptr += chain * (S * G if S > 1 else 1) * P_END
    scr_ptr += chain * (BS * (F + D) + 2 * D * F + F + D)
    q_ptr += chain * T * D
    k_ptr += chain * T * D
    v_ptr += chain * T * D
    do_ptr += chain * T * D
    dq_ptr += chain * T * D
    dk_ptr += chain * T * D
    dv_ptr += chain * T * D
    eta_ptr += chain * T
    deta_ptr += chain * T
    freed_ptr = cnt_ptr + chain * 2
    done_ptr = freed_ptr + 1
    patience = pid.to(tl.int32) * 0 + (1 << 22)
    NM = tl.cdiv(T, BS)
    done = 0
    for gi in range(0, NG):
        n0 = (NG - 1 - gi) * G
        L = tl.minimum(G, NM - n0)
        slot = (gi % S) * GS
        if role == S - 1:
            if S > 1:
                if gi >= S:  # the keys' half is done with the group that last used this slot
                    patience = _wait(freed_ptr, gi - S + 1, patience)
            c = chain * NG + NG - 1 - gi
            _mlp_group_states(k_ptr, v_ptr, eta_ptr, cw1_ptr + c * D * F, cb1_ptr + c * F, cw2_ptr + c * F * D,
                              cb2_ptr + c * D, sw1_ptr + slot * D * F, sb1_ptr + slot * F, sw2_ptr + slot * F * D,
                              sb2_ptr + slot * D, scr_ptr + BS * (F + D), n0, L if PRIMAL else L - 1, T, lnw, lnb,
                              rows, cols, D, F, FC, BS, LP, eps)
        for jj in range(0, L):
            j = L - 1 - jj
            t0 = (n0 + j) * BS
            at = slot + j
            par_j = par_ptr + ((gi % S) * G + j if S > 1 else 0) * P_END
            if role == S - 1:
                _mlp_bwd_queries_at(q_ptr, k_ptr, v_ptr, eta_ptr, do_ptr, dq_ptr, lnw_ptr + h * D, lnb_ptr + h * D,
                                    dlnw_ptr + pid * D, dlnb_ptr + pid * D, sw1_ptr + at * D * F, sb1_ptr + at * F,
                                    sw2_ptr + at * F * D, sb2_ptr + at * D, par_j, t0, T, D, F, FC, BS, CAUSAL, LP,
                                    PRIMAL, eps)
                if S > 1:
                    _signal(done_ptr)
            if role == 0:
                if S > 1:
                    patience = _wait(done_ptr, done + jj + 1, patience)
                _mlp_bwd_keys_at(k_ptr, v_ptr, eta_ptr, dk_ptr, dv_ptr, deta_ptr, lnw_ptr + h * D, lnb_ptr + h * D,
                                 dlnw_ptr + pid * D, dlnb_ptr + pid * D, sw1_ptr + at * D * F, sb1_ptr + at * F,
                                 sw2_ptr + at * F * D, sb2_ptr + at * D, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, par_j,
                                 scr_ptr, t0, T, D, F, FC, BS, LP, ".cg" if S > 1 else "", PRIMAL, KS, eps)
        if S > 1:
            if role == 0:
                _signal(freed_ptr)
        done += L
    tl.store(ok_ptr + pid, patience)


def _mlp_chunk_size(D, warps, backward):
    """Hidden units per chunk of the MLP loops (F = 4 D): D / 2, at least 16. At head dim 64 the forward
    spills 168 bytes a thread against 660 at D (v9), the backward's halves about half as much as at D
    (v22; NOTES.md). A backward of more than 4 warps takes chunks of at least 64 units (at most D): its
    build with 32-unit chunks reads shared memory out of bounds in its state recompute on an H100 (16
    warps at mini-batch 128, 8 warps at head dim 64; NOTES.md, after v22)."""
    if backward and warps > 4:
        return min(D, max(D // 2, 64))
    return max(D // 2, 16)


def _mlp_keys_stages(warps):
    """Software-pipeline stages of the loop of the MLP backward keys' half's second pass: two in its
    4-warp builds, whose chunk loads are otherwise on the step's critical path (v27: -6.5 % forward+
    backward at 48 chains, 63 s; the build's shared memory 27 -> 62 KB). One in the 8- and 16-warp
    builds, whose larger tiles it would multiply (not measured there)."""
    return 2 if warps == 4 else 1


def _launch_options(mlp, D, bs):
    """num_warps / num_stages; one stage keeps the hidden-chunk loops from multi-buffering shared memory
    (all but the MLP backward keys' second pass, which sets its own: `_mlp_keys_stages`).
    TTT-Linear at head dim 128 holds a 128 x 128 state (and its adjoint) in registers: 8 warps.
    TTT-MLP at mini-batch 128 needs 16: at 8 its compiled backward gave a wrong dk on an H100
    (relative error 0.5; correct in the interpreter, at 16 warps and with no recompute inside a
    checkpoint group), a miscompile or race not yet pinned down (NOTES.md)."""
    warps = (16 if bs >= 128 else 8) if mlp else (8 if D >= 128 else 4)
    return dict(num_warps=warps, num_stages=1 if mlp else 2)


def _mlp_primal(causal, warps):
    """Whether the MLP forward forms a non-causal mini-batch's output through the updated state (every
    row sees the whole mini-batch's update), which takes two of its eight products a hidden chunk, the
    scores and their accumulator (v25). Only in the 4-warp builds: on Triton 3.6 its 16-warp build
    (mini-batch 128) leaves a wrong final state and its 8-warp build at 16-unit chunks (head dim 32)
    reads out of bounds on an H100, where the dual form's builds are right (NOTES.md)."""
    return not causal and warps == 4


def _bf16_products(q):
    """Round matrix-product operands to bfloat16 for 16-bit activations (state stays float32)."""
    return q.is_cuda and q.dtype != torch.float32


def _mlp_slices(N, most, q, key, warmup):
    """Programs per chain of an MLP kernel: the most, up to `most` (a power of two), that keep all N * S
    programs resident at once, judged on the S = 2 build that `warmup(float32 tensor, int32 tensor)`
    compiles; 0 where not even N programs are (one a chain would run in waves). One where programs
    run one after another (the interpreter)."""
    if not q.is_cuda or most == 1:
        return 1
    key = (q.device, N, most, key)
    if key not in _SLICES:
        kernel = warmup(q.new_empty(1, dtype=torch.float32), q.new_empty(1, dtype=torch.int32))
        resident = _programs_per_sm(kernel, q.device) * torch.cuda.get_device_properties(q.device).multi_processor_count
        s = most
        while s > 1 and N * s > resident:
            s //= 2
        _SLICES[key] = s if N * s <= resident else 0
    return _SLICES[key]


def _mlp_launch(N, q, key, common, most, warmup, backward):
    """(S, launch options) of an MLP kernel. 4 warps (two such programs fit an SM: head dim <= 64,
    mini-batch <= 64) where that gives a chain at least two programs, with up to `most[0]` (v14, v16
    in NOTES.md), or where it gives one and only 4-warp programs are all resident at once (between
    one and two chains an SM; v18); else `common`'s warps, with up to `most[1]` programs a chain.
    The options carry the hidden chunk FC for their warps (`_mlp_chunk_size`) and, for the backward,
    the stages of its keys' second pass (KS, `_mlp_keys_stages`). `warmup(options)` gives
    the compile function `_mlp_slices` takes; `key` names the kernel."""

    def slices(opts, up_to):
        return _mlp_slices(N, up_to, q, (*key, tuple(sorted(opts.items()))), warmup(opts))

    def at(warps):
        return {**common, "num_warps": warps, "FC": _mlp_chunk_size(common["D"], warps, backward),
                **({"KS": _mlp_keys_stages(warps)} if backward else {})}

    narrow, common = at(4), at(common["num_warps"])
    if common["D"] <= 64 and common["BS"] <= 64:
        S = slices(narrow, most[0])
        if S > 1 or (S == 1 and slices(common, most[1]) == 0):
            return S, narrow
    return max(slices(common, most[1]), 1), common


def _programs_per_sm(kernel, device):
    """How many programs of a compiled kernel one SM holds at once (registers, threads, shared memory);
    asked once a build (the driver's device query takes ~1 ms)."""
    kernel._init_handles()
    key = (kernel.function, device)
    if key not in _PER_SM:
        _PER_SM[key] = _count_programs_per_sm(kernel, device)
    return _PER_SM[key]


def _count_programs_per_sm(kernel, device):
    warps = kernel.metadata.num_warps
    regs = -(-max(kernel.n_regs, 1) // 8) * 8 * 32 * warps
    smem = triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]
    threads = torch.cuda.get_device_properties(device).max_threads_per_multi_processor
    return min(65536 // regs, threads // (32 * warps), smem // (kernel.metadata.shared + 1024))


def _launch(fn, grid, *args, cluster=1, **kwargs):
    """`fn[grid](*args, **kwargs)`. On a GPU a build above 48 KB of shared memory first gets the smallest
    shared-memory carveout that still holds the programs an SM must keep for this grid: Triton asks for
    the largest for such builds, which leaves ~28 KB of L1 for their register spills (NOTES.md, v11, v17).
    With `cluster` > 1 (`_cluster_size`), each `cluster` consecutive programs launch as one thread-block
    cluster. Triton launches clusters only for builds that split one program over several blocks
    (`num_ctas`), so this build, of one block a program, is launched with the cluster size in the launch
    metadata that Triton's launcher reads (`(num_warps, num_ctas, shared)`: it then starts grid x
    cluster blocks, in clusters)."""
    if not args[0].is_cuda:
        fn[grid](*args, **kwargs)
        return
    kernel = fn.warmup(*args, grid=grid, **kwargs)
    kernel._init_handles()
    _set_carveout(kernel, args[0].device, grid[0])
    if cluster == 1:
        fn[grid](*args, **kwargs)
        return
    packed = kernel.packed_metadata
    kernel.packed_metadata = (packed[0], cluster, packed[2])
    try:
        kernel[(grid[0] // cluster, 1, 1)](*args, *(kwargs[name] for name in fn.arg_names[len(args):]))
    finally:
        kernel.packed_metadata = packed


def _cluster_size(q, N, S, build):
    """Programs a chain as one thread-block cluster for the split MLP forward of N chains: S on GPUs that
    have clusters (compute capability 9 and up; S <= 8, which every such GPU takes) where Triton packs the
    launch metadata as `_launch` rewrites it and the driver can place all N clusters of the build that
    `build()` compiles at once (`_max_active_clusters`: a GPU partition may hold fewer, or none), else 1
    (a counter in global memory). The cluster's barrier took the forward at 63 s from 77.4 / 78.3 to
    74.6 / 74.7 ms at 48 chains and from 120.3 to 115.5 / 116.4 ms at 96 on an H100 (v28, NOTES.md)."""
    if S == 1 or S > 8 or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return 1
    if not _launcher_takes_cluster_size():
        return 1
    return S if _max_active_clusters(build(), S) >= N else 1


def _max_active_clusters(kernel, cluster):
    """How many clusters of `cluster` programs of a compiled kernel the GPU holds at once, as the driver
    places them (`cuOccupancyMaxActiveClusters`); 0 where it cannot tell."""
    kernel._init_handles()
    key = (kernel.function, cluster)
    if key not in _CLUSTERS:
        attr = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION)
        attr.value[:3] = (cluster, 1, 1)
        config = _LaunchConfig(grid=(cluster, 1, 1), block=(32 * kernel.metadata.num_warps, 1, 1),
                               shared=kernel.metadata.shared, attrs=ctypes.pointer(attr), num_attrs=1)
        count = ctypes.c_int(0)
        query = getattr(ctypes.CDLL("libcuda.so.1"), "cuOccupancyMaxActiveClusters", None)
        ok = query is not None and query(ctypes.byref(count), ctypes.c_void_p(kernel.function),
                                         ctypes.byref(config)) == 0
        _CLUSTERS[key] = count.value if ok else 0
    return _CLUSTERS[key]


class _LaunchAttribute(ctypes.Structure):
    """The driver's `CUlaunchAttribute`: an id, then a 64-byte value (a cluster's dimensions first)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):
    """The driver's `CUlaunchConfig`."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


@functools.cache
def _launcher_takes_cluster_size():
    """Whether this Triton packs the launch metadata as `(num_warps, num_ctas, shared)`, which `_launch`
    rewrites to launch clusters."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend

        meta = types.SimpleNamespace(num_warps=4, num_ctas=2, shared=3)
        return CUDABackend.pack_metadata(None, meta) == (4, 2, 3)
    except Exception:  # another Triton's launcher: keep the counters
        return False


def _set_carveout(kernel, device, programs):
    """Ask for the percent of the SM's shared memory (the rest is L1) that the `programs` of a launch
    need: as many an SM as fit, or fewer where the grid is spread over all SMs with fewer (48 chains of
    the MLP backward: one program an SM, so ~156 KB of L1 instead of ~88 KB). Left to Triton and the
    driver at 48 KB and below."""
    if kernel.metadata.shared <= 49152:
        return
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_sm = min(_programs_per_sm(kernel, device), -(-programs // sms))
    if _CARVEOUT.get(kernel.function) == per_sm:
        return
    need = per_sm * (kernel.metadata.shared + 1024)
    most = triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"] + 1024
    percent = min(100, -(-100 * need // most))
    cuda = ctypes.CDLL("libcuda.so.1")
    if cuda.cuFuncSetAttribute(ctypes.c_void_p(kernel.function), _CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                               ctypes.c_int(percent)) == 0:
        _CARVEOUT[kernel.function] = per_sm


_CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9
_CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4
_CARVEOUT = {}
_CLUSTERS = {}
_PER_SM = {}
_SLICES = {}


def _hopper(q, causal, common):
    """`hopper.py` where its kernels apply (an H100's compute capability, bf16 products, head dim and
    mini-batch 64, not causal) and this Triton has the Gluon they use, else None."""
    if not (q.is_cuda and common["LP"] and not causal and common["D"] == 64 and common["BS"] == 64
            and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return None
    try:
        from . import hopper
    except (ImportError, AttributeError):  # a Triton without Gluon, or whose Gluon lacks what it uses
        return None
    return hopper


def _hopper_forward(q, causal, common, args, T, H, NG, eps, group, save):
    """Runs the MLP forward with the Hopper kernel (`hopper.py`, v32 and v33) where it applies; returns whether
    it ran."""
    hopper = _hopper(q, causal, common)
    return hopper is not None and hopper.forward(args, T, H, NG, eps, group, save, _programs_per_sm, _launch,
                                                 _cluster_size)


def _hopper_backward(q, causal, common, *args):
    """Runs the MLP backward with the Hopper kernels (`hopper.backward`, v34) where they apply; returns the
    LayerNorm weight and bias gradients, or None where they do not apply."""
    hopper = _hopper(q, causal, common)
    return None if hopper is None else hopper.backward(q, *args)


def _forward(mlp, bs, causal, eps, group, NG, q, k, v, eta, ln_w, ln_b, state0, save):
    """`_TTT`'s kernels: (output, final state, the state at every `group`-th mini-batch if `save`)."""
    N, T, D = q.shape
    H = ln_w.shape[0]
    state = [s.clone() for s in state0]
    ckpt = [q.new_empty((N, NG if save else 1, *s.shape[1:]), dtype=torch.float32) for s in state0]
    out = _empty_like(q)
    common = dict(D=D, BS=bs, G=group, CAUSAL=causal, SAVE=save, LP=_bf16_products(q),
                  **_launch_options(mlp, D, bs))
    args = (q, k, v, eta, out, ln_w, ln_b, *state, *ckpt)
    if mlp and not _hopper_forward(q, causal, common, args, T, H, NG, eps, group, save):
        F, FC = 4 * D, _mlp_chunk_size(D, common["num_warps"], backward=False)
        # the programs of a chain exchange their partial sums in bf16 where the products are (v31)
        exchange = torch.bfloat16 if common["LP"] else torch.float32
        S, common = _mlp_launch(N, q, (D,), common, (min(F // FC, 4), F // FC), lambda opts: lambda f, i: (
            _mlp_fwd_kernel.warmup(*args, f.to(exchange), i, i, T, H, NG, eps, S=2, F=F, grid=(1,),
                                   CLUSTER=False, PRIMAL=_mlp_primal(causal, opts["num_warps"]), **opts)), False)
        primal = _mlp_primal(causal, common["num_warps"])
        xch = q.new_empty((N, 4, S, bs, D), dtype=exchange)
        cnt = torch.zeros(N, dtype=torch.int32, device=q.device)
        ok = torch.empty(N * S, dtype=torch.int32, device=q.device)
        cluster = _cluster_size(q, N, S, lambda: _mlp_fwd_kernel.warmup(
            *args, xch, cnt, ok, T, H, NG, eps, S=S, F=F, grid=(1,), CLUSTER=True, PRIMAL=primal, **common))
        _launch(_mlp_fwd_kernel, (N * S,), *args, xch, cnt, ok, T, H, NG, eps, S=S, F=F, cluster=cluster,
                PRIMAL=primal, CLUSTER=cluster > 1, **common)
        if S > 1 and not bool((ok > 0).all()):
            raise RuntimeError(f"TTT-MLP forward: the {S} programs of a chain were not resident together")
    elif not mlp:
        _launch(_linear_fwd_kernel, (N,), *args, T, H, NG, eps, **common)
    return out, state, ckpt


class _TTT(torch.autograd.Function):
    """Inputs: tokens `[N, T, D]`, eta `[N, T]`, LayerNorm `[H, D]` float32, state `[N, ...]` float32."""

    @staticmethod
    def forward(ctx, mlp, bs, causal, eps, group, q, k, v, eta, ln_w, ln_b, *state0):
        NG = triton.cdiv(triton.cdiv(q.shape[1], bs), group)
        # the results kept for this recompute (a checkpointed pass in its block's recompute), else the kernels'
        out, state, ckpt = memo.kept_or(lambda: _forward(mlp, bs, causal, eps, group, NG, q, k, v, eta, ln_w, ln_b,
                                                         state0, any(ctx.needs_input_grad)))
        if out.shape != q.shape:
            raise RuntimeError(f"TTT memo: kept results of shape {tuple(out.shape)} for inputs {tuple(q.shape)}")
        ctx.save_for_backward(q, k, v, eta, ln_w, ln_b, *ckpt)
        ctx.cfg = (mlp, bs, causal, eps, group, NG)
        return (out, *state)

    @staticmethod
    def backward(ctx, dout, *dstate):
        mlp, bs, causal, eps, group, NG = ctx.cfg
        q, k, v, eta, ln_w, ln_b, *ckpt = ctx.saved_tensors
        N, length, D = q.shape
        H = ln_w.shape[0]
        dout = dout.contiguous()
        # padded tokens (`mlp_backward_padding`) have eta 0 and no output gradient, so they change nothing,
        # as the kernel's own zero-filled tail rows do
        pad = mlp_backward_padding(length) if mlp else 0
        if pad:
            q, k, v, dout = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, dout))
            eta = torch.nn.functional.pad(eta, (0, pad))
        T = length + pad
        carry = [torch.zeros_like(c[:, 0]) if d is None else d.float().contiguous().clone()
                 for c, d in zip(ckpt, dstate)]
        dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
        deta = _empty_like(eta.float())
        common = dict(D=D, BS=bs, G=group, CAUSAL=causal, LP=_bf16_products(q), **_launch_options(mlp, D, bs))
        lns = _hopper_backward(q, causal, common, k, v, eta, dout, ln_w, ln_b, ckpt, carry, dq, dk, dv, deta, T, NG,
                               eps, group) if mlp else None
        if lns is not None:
            dlnw, dlnb = lns
        elif mlp:
            F = 4 * D
            low = torch.bfloat16 if common["LP"] else torch.float32  # the recomputed W1 and W2: products' operands
            head = (q, k, v, eta, dout, ln_w, ln_b, *ckpt)
            S, common = _mlp_launch(N, q, ("backward", D), common, (2, 2), lambda opts: lambda f, i: (
                _mlp_bwd_kernel.warmup(*head, f.to(low), f, f.to(low), f, *carry, f, f, dq, dk, dv, deta, f, f, i, i, T,
                                       H, NG, eps, S=2, F=F, grid=(1,), PRIMAL=_mlp_primal(causal, opts["num_warps"]),
                                       **opts)), True)
            primal = _mlp_primal(causal, common["num_warps"])
            states, par, scr = mlp_backward_scratch(N, S, group, bs, D, F, common["LP"], primal)
            scratch = [c.new_empty((*states, *c.shape[2:]), dtype=low if name in ("w1", "w2") else torch.float32)
                       for name, c in zip(MLP_KEYS, ckpt)]
            par, scr = (q.new_empty(shape, dtype=torch.float32) for shape in (par, scr))
            dlnw = q.new_empty((N * S, D), dtype=torch.float32)
            dlnb = torch.empty_like(dlnw)
            cnt = torch.zeros((N, 2), dtype=torch.int32, device=q.device)
            ok = torch.empty(N * S, dtype=torch.int32, device=q.device)
            _launch(_mlp_bwd_kernel, (N * S,), *head, *scratch, *carry, par, scr, dq, dk, dv, deta, dlnw, dlnb, cnt,
                    ok, T, H, NG, eps, S=S, F=F, PRIMAL=primal, **common)
            if S > 1 and not bool((ok > 0).all()):
                raise RuntimeError("TTT-MLP backward: the 2 programs of a chain were not resident together")
        else:
            S = 1
            dlnw, dlnb = _linear_backward(q, k, v, eta, dout, ln_w, ln_b, ckpt, carry, dq, dk, dv, deta, T, NG, eps,
                                          common)
        if lns is None:
            dlnw = dlnw.view(-1, H, S, D).sum((0, 2))
            dlnb = dlnb.view(-1, H, S, D).sum((0, 2))
        grads = (g[:, :length] for g in (dq, dk, dv, deta.to(eta.dtype)))
        return (None,) * 5 + (*grads, dlnw, dlnb, *carry)


def _linear_backward(q, k, v, eta, dout, ln_w, ln_b, ckpt, carry, dq, dk, dv, deta, T, NG, eps, common):
    """TTT-Linear's backward in windows of `LINEAR_WINDOW` checkpoint groups, newest first:
    `_linear_queries_kernel` recomputes a window's groups side by side (one program a chain and group) and
    runs their queries' halves, then `_linear_keys_kernel` carries the adjoint (`carry`, in place) back
    through the window, one program a chain; the queries' kernels a window ahead of the keys' on a stream
    of their own (`run_windows`, two sets of scratch), as in `hopper.backward`. Returns the LayerNorm weight
    and bias gradients' rows: `[N, D]` and `[N, D]`."""
    N, _, D = q.shape
    shapes = linear_backward_scratch(N, NG, common["G"], common["BS"], D)
    sets = [[q.new_empty(shape, dtype=torch.float32) for shape in shapes[:-1]] for _ in range(2)]
    qdln = q.new_empty(shapes[-1], dtype=torch.float32)  # the queries' halves' LayerNorm gradient rows
    dln = q.new_zeros((2, N, D), dtype=torch.float32)  # the keys' halves', summed in place
    qsum = torch.zeros_like(dln)
    wg, G, NM = shapes[-1][1] // N, common["G"], triton.cdiv(T, common["BS"])

    def queries(g_lo, ng, p):
        _launch(_linear_queries_kernel, (N * ng, ), q, k, v, eta, dout, ln_w, ln_b, *ckpt, *sets[p], dq, dk, *qdln, T,
                ln_w.shape[0], NG, g_lo, ng, eps, **common)
        qsum.add_(qdln[:, :N * ng].view(2, N, ng, D).sum(2))

    def keys(g_lo, ng, p):
        _launch(_linear_keys_kernel, (N, ), k, v, eta, ln_w, ln_b, *sets[p], *carry, dk, dv, deta, *dln, T,
                ln_w.shape[0], g_lo * G, min(NM, (g_lo + ng) * G), ng * G, eps, D=D, BS=common["BS"], LP=common["LP"],
                num_warps=common["num_warps"], num_stages=common["num_stages"])

    run_windows(q.device, NG, wg, queries, keys)
    return tuple(dln + qsum)


def run_windows(device, NG, wg, queries, keys):
    """The windowed backwards' schedule (`_linear_backward`, `hopper.backward`): for windows of `wg` of the
    `NG` checkpoint groups, newest first, `queries(g_lo, ng, p)` then `keys(g_lo, ng, p)` (groups g_lo to
    g_lo + ng - 1, scratch set p of two). On a GPU the keys' calls run in turn on a stream of the highest
    priority and the queries' calls on another, a window ahead: a window's keys wait for its queries, its
    queries for the keys of the window before the last (the same scratch set), and the caller's stream
    for both at the end. Elsewhere (the interpreter on the CPU) one after the other."""
    streams = _backward_streams(device) if device.type == "cuda" else None
    if streams:
        main = torch.cuda.current_stream(device)
        for stream in streams:
            stream.wait_stream(main)
    freed = [None, None]
    for i, g_lo in enumerate(reversed(range(0, NG, wg))):
        ng, p = min(wg, NG - g_lo), i % 2
        if not streams:
            queries(g_lo, ng, p)
            keys(g_lo, ng, p)
            continue
        with torch.cuda.stream(streams[1]):
            if freed[p] is not None:
                streams[1].wait_event(freed[p])
            queries(g_lo, ng, p)
            ready = streams[1].record_event()
        with torch.cuda.stream(streams[0]):
            streams[0].wait_event(ready)
            keys(g_lo, ng, p)
            freed[p] = streams[0].record_event()
    if streams:
        for stream in streams:
            main.wait_stream(stream)


@functools.cache
def _backward_streams(device):
    """`run_windows`' two streams on `device`: the keys' halves' at the highest priority, the queries'."""
    return torch.cuda.Stream(device, priority=-100), torch.cuda.Stream(device)


def ttt_triton(q, k, v, eta, weights, ln_weight, ln_bias, *, mini_batch_size, causal, eps, initial_state,
               return_state, checkpoint_group=16):
    B, H, T, D = q.shape
    if q.is_cuda and torch.version.hip:
        raise ValueError("triton TTT runs on NVIDIA GPUs (it uses their tanh instruction); use impl='torch'")
    if D not in HEAD_DIMS or mini_batch_size not in MINI_BATCH_SIZES:
        raise ValueError(f"triton TTT supports head dim {HEAD_DIMS} and mini-batch {MINI_BATCH_SIZES}, "
                         f"got {D} and {mini_batch_size}")
    if _over_shared_memory(q, "w2" in weights, mini_batch_size):
        raise ValueError(f"triton TTT: head dim {D} at mini-batch {mini_batch_size} in {q.dtype} needs more shared "
                         "memory than the GPU has; use a smaller mini-batch, 16-bit inputs or impl='torch'")
    N = B * H
    mlp, dtype = "w2" in weights, q.dtype
    if mlp and q.is_cuda and dtype == torch.float16:
        # Triton 3.6 miscompiles the float16 builds of the MLP forward (NOTES.md, v15); its products
        # round to bfloat16 either way
        q, eta = q.to(torch.bfloat16), eta.to(torch.bfloat16)
    k, v = k.to(q.dtype), v.to(q.dtype)  # one activation dtype (autocast may leave them mixed)
    keys = tuple(weights)
    if initial_state is None:
        state0 = [w.float().unsqueeze(0).expand(B, *w.shape).reshape(N, *w.shape[1:]) for w in weights.values()]
    else:
        state0 = [initial_state[n].float().reshape(N, *initial_state[n].shape[2:]) for n in keys]
    state0 = [s.contiguous() for s in state0]
    res = _TTT.apply(mlp, mini_batch_size, causal, float(eps), checkpoint_group,
                     q.reshape(N, T, D).contiguous(), k.reshape(N, T, D).contiguous(),
                     v.reshape(N, T, D).contiguous(), eta.reshape(N, T).contiguous(),
                     ln_weight.float().contiguous(), ln_bias.float().contiguous(), *state0)
    out = res[0].view(B, H, T, D).to(dtype)
    if not return_state:
        return out
    return out, {n: s.view(B, H, *s.shape[1:]) for n, s in zip(keys, res[1:])}


def ttt_mlp(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias, *, mini_batch_size=64, causal=False, eps=1e-6,
            initial_state=None, return_state=False, checkpoint_group=16):
    return ttt_triton(q, k, v, eta, dict(zip(MLP_KEYS, (w1, b1, w2, b2))), ln_weight, ln_bias,
                      mini_batch_size=mini_batch_size, causal=causal, eps=eps, initial_state=initial_state,
                      return_state=return_state, checkpoint_group=checkpoint_group)


def ttt_linear(q, k, v, eta, w1, b1, ln_weight, ln_bias, *, mini_batch_size=64, causal=False, eps=1e-6,
               initial_state=None, return_state=False, checkpoint_group=16):
    return ttt_triton(q, k, v, eta, dict(zip(LINEAR_KEYS, (w1, b1))), ln_weight, ln_bias,
                      mini_batch_size=mini_batch_size, causal=causal, eps=eps, initial_state=initial_state,
                      return_state=return_state, checkpoint_group=checkpoint_group)
