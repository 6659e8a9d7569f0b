"""TTT-MLP forward and backward for Hopper GPUs (compute capability 9.0), in Gluon, for head dim 64,
mini-batch 64, the primal form (not causal) and bf16 products. The forward is one program of two warp
groups a chain, launched where one program a chain keeps all chains resident and the portable
`_mlp_fwd_kernel` would split each chain over two programs (v32 and v33 in NOTES.md), or two such programs
a chain, a thread-block cluster that splits the hidden units, where the chains are at most half the SMs
and more than a quarter (v37; the checkpoints stored from the update that makes each). The backward
(`backward`, v34) is two kernels in turn over windows of checkpoint groups: one recomputes a window's
groups side by side and runs their queries' halves, the other carries the adjoint back through the
window, one program a chain.

What Triton's `tl.dot` does not give and these kernels do (NOTES.md, "Not done / next"): the chain's W1
and W2 stay in shared memory as the bf16 operands of its products between mini-batches (the float32
state, in global memory as before, is read and written once a step, at its update; in the keys' kernel
each step's state is copied in during the step before); products take their
left operand from registers where it is there, so nothing is staged through shared memory for them;
products that do not depend on each other are issued together and waited for together (wgmma's
asynchronous form); the bias updates' column sums are products too (ones^T -G, v33), so no step sums
across warps for them; the next mini-batch's q, k and v are copied into shared memory while this one runs
(`cp.async`); the queries' kernel keeps each hidden chunk's X2 and GELU' in shared memory from the pass that
makes them to the pass that takes them (v38) and stores its bf16 tiles by TMA from shared memory (v39); and
eight warps share each step's element-wise work. The math and its order are those of
the portable kernels, whose element-wise helpers these call; the rounding points too, except that the
bias updates and the biases' adjoints sum the bf16 operands of the weights' products (in float32) where
the portable kernels sum float32, and the keys' kernel keeps the first pass's partial dZ1 in shared
memory (bf16, as the portable kernel's scratch holds it).

An asynchronous product reads its register operand while it runs: that operand must stay alive up to the
wait that retires the product (listed in the wait's `deps`, as q is, or waited for right after the issue,
as the constant ones are). One that was not (v32's -G2 in registers) was overwritten in flight in builds
that allocated registers differently; those wrong builds had first been put down to their shared-memory
size (NOTES.md, v33).

Gluon has no interpreter: these kernels run on the GPU only and are tested there against the reference.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .buffers import mlp_hopper_backward_scratch
from .triton import (_cluster_barrier, _gelu, _gelu_d, _gelu_parts, _inner_grad, _inner_grad_bwd, _ln, _ln_bwd,
                     _load_eta, _load_rows, _mlp_out_rows, _store_rows, run_windows)

D_HOPPER = 64  # head dim, mini-batch size and hidden chunk of this kernel: one [64, 64] wgmma tile each
WARPS = 8
# the kernels' layouts at WARPS warps (two warp groups): products' accumulators, their register left operand,
# row-major tiles for `cp.async`, and shared-memory tiles as wgmma operands
_MMA = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WARPS // 4], instr_shape=[16, 256 // WARPS, 16])
MMA = gl.constexpr(_MMA)
OPA = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA, k_width=2))
ROWS = gl.constexpr(gl.BlockedLayout([1, 8], [8, 4], [WARPS, 1], [1, 0]))
HALF = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0]))  # [32, 64]: half a tile's rows
# the warp groups split each product's N in halves of 64 bytes: the swizzle must not be wider
TILE = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=512 // WARPS, element_bitwidth=16, rank=2))
# names that later Tritons changed: `cp.async` into shared memory, the TMA store and the CTA's barrier (3.6's
# first)
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _mlp_fwd_hopper(q_ptr, k_ptr, v_ptr, eta_ptr, o_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                    cw1_ptr, cb1_ptr, cw2_ptr, cb2_ptr, xch_ptr, xb2_ptr, T, H, NG, eps, F: gl.constexpr,
                    G: gl.constexpr, SAVE: gl.constexpr, S: gl.constexpr, num_warps: gl.constexpr):
    """Program (chain, s) walks the mini-batches as `_mlp_fwd_kernel` does, the hidden units
    [s F / S, (s + 1) F / S) in NCH chunks of 64: S = 1, one program a chain, or S = 2, the chain's two
    programs a thread-block cluster that exchange their partial Z2 and Z_q2 through `xch` (as the portable
    kernel's, bf16) at the cluster's barrier, one a mini-batch, after which program s writes its half of the
    rows of mini-batch n - 1's output; each keeps its own b2 at `xb2_ptr` (they update it alike).
    Shared memory: the W1 `[D, FC]` and W2 `[FC, D]` chunks in bf16, kept across mini-batches; k (two
    buffers: the next mini-batch's arrives while this one's takes part in its update), q and v; -G2, and a
    chunk's -G1 and X2 for its update. The biases' updates (products whose accumulator is the bias in every
    row) give tiles whose first row is stored; b1 is loaded a chunk ahead, b2 at the top of the step, so that
    their loads are not waited for. With SAVE, each checkpoint is stored from the update that makes it (the
    first from the state as it comes in)."""
    D: gl.constexpr = 64
    BS: gl.constexpr = 64
    FC: gl.constexpr = 64
    NCH: gl.constexpr = F // FC // S

    pid = gl.program_id(0).to(gl.int64)
    chain = pid // S
    s = pid % S
    h = chain % H
    rows, cols, trows, tcols = _ranges()
    lnw_ptr += h * D
    lnb_ptr += h * D
    mine = s * NCH * FC  # the program's first hidden unit
    w1_ptr += chain * D * F + mine
    b1_ptr += chain * F + mine
    w2_ptr += chain * F * D + mine * D
    cw1_ptr += mine
    cb1_ptr += mine
    cw2_ptr += mine * D
    q_ptr += chain * T * D
    k_ptr += chain * T * D
    v_ptr += chain * T * D
    o_ptr += chain * T * D
    eta_ptr += chain * T
    xch_ptr += chain * 4 * S * BS * D
    tile = rows[:, None] * D + cols[None, :]
    b2_at = b2_ptr + chain * D
    if S > 1:  # the program's own b2
        b2_at = xb2_ptr + pid * D
        gl.store(b2_at + cols, gl.load(b2_ptr + chain * D + cols))

    w1s, w2s, kb, qb, vb, x2s, g1s, g2s = _step_buffers(NCH, 1)
    x2s = x2s.index(0)
    cg = chain * NG  # the first checkpoint: the state as it comes in
    for c in gl.static_range(NCH):
        w1t = rows[:, None] * F + c * FC + cols[None, :]
        w2t = (c * FC + rows[:, None]) * D + cols[None, :]
        w1 = gl.load(w1_ptr + w1t)
        w2 = gl.load(w2_ptr + w2t)
        w1s.index(c).store(w1.to(gl.bfloat16))
        w2s.index(c).store(w2.to(gl.bfloat16))
        if SAVE:
            gl.store(cw1_ptr + cg * D * F + w1t, w1)
            gl.store(cb1_ptr + cg * F + c * FC + cols, gl.load(b1_ptr + c * FC + cols))
            gl.store(cw2_ptr + cg * F * D + w2t, w2)
    if SAVE:
        if s == 0:
            gl.store(cb2_ptr + cg * D + cols, gl.load(b2_at + cols))
    _hopper_prefetch(q_ptr, k_ptr, v_ptr, qb, kb.index(0), vb, 0, T, trows, tcols, D)
    eta = _load_eta(eta_ptr, 0, T, rows)

    zero = gl.zeros([BS, D], gl.float32, layout=MMA)
    ones = gl.full([BS, BS], 1.0, gl.bfloat16, layout=OPA)  # column sums as products: ones^T X
    bcast = cols[None, :] + 0 * rows[:, None]  # a bias's addresses for a tile whose rows are all the bias
    first = rows[:, None] == 0  # the row that stores it
    patience = pid.to(gl.int32) * 0  # what the cluster's barrier orders
    NB = gl.cdiv(T, BS)
    b1n = gl.load(b1_ptr + cols)[None, :]  # the next chunk's b1, loaded a chunk ahead
    for n in range(0, NB):
        t0 = n * BS
        kt = kb.index(n % 2)
        b2 = gl.load(b2_at + cols)[None, :]
        async_copy.wait_group(0)  # this mini-batch's k, q and v
        _handoff()
        # first pass: Z2 = gelu(k W1 + b1) W2 (not `_chunk_pass`: keeping X2 and GELU' for the update is
        # slower here, NOTES.md after v38)
        part = zero
        for ch in range(NCH):
            b1 = b1n
            b1n = gl.load(b1_ptr + (ch + 1) % NCH * FC + cols)[None, :]
            z1 = warpgroup_mma(kt, w1s.index(ch), zero, use_acc=False, is_async=True)
            z1 = warpgroup_mma_wait(0, deps=(z1, ))
            x2 = gl.convert_layout(_gelu(z1 + b1, True).to(gl.bfloat16), OPA)
            part = warpgroup_mma(x2, w2s.index(ch), part)
        if S > 1:  # the chain's partial sums, in a fixed order in every program
            gl.store(xch_ptr + ((n % 2) * S + s) * BS * D + tile, part.to(gl.bfloat16))
            patience = _cluster_barrier(patience)
            if n > 0:
                _out_half(xch_ptr, q_ptr, o_ptr, lnw_ptr, lnb_ptr, n - 1, T, s, eps, S)
            z2 = zero + b2
            for j in gl.static_range(S):
                z2 += gl.load(xch_ptr + ((n % 2) * S + j) * BS * D + tile + patience).to(gl.float32)
        else:
            z2 = part + b2
        target = vb.load(MMA).to(gl.float32) - kt.load(MMA).to(gl.float32)
        xh, rstd, dy, dxh, gr = _inner_grad(z2, target, gl.load(lnw_ptr + cols)[None, :],
                                            gl.load(lnb_ptr + cols)[None, :], D, eps)
        qa = qb.load(OPA)
        _barrier()  # every thread's reads of q and v before the next mini-batch's copies
        _hopper_prefetch(q_ptr, k_ptr, v_ptr, qb, kb.index((n + 1) % 2), vb, t0 + BS, T, trows, tcols, D)
        g2 = eta[:, None] * gr
        eta = _load_eta(eta_ptr, t0 + BS, T, rows)  # the next mini-batch's
        g2 = (-g2).to(gl.bfloat16)  # the update's sign folded into its operands: W += X^T (-G)
        g2s.store(g2)
        _handoff()
        partq = warpgroup_mma(ones, g2s, zero + b2)  # b2's update, where Z_q2 starts
        gl.store(b2_at + bcast, partq, mask=first)
        if SAVE:
            keep = ((n + 1) % G == 0) & (n + 1 < NB)  # the updated state opens a checkpoint group
            cg = chain * NG + (n + 1) // G
            if keep & (s == 0):
                gl.store(cb2_ptr + cg * D + bcast, partq, mask=first)
        if S > 1:
            if s > 0:  # the bias counts once in the chain's Z_q2
                partq = zero
        # second pass: each chunk's update, then the queries through the updated chunk
        for ch in range(NCH):
            p = warpgroup_mma(g2s, w2s.index(ch).permute((1, 0)), zero, use_acc=False, is_async=True)
            z1 = warpgroup_mma(kt, w1s.index(ch), zero, use_acc=False, is_async=True)
            w1 = gl.load(w1_ptr + rows[:, None] * F + ch * FC + cols[None, :])
            w2 = gl.load(w2_ptr + (ch * FC + rows[:, None]) * D + cols[None, :])
            b1 = b1n
            b1n = gl.load(b1_ptr + (ch + 1) % NCH * FC + cols)[None, :]  # at the last, the next step's first
            p, z1 = warpgroup_mma_wait(0, deps=(p, z1))
            x2, gp = _gelu_d(z1 + b1, True)
            g1s.store((p * gp).to(gl.bfloat16))  # -G1
            x2s.store(x2.to(gl.bfloat16))
            w1, w2, b1 = _chunk_update(kt, g2s, g1s, x2s, ones, zero, w1, w2, b1)
            gl.store(b1_ptr + ch * FC + bcast, b1, mask=first)
            gl.store(w1_ptr + rows[:, None] * F + ch * FC + cols[None, :], w1)
            gl.store(w2_ptr + (ch * FC + rows[:, None]) * D + cols[None, :], w2)
            if SAVE:
                if keep:
                    gl.store(cb1_ptr + cg * F + ch * FC + bcast, b1, mask=first)
                    gl.store(cw1_ptr + cg * D * F + rows[:, None] * F + ch * FC + cols[None, :], w1)
                    gl.store(cw2_ptr + cg * F * D + (ch * FC + rows[:, None]) * D + cols[None, :], w2)
            w1s.index(ch).store(w1.to(gl.bfloat16))
            w2s.index(ch).store(w2.to(gl.bfloat16))
            _handoff()
            zq = warpgroup_mma(qa, w1s.index(ch), zero, use_acc=False, is_async=True)
            zq, qa = warpgroup_mma_wait(0, deps=(zq, qa))
            xq = gl.convert_layout(_gelu(zq + b1, True).to(gl.bfloat16), OPA)
            partq = warpgroup_mma(xq, w2s.index(ch), partq)
        if S > 1:
            gl.store(xch_ptr + ((2 + n % 2) * S + s) * BS * D + tile, partq.to(gl.bfloat16))
        else:
            _mlp_out_rows(partq, q_ptr, o_ptr, t0, T, rows, cols, gl.load(lnw_ptr + cols)[None, :],
                          gl.load(lnb_ptr + cols)[None, :], D, eps)
    if S > 1:
        patience = _cluster_barrier(patience)
        _out_half(xch_ptr, q_ptr, o_ptr + patience, lnw_ptr, lnb_ptr, NB - 1, T, s, eps, S)
        if s == 0:
            gl.store(b2_ptr + chain * D + cols, gl.load(b2_at + cols))
    async_copy.wait_group(0)  # the last (masked) copies, before the program's shared memory is released


@gluon.jit
def _out_half(xch_ptr, q_ptr, o_ptr, lnw_ptr, lnb_ptr, n, T, s, eps, S: gl.constexpr):
    """Program s's rows of mini-batch n's output, from the sum of the chain's S = 2 partial Z_q2 in `xch`."""
    gl.static_assert(S == 2)
    rows = s * 32 + gl.arange(0, 32, layout=gl.SliceLayout(1, HALF))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, HALF))
    zq2 = gl.zeros([32, 64], gl.float32, layout=HALF)
    for j in gl.static_range(S):
        zq2 += gl.load(xch_ptr + ((2 + n % 2) * S + j) * 64 * 64 + rows[:, None] * 64 + cols[None, :]).to(gl.float32)
    _mlp_out_rows(zq2, q_ptr, o_ptr, n * 64, T, rows, cols, gl.load(lnw_ptr + cols)[None, :],
                  gl.load(lnb_ptr + cols)[None, :], 64, eps)


