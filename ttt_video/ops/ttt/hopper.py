"""TTT-MLP forward for Hopper GPUs (compute capability 9.0), in Gluon: one program of two warp groups
a chain, for head dim 64, mini-batch 64, the primal form (not causal) and bf16 products, launched where
one program a chain keeps all chains resident and the portable `_mlp_fwd_kernel` would split each chain
over two programs (v32 and v33 in NOTES.md).

What Triton's `tl.dot` does not give and this kernel does (NOTES.md, "Not done / next"): the chain's W1
and W2 stay in shared memory as the bf16 operands of its products between mini-batches (the float32
state, in global memory as before, is read and written once a step, at its update); products take their
left operand from registers where it is there, so nothing is staged through shared memory for them;
products that do not depend on each other are issued together and waited for together (wgmma's
asynchronous form); the bias updates' column sums are products too (ones^T -G, v33), so no step sums
across warps for them; the next mini-batch's q, k and v are copied into shared memory while this one runs
(`cp.async`); and eight warps share each step's element-wise work. The math and its order are those of
the portable kernel, whose element-wise helpers it calls; the rounding points too, except that the bias
updates sum the bf16 operands of the weight updates (in float32) where the portable kernel sums float32.

An asynchronous product reads its register operand while it runs: that operand must stay alive up to the
wait that retires the product (listed in the wait's `deps`, as q is, or waited for right after the issue,
as the constant ones are). One that was not (v32's -G2 in registers) was overwritten in flight in builds
that allocated registers differently; those wrong builds had first been put down to their shared-memory
size (NOTES.md, v33).

Gluon has no interpreter: this kernel runs on the GPU only and is tested there against the reference.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .triton import _gelu, _gelu_d, _inner_grad, _load_eta, _mlp_out_rows

D_HOPPER = 64  # head dim, mini-batch size and hidden chunk of this kernel: one [64, 64] wgmma tile each
WARPS = 8
# names that later Tritons changed: `cp.async` into shared memory and the CTA's barrier (3.6's first)
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _mlp_fwd_hopper(q_ptr, k_ptr, v_ptr, eta_ptr, o_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                    cw1_ptr, cb1_ptr, cw2_ptr, cb2_ptr, T, H, NG, eps, F: gl.constexpr, G: gl.constexpr,
                    SAVE: gl.constexpr, num_warps: gl.constexpr):
    """Program `chain` walks the mini-batches as `_mlp_fwd_kernel` does at one program a chain, the hidden
    units in NCH chunks of 64. Shared memory: the W1 `[D, FC]` and W2 `[FC, D]` chunks in bf16, kept across
    mini-batches; k (two buffers: the next mini-batch's arrives while this one's takes part in its
    update), q and v; -G2, and a chunk's -G1 and X2 for its update. The biases' updates (products whose
    accumulator is the bias in every row) give tiles whose first row is stored; b1 is loaded a chunk ahead,
    b2 at the top of the step, so that their loads are not waited for."""
    D: gl.constexpr = 64
    BS: gl.constexpr = 64
    FC: gl.constexpr = 64
    NCH: gl.constexpr = F // FC
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                  instr_shape=[16, 256 // num_warps, 16])
    opa: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rowl: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    # the warp groups split each product's N in halves of 64 bytes: the swizzle must not be wider
    tile_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=512 // num_warps, element_bitwidth=16, rank=2)

    chain = gl.program_id(0).to(gl.int64)
    h = chain % H
    rows = gl.arange(0, BS, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, mma))
    trows = gl.arange(0, BS, layout=gl.SliceLayout(1, rowl))
    tcols = gl.arange(0, D, layout=gl.SliceLayout(0, rowl))
    lnw_ptr += h * D
    lnb_ptr += h * D
    w1_ptr += chain * D * F
    b1_ptr += chain * F
    w2_ptr += chain * F * D
    b2_ptr += chain * D
    q_ptr += chain * T * D
    k_ptr += chain * T * D
    v_ptr += chain * T * D
    o_ptr += chain * T * D
    eta_ptr += chain * T

    w1s = gl.allocate_shared_memory(gl.bfloat16, [NCH, D, FC], tile_l)
    w2s = gl.allocate_shared_memory(gl.bfloat16, [NCH, FC, D], tile_l)
    kb = gl.allocate_shared_memory(gl.bfloat16, [2, BS, D], tile_l)
    qb = gl.allocate_shared_memory(gl.bfloat16, [BS, D], tile_l)
    vb = gl.allocate_shared_memory(gl.bfloat16, [BS, D], tile_l)
    x2s = gl.allocate_shared_memory(gl.bfloat16, [BS, FC], tile_l)
    g1s = gl.allocate_shared_memory(gl.bfloat16, [BS, FC], tile_l)
    g2s = gl.allocate_shared_memory(gl.bfloat16, [BS, D], tile_l)
    for c in gl.static_range(NCH):
        w1s.index(c).store(gl.load(w1_ptr + rows[:, None] * F + c * FC + cols[None, :]).to(gl.bfloat16))
        w2s.index(c).store(gl.load(w2_ptr + (c * FC + rows[:, None]) * D + cols[None, :]).to(gl.bfloat16))
    _hopper_prefetch(q_ptr, k_ptr, v_ptr, qb, kb.index(0), vb, 0, T, trows, tcols, D)
    eta = _load_eta(eta_ptr, 0, T, rows)

    zero = gl.zeros([BS, D], gl.float32, layout=mma)
    ones = gl.full([BS, BS], 1.0, gl.bfloat16, layout=opa)  # column sums as products: ones^T X
    bcast = cols[None, :] + 0 * rows[:, None]  # a bias's addresses for a tile whose rows are all the bias
    first = rows[:, None] == 0  # the row that stores it
    NB = gl.cdiv(T, BS)
    b1n = gl.load(b1_ptr + cols)[None, :]  # the next chunk's b1, loaded a chunk ahead
    for n0 in range(0, NB if SAVE else 1, G if SAVE else 1):
        if SAVE:
            cg = chain * NG + n0 // G
            for c in gl.static_range(NCH):
                w1t = rows[:, None] * F + c * FC + cols[None, :]
                w2t = (c * FC + rows[:, None]) * D + cols[None, :]
                gl.store(cw1_ptr + cg * D * F + w1t, gl.load(w1_ptr + w1t))
                gl.store(cb1_ptr + cg * F + c * FC + cols, gl.load(b1_ptr + c * FC + cols))
                gl.store(cw2_ptr + cg * F * D + w2t, gl.load(w2_ptr + w2t))
            gl.store(cb2_ptr + cg * D + cols, gl.load(b2_ptr + cols))
        for n in range(n0, gl.minimum(n0 + G, NB) if SAVE else NB):
            t0 = n * BS
            kt = kb.index(n % 2)
            b2 = gl.load(b2_ptr + cols)[None, :]
            async_copy.wait_group(0)  # this mini-batch's k, q and v
            _handoff()
            # first pass: Z2 = gelu(k W1 + b1) W2
            part = zero
            for ch in range(NCH):
                b1 = b1n
                b1n = gl.load(b1_ptr + (ch + 1) % NCH * FC + cols)[None, :]
                z1 = warpgroup_mma(kt, w1s.index(ch), zero, use_acc=False, is_async=True)
                z1 = warpgroup_mma_wait(0, deps=(z1, ))
                x2 = gl.convert_layout(_gelu(z1 + b1, True).to(gl.bfloat16), opa)
                part = warpgroup_mma(x2, w2s.index(ch), part)
            z2 = part + b2
            target = vb.load(mma).to(gl.float32) - kt.load(mma).to(gl.float32)
            xh, rstd, dy, dxh, gr = _inner_grad(z2, target, gl.load(lnw_ptr + cols)[None, :],
                                                gl.load(lnb_ptr + cols)[None, :], D, eps)
            qa = qb.load(opa)
            _barrier()  # every thread's reads of q and v before the next mini-batch's copies
            _hopper_prefetch(q_ptr, k_ptr, v_ptr, qb, kb.index((n + 1) % 2), vb, t0 + BS, T, trows, tcols, D)
            g2 = eta[:, None] * gr
            eta = _load_eta(eta_ptr, t0 + BS, T, rows)  # the next mini-batch's
            g2 = (-g2).to(gl.bfloat16)  # the update's sign folded into its operands: W += X^T (-G)
            g2s.store(g2)
            _handoff()
            partq = warpgroup_mma(ones, g2s, zero + b2)  # b2's update, where Z_q2 starts
            gl.store(b2_ptr + bcast, partq, mask=first)
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
                g1 = p * gp  # -G1
                g1s.store(g1.to(gl.bfloat16))
                x2s.store(x2.to(gl.bfloat16))
                _handoff()
                w1 = warpgroup_mma(kt.permute((1, 0)), g1s, w1, is_async=True)
                w2 = warpgroup_mma(x2s.permute((1, 0)), g2s, w2, is_async=True)
                b1 = warpgroup_mma(ones, g1s, zero + b1, is_async=True)
                w1, w2, b1 = warpgroup_mma_wait(0, deps=(w1, w2, b1))
                gl.store(b1_ptr + ch * FC + bcast, b1, mask=first)
                gl.store(w1_ptr + rows[:, None] * F + ch * FC + cols[None, :], w1)
                gl.store(w2_ptr + (ch * FC + rows[:, None]) * D + cols[None, :], w2)
                w1s.index(ch).store(w1.to(gl.bfloat16))
                w2s.index(ch).store(w2.to(gl.bfloat16))
                _handoff()
                zq = warpgroup_mma(qa, w1s.index(ch), zero, use_acc=False, is_async=True)
                zq, qa = warpgroup_mma_wait(0, deps=(zq, qa))
                xq = gl.convert_layout(_gelu(zq + b1, True).to(gl.bfloat16), opa)
                partq = warpgroup_mma(xq, w2s.index(ch), partq)
            _mlp_out_rows(partq, q_ptr, o_ptr, t0, T, rows, cols, gl.load(lnw_ptr + cols)[None, :],
                          gl.load(lnb_ptr + cols)[None, :], D, eps)
    async_copy.wait_group(0)  # the last (masked) copies, before the program's shared memory is released


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


def forward(args, T, H, NG, eps, group, save, programs_per_sm, launch):
    """Runs the forward of `args` (`_mlp_fwd_kernel`'s first 15) where it applies: more chains than half
    the SMs (so the portable kernel would give a chain two programs or fewer) and all of them resident at
    one program each (`programs_per_sm(kernel, device)`); `launch` is `triton.py`'s `_launch`. Returns
    whether it ran."""
    q = args[0]
    N, F = q.shape[0], 4 * D_HOPPER
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if 2 * N <= sms:
        return False
    options = dict(F=F, G=group, SAVE=save, num_warps=WARPS)
    kernel = _mlp_fwd_hopper.warmup(*args, T, H, NG, eps, grid=(1, ), **options)
    if N > programs_per_sm(kernel, q.device) * sms:
        return False
    launch(_mlp_fwd_hopper, (N, ), *args, T, H, NG, eps, **options)
    return True