@gluon.jit
def _ranges():
    """A [64, 64] tile's row and column indices in the products' layout (MMA) and in the row-major one (ROWS)."""
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, MMA))
    trows = gl.arange(0, 64, layout=gl.SliceLayout(1, ROWS))
    tcols = gl.arange(0, 64, layout=gl.SliceLayout(0, ROWS))
    return rows, cols, trows, tcols


@gluon.jit
def _step_buffers(NCH: gl.constexpr, NX: gl.constexpr):
    """The shared memory of a forward step (`_mlp_fwd_hopper`, `_mlp_queries_hopper`): the W1 `[D, FC]` and W2
    `[FC, D]` chunks in bf16, k (two buffers), q and v, NX chunks' X2, a chunk's -G1, and -G2."""
    w1s = gl.allocate_shared_memory(gl.bfloat16, [NCH, 64, 64], TILE)
    w2s = gl.allocate_shared_memory(gl.bfloat16, [NCH, 64, 64], TILE)
    kb = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 64], TILE)
    qb = gl.allocate_shared_memory(gl.bfloat16, [64, 64], TILE)
    vb = gl.allocate_shared_memory(gl.bfloat16, [64, 64], TILE)
    x2s = gl.allocate_shared_memory(gl.bfloat16, [NX, 64, 64], TILE)
    g1s = gl.allocate_shared_memory(gl.bfloat16, [64, 64], TILE)
    g2s = gl.allocate_shared_memory(gl.bfloat16, [64, 64], TILE)
    return w1s, w2s, kb, qb, vb, x2s, g1s, g2s


@gluon.jit
def _chunk_pass(xs, w1c, w2c, x2c, gpc, zero, b1, part):
    """A hidden chunk of a pass through the state: part + gelu(X W1 + b1) W2, with X (k, or q) in xs and the
    chunk's W1 and W2 in w1c and w2c; X2 = gelu(X W1 + b1) and GELU'(X W1 + b1) are kept in x2c and gpc (bf16
    and float16) for what takes them later (the chunk's update, the query path's reverse), so that it need
    not run X W1 and the GELU again."""
    z1 = warpgroup_mma(xs, w1c, zero, use_acc=False, is_async=True)
    z1 = warpgroup_mma_wait(0, deps=(z1, ))
    x2, gp = _gelu_d(z1 + b1, True)
    x2 = x2.to(gl.bfloat16)
    x2c.store(x2)
    gpc.store(gp.to(gl.float16))
    return warpgroup_mma(gl.convert_layout(x2, OPA), w2c, part)


@gluon.jit
def _chunk_update(kt, g2s, g1s, x2s, ones, zero, w1, w2, b1):
    """A hidden chunk's update with -G2, -G1 and X2 in g2s, g1s and x2s (each thread's writes not yet fenced):
    W1 += k^T (-G1), W2 += X2^T (-G2) and b1 += ones^T (-G1) as a tile whose rows are all the bias. `ones` is
    the ones tile in registers or shared memory; a register one is left out of the wait's `deps`, the wait
    following its product at once."""
    _handoff()
    w1 = warpgroup_mma(kt.permute((1, 0)), g1s, w1, is_async=True)
    w2 = warpgroup_mma(x2s.permute((1, 0)), g2s, w2, is_async=True)
    b1 = warpgroup_mma(ones, g1s, zero + b1, is_async=True)
    return warpgroup_mma_wait(0, deps=(w1, w2, b1))


@gluon.jit
def _handoff():
    """Every thread's shared-memory writes before the products (asynchronous proxy) that read them."""
    fence_async_shared()
    _barrier()


@gluon.jit
def _hopper_prefetch(q_ptr, k_ptr, v_ptr, qb, kb, vb, t0, T, rows, cols, D: gl.constexpr):
    """Starts copying the rows of q, k and v from token t0 into shared memory (zeros past T)."""
    at = (t0 + rows)[:, None] * D + cols[None, :]
    m = ((t0 + rows) < T)[:, None]
    _async_load(kb, k_ptr + at, mask=m)
    _async_load(qb, q_ptr + at, mask=m)
    _async_load(vb, v_ptr + at, mask=m)
    async_copy.commit_group()


@gluon.jit
def _keys_prefetch(k_ptr, w1_ptr, w2_ptr, kb, w1s, w2s, t0, T, F: gl.constexpr, trows, tcols, D: gl.constexpr,
                   NCH: gl.constexpr):
    """Starts copying the rows of k from token t0 and the bf16 W1, W2 of a state into shared memory."""
    m = ((t0 + trows) < T)[:, None]
    _async_load(kb, k_ptr + (t0 + trows)[:, None] * D + tcols[None, :], mask=m)
    for c in gl.static_range(NCH):
        _async_load(w1s.index(c), w1_ptr + trows[:, None] * F + c * 64 + tcols[None, :])
        _async_load(w2s.index(c), w2_ptr + (c * 64 + trows[:, None]) * D + tcols[None, :])
    async_copy.commit_group()


@gluon.jit
def _adj_prefetch(dw1_ptr, dw2_ptr, pl, stg32, stg16, c, F: gl.constexpr, trows, tcols, D: gl.constexpr):
    """Starts copying chunk c of the adjoint's float32 W1 and W2 (at dw*_ptr) into `stg32` and of the queries'
    half's bf16 parts of them (at pl, chunk by chunk: `_mlp_queries_hopper`) into `stg16`."""
    w2t = (c * 64 + trows[:, None]) * D + tcols[None, :]  # also chunk c's tile of a part
    _async_load(stg32.index(0), dw1_ptr + trows[:, None] * F + c * 64 + tcols[None, :])
    _async_load(stg16.index(0), pl + w2t)
    _async_load(stg32.index(1), dw2_ptr + w2t)
    _async_load(stg16.index(1), pl + D * F + w2t)
    async_copy.commit_group()


@gluon.jit
def _mlp_keys_hopper(k_ptr, v_ptr, eta_ptr, lnw_ptr, lnb_ptr, sw1_ptr, sb1_ptr, sw2_ptr,
                     dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, par_ptr, parl_ptr, dk_ptr, dv_ptr, deta_ptr,
                     dlnw_ptr, dlnb_ptr, T, H, n_lo, n_hi, NSLOT, eps, F: gl.constexpr, PEND: gl.constexpr,
                     num_warps: gl.constexpr):
    """Program `chain` runs the keys' half (`triton.py`'s `_mlp_bwd_keys` in the primal form) of mini-batches
    n_hi - 1 down to n_lo: the adjoint at dw*_ptr moves from the state after each to the state before it,
    whose W1 and W2 (bf16) and b1 are at slot n - n_lo of sw*_ptr / sb1_ptr, and the queries' half's results at
    the same slot of par_ptr (`_mlp_queries_hopper`; parl_ptr is the same memory as bf16). Stores dk, dv
    and deta, and adds the inner LayerNorm's gradients to the chain's rows at dlnw_ptr / dlnb_ptr.
    Shared memory: the state's W1 and W2 chunks (the next state's copied in by `cp.async` at the end of
    the step), k (two buffers), -G2 (then dZ2), a chunk's bf16 adjoint and its gradient tiles, the first
    pass's partial dZ1 of every chunk for the second, and a stage into which `cp.async` brings the next
    chunk's float32 adjoint of W1 and W2 and the queries' parts of it while the current chunk runs (the
    first pass's loads were ~50 ms of its 256 at 63 s and 96 chains; NOTES.md, v35). The products' signs
    are folded into their operands where the portable kernel subtracts."""
    D: gl.constexpr = 64
    BS: gl.constexpr = 64
    FC: gl.constexpr = 64
    NCH: gl.constexpr = F // FC
    P_B1: gl.constexpr = D * F  # float32 units
    P_B2: gl.constexpr = P_B1 + F
    P_Z2: gl.constexpr = P_B2 + D

    chain = gl.program_id(0).to(gl.int64)
    h = chain % H
    rows, cols, trows, tcols = _ranges()
    wtile = rows[:, None] * F + cols[None, :]  # a [D, FC] chunk of W1 (plus c * FC)
    vtile = rows[:, None] * D + cols[None, :]  # a [FC, D] chunk of W2 (plus c * FC * D), or a [BS, D] tile
    bcast = cols[None, :] + 0 * rows[:, None]
    first = rows[:, None] == 0
    lnw = gl.load(lnw_ptr + h * D + cols)[None, :]
    lnb = gl.load(lnb_ptr + h * D + cols)[None, :]
    dw1_ptr += chain * D * F
    db1_ptr += chain * F
    dw2_ptr += chain * F * D
    db2_ptr += chain * D
    sw1_ptr += chain * NSLOT * D * F
    sb1_ptr += chain * NSLOT * F
    sw2_ptr += chain * NSLOT * F * D
    par_ptr += chain * NSLOT * PEND
    parl_ptr += chain * NSLOT * PEND * 2
    k_ptr += chain * T * D
    v_ptr += chain * T * D
    eta_ptr += chain * T
    dk_ptr += chain * T * D
    dv_ptr += chain * T * D
    deta_ptr += chain * T

    w1s = gl.allocate_shared_memory(gl.bfloat16, [NCH, D, FC], TILE)
    w2s = gl.allocate_shared_memory(gl.bfloat16, [NCH, FC, D], TILE)
    kb = gl.allocate_shared_memory(gl.bfloat16, [2, BS, D], TILE)
    g2s = gl.allocate_shared_memory(gl.bfloat16, [BS, D], TILE)
    ones = gl.allocate_shared_memory(gl.bfloat16, [BS, BS], TILE)
    dw1s = gl.allocate_shared_memory(gl.bfloat16, [D, FC], TILE)
    dw2s = gl.allocate_shared_memory(gl.bfloat16, [FC, D], TILE)
    g1s = gl.allocate_shared_memory(gl.bfloat16, [BS, FC], TILE)
    x2s = gl.allocate_shared_memory(gl.bfloat16, [BS, FC], TILE)
    dps = gl.allocate_shared_memory(gl.bfloat16, [BS, FC], TILE)
    dz1s = gl.allocate_shared_memory(gl.bfloat16, [NCH, BS, FC], TILE)
    stg32 = gl.allocate_shared_memory(gl.float32, [2, D, FC],
                                      gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2))
    stg16 = gl.allocate_shared_memory(gl.bfloat16, [2, D, FC], TILE)

    zero = gl.zeros([BS, D], gl.float32, layout=MMA)
    ones.store(gl.full([BS, BS], 1.0, gl.bfloat16, layout=MMA))
    dlnw = gl.zeros([D], gl.float32, layout=gl.SliceLayout(0, MMA))
    dlnb = gl.zeros([D], gl.float32, layout=gl.SliceLayout(0, MMA))
    n = n_hi - 1
    _keys_prefetch(k_ptr, sw1_ptr + (n - n_lo) * D * F, sw2_ptr + (n - n_lo) * F * D, kb.index(n % 2), w1s, w2s,
                   n * BS, T, F, trows, tcols, D, NCH)
    _adj_prefetch(dw1_ptr, dw2_ptr, parl_ptr + (n - n_lo) * PEND * 2, stg32, stg16, 0, F, trows, tcols, D)
    for jj in range(0, n_hi - n_lo):
        n = n_hi - 1 - jj
        t0 = n * BS
        at = n - n_lo
        kt = kb.index(n % 2)
        b1_ptr = sb1_ptr + at * F
        pb = par_ptr + at * PEND
        pl = parl_ptr + at * PEND * 2
        k = _load_rows(k_ptr, t0, T, rows, cols, D)
        target = _load_rows(v_ptr, t0, T, rows, cols, D) - k
        eta = _load_eta(eta_ptr, t0, T, rows)[:, None]
        xh, rstd, dy, dxh, gr = _inner_grad(gl.load(pb + P_Z2 + vtile), target, lnw, lnb, D, eps)
        g2 = eta * gr
        db2 = gl.load(db2_ptr + cols)[None, :] + gl.load(pb + P_B2 + cols)[None, :]
        dg2 = zero - db2
        dk = zero
        async_copy.wait_group(0)  # this step's k and state
        g2s.store(g2.to(gl.bfloat16))
        # first pass: the adjoint through the update of each chunk
        for c in range(NCH):
            db1 = gl.load(db1_ptr + c * FC + cols)[None, :] + gl.load(pb + P_B1 + c * FC + cols)[None, :]
            b1 = gl.load(b1_ptr + c * FC + cols)[None, :]
            async_copy.wait_group(0)  # this chunk's adjoint and queries' parts
            _barrier()  # ... from every thread; the last chunk's products are done with the single buffers
            dw1 = stg32.index(0).load(MMA) + stg16.index(0).load(MMA).to(gl.float32)
            dw2 = stg32.index(1).load(MMA) + stg16.index(1).load(MMA).to(gl.float32)
            dw1s.store(dw1.to(gl.bfloat16))
            dw2s.store(dw2.to(gl.bfloat16))
            _handoff()
            if c + 1 < NCH:
                _adj_prefetch(dw1_ptr, dw2_ptr, pl, stg32, stg16, c + 1, F, trows, tcols, D)
            z1 = warpgroup_mma(kt, w1s.index(c), zero, use_acc=False, is_async=True)
            p = warpgroup_mma(g2s, w2s.index(c).permute((1, 0)), zero, use_acc=False, is_async=True)
            a = warpgroup_mma(kt, dw1s, zero, use_acc=False, is_async=True)
            e = warpgroup_mma(g2s, dw2s.permute((1, 0)), zero, use_acc=False, is_async=True)
            z1, p, a, e = warpgroup_mma_wait(0, deps=(z1, p, a, e))
            gl.store(dw1_ptr + c * FC + wtile, dw1)
            gl.store(db1_ptr + c * FC + bcast, db1 + zero, mask=first)
            x2, gp, gpp = _gelu_parts(z1 + b1, True)
            dg1 = -a - db1
            dp = dg1 * gp
            g1s.store((-(p * gp)).to(gl.bfloat16))
            x2s.store((-x2).to(gl.bfloat16))
            dps.store(dp.to(gl.bfloat16))
            dz1s.index(c).store((dg1 * p * gpp - e * gp).to(gl.bfloat16))
            _handoff()
            dk = warpgroup_mma(g1s, dw1s.permute((1, 0)), dk, is_async=True)
            dg2 = warpgroup_mma(x2s, dw2s, dg2, is_async=True)
            dg2 = warpgroup_mma(dps, w2s.index(c), dg2, is_async=True)
            dw2 = warpgroup_mma(dps.permute((1, 0)), g2s, dw2, is_async=True)
            dk, dg2, dw2 = warpgroup_mma_wait(0, deps=(dk, dg2, dw2))
            gl.store(dw2_ptr + c * FC * D + vtile, dw2)
        # reverse mode of the inner gradient
        deta = gl.sum(dg2 * gr, 1)
        dz2, d_dy, dlw, dlb = _inner_grad_bwd(eta * dg2, xh, rstd, dy, dxh, lnw, D)
        dlnw += dlw
        dlnb += dlb
        gl.store(deta_ptr + t0 + rows, deta, mask=(t0 + rows) < T)
        _barrier()  # the first pass's products are done with -G2's buffer, which holds dZ2 from here
        dz2s = g2s
        dz2s.store(dz2.to(gl.bfloat16))
        _handoff()
        db2 = warpgroup_mma(ones, dz2s, zero + db2)
        gl.store(db2_ptr + bcast, db2, mask=first)
        # second pass: the key path
        for c in range(NCH):
            z1 = warpgroup_mma(kt, w1s.index(c), zero, use_acc=False, is_async=True)
            r = warpgroup_mma(dz2s, w2s.index(c).permute((1, 0)), zero, use_acc=False, is_async=True)
            dw1 = gl.load(dw1_ptr + c * FC + wtile)
            dw2 = gl.load(dw2_ptr + c * FC * D + vtile)
            db1 = gl.load(db1_ptr + c * FC + cols)[None, :] + zero
            b1 = gl.load(b1_ptr + c * FC + cols)[None, :]
            z1, r = warpgroup_mma_wait(0, deps=(z1, r))
            x2, gp = _gelu_d(z1 + b1, True)
            dz1 = dz1s.index(c).load(MMA).to(gl.float32) + r * gp
            _barrier()  # the last chunk's products are done with g1s and x2s
            g1s.store(dz1.to(gl.bfloat16))
            x2s.store(x2.to(gl.bfloat16))
            _handoff()
            dk = warpgroup_mma(g1s, w1s.index(c).permute((1, 0)), dk, is_async=True)
            dw1 = warpgroup_mma(kt.permute((1, 0)), g1s, dw1, is_async=True)
            db1 = warpgroup_mma(ones, g1s, db1, is_async=True)
            dw2 = warpgroup_mma(x2s.permute((1, 0)), dz2s, dw2, is_async=True)
            dk, dw1, db1, dw2 = warpgroup_mma_wait(0, deps=(dk, dw1, db1, dw2))
            gl.store(dw1_ptr + c * FC + wtile, dw1)
            gl.store(db1_ptr + c * FC + bcast, db1, mask=first)
            gl.store(dw2_ptr + c * FC * D + vtile, dw2)
        _barrier()  # every product is done with this state and k
        if n > n_lo:
            m = n - 1
            _keys_prefetch(k_ptr, sw1_ptr + (m - n_lo) * D * F, sw2_ptr + (m - n_lo) * F * D, kb.index(m % 2),
                           w1s, w2s, m * BS, T, F, trows, tcols, D, NCH)
            _adj_prefetch(dw1_ptr, dw2_ptr, pl - PEND * 2, stg32, stg16, 0, F, trows, tcols, D)
        _store_rows(dk_ptr, dk + d_dy, t0, T, rows, cols, D)
        _store_rows(dv_ptr, -d_dy, t0, T, rows, cols, D)
    gl.store(dlnw_ptr + chain * D + cols, gl.load(dlnw_ptr + chain * D + cols) + dlnw)
    gl.store(dlnb_ptr + chain * D + cols, gl.load(dlnb_ptr + chain * D + cols) + dlnb)
    async_copy.wait_group(0)


@gluon.jit
def _state_out(sw1_desc, sw2_desc, w1s, w2s, slot, c, F: gl.constexpr):
    """TMA stores of chunk c of the bf16 state in w1s and w2s (written, fenced, then a barrier) to `slot`."""
    _tma_store(sw1_desc, [(slot * 64).to(gl.int32), c * 64], w1s.index(c))
    _tma_store(sw2_desc, [(slot * F + c * 64).to(gl.int32), 0], w2s.index(c))


@gluon.jit
def _parts_out(parl_desc, stage, slot, c, PROW: gl.constexpr, P_W2: gl.constexpr):
    """TMA stores of chunk c's parts of W1's and W2's adjoint from the stage (written, fenced, then a barrier)
    to `slot`'s tiles (PROW rows of 64 a slot, W2's part from its row P_W2; W1's chunk by chunk too)."""
    row = (slot * PROW + c * 64).to(gl.int32)
    _tma_store(parl_desc, [row, 0], stage.index(c % 2 * 2))
    _tma_store(parl_desc, [row + P_W2, 0], stage.index(c % 2 * 2 + 1))


@gluon.jit
def _mlp_queries_hopper(q_ptr, k_ptr, v_ptr, eta_ptr, do_ptr, dq_ptr, lnw_ptr, lnb_ptr, cw1_ptr, cb1_ptr, cw2_ptr,
                        cb2_ptr, run_ptr, sw1_desc, sb1_ptr, sw2_desc, sb2_ptr, par_ptr, parl_desc, dlnw_ptr,
                        dlnb_ptr, T, H, NG, g_lo, WG, eps, F: gl.constexpr, G: gl.constexpr, PEND: gl.constexpr,
                        num_warps: gl.constexpr):
    """Program (chain, gw) recomputes group g_lo + gw from its checkpoint: for each of its mini-batches it
    writes the state before (slot gw * G + j of the window's scratch) and what the keys' half takes from
    the queries' half (Z2, the query path's part of the adjoint of the state after), and stores dq.
    The bf16 tiles (the states' W1 and W2, the parts of the adjoint's) go out as TMA stores from shared
    memory (`backward`'s descriptors: `[64, 64]` tiles of the scratch seen as rows of F or 64): the states'
    from the tiles the products read, the parts' through a stage of two buffers, each chunk's issued after
    the next chunk's first barrier."""
    D: gl.constexpr = 64
    BS: gl.constexpr = 64
    FC: gl.constexpr = 64
    NCH: gl.constexpr = F // FC
    P_B1: gl.constexpr = D * F
    P_B2: gl.constexpr = P_B1 + F
    P_Z2: gl.constexpr = P_B2 + D
    PROW: gl.constexpr = PEND * 2 // 64  # a slot's rows in parl_desc
    PW2: gl.constexpr = D * F // 64  # the first of them that holds W2's part
    gl.static_assert(PEND * 2 % 64 == 0)

    pid = gl.program_id(0)
    chain = (pid // WG).to(gl.int64)
    gw = pid % WG
    g = g_lo + gw
    h = chain % H
    rows, cols, trows, tcols = _ranges()
    wtile = rows[:, None] * F + cols[None, :]
    vtile = rows[:, None] * D + cols[None, :]
    bcast = cols[None, :] + 0 * rows[:, None]
    first = rows[:, None] == 0
    lnw = gl.load(lnw_ptr + h * D + cols)[None, :]
    lnb = gl.load(lnb_ptr + h * D + cols)[None, :]
    NB = gl.cdiv(T, BS)
    n0 = g * G
    L = gl.minimum(G, NB - n0)
    cg = chain * NG + g
    w1_ptr = run_ptr + pid.to(gl.int64) * (2 * D * F + F + D)
    b1_ptr = w1_ptr + D * F
    w2_ptr = b1_ptr + F
    b2_ptr = w2_ptr + F * D
    slot0 = chain * WG * G + gw * G
    q_ptr += chain * T * D
    k_ptr += chain * T * D
    v_ptr += chain * T * D
    do_ptr += chain * T * D
    dq_ptr += chain * T * D
    eta_ptr += chain * T

    # every chunk's X2 and GELU'(Z1) from the first pass for its update, then X_q2 and GELU'(Z_q1) for the
    # query path's reverse
    w1s, w2s, kb, qb, vb, x2c, g1s, g2s = _step_buffers(NCH, NCH)
    gpc = gl.allocate_shared_memory(gl.float16, [NCH, 64, 64], TILE)
    # two buffers of a chunk's parts of W1's and W2's adjoint (buffer b: tiles 2 b and 2 b + 1)
    stage = gl.allocate_shared_memory(gl.bfloat16, [4, 64, 64], TILE)
    ones = gl.allocate_shared_memory(gl.bfloat16, [BS, BS], TILE)
    ones.store(gl.full([BS, BS], 1.0, gl.bfloat16, layout=MMA))
    for c in gl.static_range(NCH):
        cw1 = gl.load(cw1_ptr + cg * D * F + c * FC + wtile)
        cw2 = gl.load(cw2_ptr + cg * F * D + c * FC * D + vtile)
        cb1 = gl.load(cb1_ptr + cg * F + c * FC + cols)
        gl.store(w1_ptr + c * FC + wtile, cw1)
        gl.store(w2_ptr + c * FC * D + vtile, cw2)
        gl.store(b1_ptr + c * FC + cols, cb1)
        gl.store(sb1_ptr + slot0 * F + c * FC + cols, cb1)
        w1s.index(c).store(cw1.to(gl.bfloat16))
        w2s.index(c).store(cw2.to(gl.bfloat16))
    _handoff()
    for c in gl.static_range(NCH):
        _state_out(sw1_desc, sw2_desc, w1s, w2s, slot0, c, F)
    b2c = gl.load(cb2_ptr + cg * D + cols)
    gl.store(b2_ptr + cols, b2c)
    gl.store(sb2_ptr + slot0 * D + cols, b2c)
    _hopper_prefetch(q_ptr, k_ptr, v_ptr, qb, kb.index(0), vb, n0 * BS, T, trows, tcols, D)
    eta = _load_eta(eta_ptr, n0 * BS, T, rows)

    zero = gl.zeros([BS, D], gl.float32, layout=MMA)
    dlnw = gl.zeros([D], gl.float32, layout=gl.SliceLayout(0, MMA))
    dlnb = gl.zeros([D], gl.float32, layout=gl.SliceLayout(0, MMA))
    for j in range(0, L):
        n = n0 + j
        t0 = n * BS
        slot = slot0 + j
        pb = par_ptr + slot * PEND
        kt = kb.index(j % 2)
        b2 = gl.load(b2_ptr + cols)[None, :]
        async_copy.wait_group(0)
        _handoff()
        if j > 0:
            _parts_out(parl_desc, stage, slot - 1, NCH - 1, PROW, PW2)
        part = zero
        for ch in range(NCH):
            b1 = gl.load(b1_ptr + ch * FC + cols)[None, :]
            part = _chunk_pass(kt, w1s.index(ch), w2s.index(ch), x2c.index(ch), gpc.index(ch), zero, b1, part)
        z2 = part + b2
        gl.store(pb + P_Z2 + vtile, z2)
        target = vb.load(MMA).to(gl.float32) - kt.load(MMA).to(gl.float32)
        xh, rstd, dy, dxh, gr = _inner_grad(z2, target, lnw, lnb, D, eps)
        g2 = (-(eta[:, None] * gr)).to(gl.bfloat16)
        g2s.store(g2)
        _handoff()
        partq = warpgroup_mma(ones, g2s, zero + b2)  # b2's update, where Z_q2 starts
        gl.store(b2_ptr + bcast, partq, mask=first)
        nxt = j + 1 < L
        if nxt:
            gl.store(sb2_ptr + (slot + 1) * D + bcast, partq, mask=first)
        tma.store_wait(0)  # the TMA stores so far are done with w1s and w2s (the chunks' handoffs then order it)
        for ch in range(NCH):
            p = warpgroup_mma(g2s, w2s.index(ch).permute((1, 0)), zero, use_acc=False, is_async=True)
            w1 = gl.load(w1_ptr + ch * FC + wtile)
            w2 = gl.load(w2_ptr + ch * FC * D + vtile)
            b1 = gl.load(b1_ptr + ch * FC + cols)[None, :]
            gp = gpc.index(ch).load(MMA).to(gl.float32)
            p = warpgroup_mma_wait(0, deps=(p, ))
            g1s.store((p * gp).to(gl.bfloat16))  # -G1
            w1, w2, b1 = _chunk_update(kt, g2s, g1s, x2c.index(ch), ones, zero, w1, w2, b1)
            gl.store(b1_ptr + ch * FC + bcast, b1, mask=first)
            gl.store(w1_ptr + ch * FC + wtile, w1)
            gl.store(w2_ptr + ch * FC * D + vtile, w2)
            if nxt:
                gl.store(sb1_ptr + (slot + 1) * F + ch * FC + bcast, b1, mask=first)
            w1s.index(ch).store(w1.to(gl.bfloat16))
            w2s.index(ch).store(w2.to(gl.bfloat16))
            _handoff()
            if nxt:
                _state_out(sw1_desc, sw2_desc, w1s, w2s, slot + 1, ch, F)
            # the queries through the updated chunk; its X_q2 and GELU'(Z_q1) replace X2's and GELU'(Z1)'s (the
            # update's products are done: the handoff above) for the query path's reverse
            partq = _chunk_pass(qb, w1s.index(ch), w2s.index(ch), x2c.index(ch), gpc.index(ch), zero, b1, partq)
        # the output's LayerNorm, then the query path's reverse through the updated state
        do = _load_rows(do_ptr, t0, T, rows, cols, D)
        xhq, rstdq = _ln(partq, D, eps)
        dlnw += gl.sum(do * xhq, 0)
        dlnb += gl.sum(do, 0)
        dzq2 = _ln_bwd(do * lnw, xhq, rstdq, D)
        _barrier()  # every product is done with g2s
        g2s.store(dzq2.to(gl.bfloat16))
        _handoff()
        qb2 = warpgroup_mma(ones, g2s, zero)
        gl.store(pb + P_B2 + bcast, qb2, mask=first)
        dq = do
        for ch in range(NCH):
            r = warpgroup_mma(g2s, w2s.index(ch).permute((1, 0)), zero, use_acc=False, is_async=True)
            gpq = gpc.index(ch).load(MMA).to(gl.float32)
            r = warpgroup_mma_wait(0, deps=(r, ))
            _barrier()  # the last chunk's products are done with g1s; its parts are in the stage
            if ch > 0:
                _parts_out(parl_desc, stage, slot, ch - 1, PROW, PW2)
            g1s.store((r * gpq).to(gl.bfloat16))
            tma.store_wait(2)  # all but the last chunk's parts: the stage's other buffer is free after the handoff
            _handoff()
            dq = warpgroup_mma(g1s, w1s.index(ch).permute((1, 0)), dq, is_async=True)
            qw1 = warpgroup_mma(qb.permute((1, 0)), g1s, zero, use_acc=False, is_async=True)
            qb1 = warpgroup_mma(ones, g1s, zero, use_acc=False, is_async=True)
            qw2 = warpgroup_mma(x2c.index(ch).permute((1, 0)), g2s, zero, use_acc=False, is_async=True)
            dq, qw1, qb1, qw2 = warpgroup_mma_wait(0, deps=(dq, qw1, qb1, qw2))
            stage.index(ch % 2 * 2).store(qw1.to(gl.bfloat16))
            stage.index(ch % 2 * 2 + 1).store(qw2.to(gl.bfloat16))
            fence_async_shared()  # for the TMA stores after the next barrier
            gl.store(pb + P_B1 + ch * FC + bcast, qb1, mask=first)
        _store_rows(dq_ptr, dq, t0, T, rows, cols, D)
        _barrier()  # every thread's reads of q, k and v before the next mini-batch's copies
        _hopper_prefetch(q_ptr, k_ptr, v_ptr, qb, kb.index((j + 1) % 2), vb, t0 + BS, T, trows, tcols, D)
        eta = _load_eta(eta_ptr, t0 + BS, T, rows)
    _parts_out(parl_desc, stage, slot0 + L - 1, NCH - 1, PROW, PW2)  # after the last step's barrier
    gl.store(dlnw_ptr + pid * D + cols, dlnw)
    gl.store(dlnb_ptr + pid * D + cols, dlnb)
    async_copy.wait_group(0)
    tma.store_wait(0)


def forward(args, T, H, NG, eps, group, save, programs_per_sm, launch, cluster_size):
    """Runs the forward of `args` (`_mlp_fwd_kernel`'s first 15) where it applies: one program a chain where
    the chains outnumber half the SMs and all of them are resident at once (`programs_per_sm(kernel, device)`),
    two a chain as a thread-block cluster where they are at most half the SMs but more than a quarter and the
    GPU holds all N clusters at once (`cluster_size(q, N, 2, build)`, `triton.py`'s `_cluster_size`; v37).
    Fewer chains keep the portable kernel, four programs a chain, one an SM, which is faster there.
    `launch` is `triton.py`'s `_launch`. Returns whether it ran."""
    q = args[0]
    N, F = q.shape[0], 4 * D_HOPPER
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if 4 * N <= sms:
        return False
    S = 2 if 2 * N <= sms else 1
    xch = q.new_empty((N, 4, S, D_HOPPER, D_HOPPER)) if S > 1 else q  # unread at S = 1
    xb2 = q.new_empty((N * S, D_HOPPER), dtype=torch.float32) if S > 1 else q
    options = dict(F=F, G=group, SAVE=save, S=S, num_warps=WARPS)
    kernel = _mlp_fwd_hopper.warmup(*args, xch, xb2, T, H, NG, eps, grid=(1, ), **options)
    if S == 1 and N > programs_per_sm(kernel, q.device) * sms:
        return False
    if S > 1 and cluster_size(q, N, S, lambda: kernel) != S:
        return False
    launch(_mlp_fwd_hopper, (N * S, ), *args, xch, xb2, T, H, NG, eps, cluster=S, **options)
    return True


def backward(q, k, v, eta, dout, ln_w, ln_b, ckpt, carry, dq, dk, dv, deta, T, NG, eps, group):
    """The MLP backward of `triton.py`'s `_TTT` where the forward ran `_mlp_fwd_hopper`'s kind of inputs, in
    windows of `HOPPER_WINDOW` checkpoint groups, newest first: `_mlp_queries_hopper` recomputes a window's
    groups side by side (one program a chain and group) and runs their queries' halves, then
    `_mlp_keys_hopper` carries the adjoint (`carry`, in place) back through the window, one program a
    chain, the queries' kernels a window ahead of the keys' on a stream of their own (`run_windows`), so that
    they fill the SMs the keys' programs leave.
    Returns the LayerNorm weight and bias gradients `[H, D]`."""
    N, H, D, F = q.shape[0], ln_w.shape[0], D_HOPPER, 4 * D_HOPPER
    shapes = mlp_hopper_backward_scratch(N, NG, group, D, F, D_HOPPER)
    low = q.new_empty(shapes["low"], dtype=torch.bfloat16)
    sb1, sb2, par, run, ln = (q.new_empty(shapes[name], dtype=torch.float32)
                              for name in ("b1", "b2", "par", "run", "ln"))
    wg = shapes["run"][0] // N
    pend = shapes["par"][-1]
    dln = q.new_zeros((2, N, D), dtype=torch.float32)  # the keys' halves' LayerNorm gradients
    qdln = torch.zeros_like(dln)  # the queries' halves'
    NB = -(-T // D_HOPPER)

    tiles = [(TensorDescriptor.from_tensor(low[p, 0].view(-1, F), [D, D], TILE.value),
              TensorDescriptor.from_tensor(low[p, 1].view(-1, D), [D, D], TILE.value),
              TensorDescriptor.from_tensor(par[p].view(torch.bfloat16).view(-1, D), [D, D], TILE.value))
             for p in range(2)]  # the queries' kernel's TMA stores: the states' W1 and W2, the adjoint's parts

    def queries(g_lo, ng, p):
        sw1, sw2, parl = tiles[p]
        _mlp_queries_hopper[(N * ng, )](q, k, v, eta, dout, dq, ln_w, ln_b, *ckpt, run, sw1, sb1[p], sw2, sb2[p],
                                        par[p], parl, *ln, T, H, NG, g_lo, ng, eps, F=F, G=group, PEND=pend,
                                        num_warps=WARPS)
        qdln.add_(ln[:, :N * ng].view(2, N, ng, D).sum(2))

    def keys(g_lo, ng, p):
        _mlp_keys_hopper[(N, )](k, v, eta, ln_w, ln_b, low[p, 0], sb1[p], low[p, 1], *carry, par[p],
                                par[p].view(torch.bfloat16), dk, dv, deta, *dln, T, H, g_lo * group,
                                min(NB, (g_lo + ng) * group), ng * group, eps, F=F, PEND=pend, num_warps=WARPS)

    run_windows(q.device, NG, wg, queries, keys)
    dln += qdln
    return tuple(dln.view(2, -1, H, D).sum(1))
