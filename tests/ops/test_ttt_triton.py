"""Triton TTT kernels against the float64 reference: outputs, final state and every gradient.

Without CUDA the kernels run in Triton's interpreter, which must be switched on before triton is
first imported (the kernel module is imported lazily, inside the tests). Where something imported
triton earlier in this process (diffusers does), the file reruns itself in a fresh process. With
CUDA the same small cases run compiled on the GPU, plus realistic sizes in bfloat16.
"""

import os
import subprocess
import sys
import types

import pytest
import torch

CUDA = torch.cuda.is_available()
STALE = not CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if CUDA else "cpu"
triton = pytest.importorskip("triton")
tl = triton.language

B, H, D, MB = 2, 2, 16, 16
TOL = 2e-3 if CUDA else 1e-4  # float32 matrix products run as tf32 on GPU


@triton.jit
def _exact_tanh(x, FAST: tl.constexpr):
    """The kernels' `_tanh` without the GPU's instruction, which the interpreter lacks."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _rounded_operand(x, LP: tl.constexpr):
    """The kernels' `_operand` for the interpreter, whose bf16 `tl.dot` is wrong: operands rounded to
    bf16 as on the GPU, multiplied in float32."""
    if LP:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


@pytest.mark.skipif(not STALE, reason="triton not imported before the interpreter was switched on")
def test_in_fresh_process():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    r = subprocess.run(cmd, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _module():
    if STALE:
        pytest.skip("triton was imported before the interpreter was switched on: see test_in_fresh_process")
    from ttt_video.ops.ttt import triton as triton_impl

    return triton_impl


def _kernels(monkeypatch):
    triton_impl = _module()
    monkeypatch.setattr(triton_impl, "_empty_like", lambda x: torch.full_like(x, float("nan")))
    monkeypatch.setattr(triton_impl, "_mlp_chunk_size", lambda d, warps, backward: 16)  # several hidden chunks at D=16
    return triton_impl


def _inputs(kind, T, seed, batch=B, dim=D, dtype=torch.float64, device="cpu", eta_scale=0.2):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)

    q, k, v = (r(batch, H, T, dim) for _ in range(3))
    eta = (torch.rand(batch, H, T, generator=g, dtype=torch.float64) * eta_scale).to(device, dtype)
    if kind == "mlp":
        weights = [r(H, dim, 4 * dim, scale=0.3), r(H, 1, 4 * dim, scale=0.1), r(H, 4 * dim, dim, scale=0.3),
                   r(H, 1, dim, scale=0.1)]
    else:
        weights = [r(H, dim, dim, scale=0.3), r(H, 1, dim, scale=0.1)]
    return [q, k, v, eta, *weights, r(H, dim, scale=0.1, shift=1.0), r(H, dim, scale=0.1)]


def _names(kind):
    return ["q", "k", "v", "eta", *(("w1", "b1", "w2", "b2") if kind == "mlp" else ("w1", "b1")), "ln_w", "ln_b"]


def _run(module, kind, args, state=None, **kw):
    """Output, final state and gradients of a fixed random loss over both, for `args` and `state`."""
    args = [a.detach().requires_grad_() for a in args]
    init = None if state is None else {n: s.detach().requires_grad_() for n, s in state.items()}
    fn = module.ttt_mlp if kind == "mlp" else module.ttt_linear
    out, final = fn(*args, initial_state=init, return_state=True, **kw)
    g = torch.Generator().manual_seed(123)

    def probe(x):
        return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)

    loss = (out * probe(out)).sum() + sum((s * probe(s)).sum() for s in final.values())
    leaves = args if init is None else args[:4] + args[-2:] + list(init.values())  # weights unused
    return out, final, torch.autograd.grad(loss, leaves)


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _check(name, got, ref, tol):
    assert not got.isnan().any(), f"{name}: NaN (unwritten element?)"
    assert got.shape == ref.shape, name
    assert _rel(got, ref) < tol, f"{name}: rel err {_rel(got, ref):.2e}"


def _assert_matches_reference(tri, kind, causal, T, mb):
    from ttt_video.ops.ttt import reference

    args = _inputs(kind, T, seed=T + causal)
    out_r, state_r, grads_r = _run(reference, kind, args, mini_batch_size=mb, causal=causal)
    args32 = [a.float().to(DEVICE) for a in args]
    out, state, grads = _run(tri, kind, args32, mini_batch_size=mb, causal=causal, checkpoint_group=2)
    assert out.dtype == torch.float32
    _check("out", out, out_r, TOL)
    for n in state_r:
        assert state[n].dtype == torch.float32
        _check(f"state {n}", state[n], state_r[n], TOL)
    for name, gt, gr in zip(_names(kind), grads, grads_r):
        _check(f"grad {name}", gt, gr, TOL)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,mb", [(37, 16), (75, 32)])
def test_matches_reference(monkeypatch, kind, causal, T, mb):
    _assert_matches_reference(_kernels(monkeypatch), kind, causal, T, mb)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_backward_over_windows_of_groups_matches_reference(monkeypatch, causal):
    """TTT-Linear's backward walks windows of `LINEAR_WINDOW` checkpoint groups, newest first (the
    queries' halves of a window's groups side by side, then the keys' halves carrying the adjoint): 19
    mini-batches of 16 in groups of 2 are windows of 4, 4 and 2 groups, the last mini-batch partial."""
    from ttt_video.ops.ttt import reference
    from ttt_video.ops.ttt.buffers import LINEAR_WINDOW

    assert LINEAR_WINDOW == 4
    tri = _kernels(monkeypatch)
    args = _inputs("linear", 300, seed=11)
    out_r, state_r, grads_r = _run(reference, "linear", args, mini_batch_size=16, causal=causal)
    out, state, grads = _run(tri, "linear", [a.float().to(DEVICE) for a in args], mini_batch_size=16,
                             causal=causal, checkpoint_group=2)
    _check("out", out, out_r, TOL)
    for name, gt, gr in zip(_names("linear"), grads, grads_r):
        _check(f"grad {name}", gt, gr, TOL)


@pytest.mark.parametrize("primal", [False, True])
@pytest.mark.parametrize("T,mb", [(37, 16), (75, 32)])
def test_mlp_forms_match_reference(monkeypatch, primal, T, mb):
    """Both forms of the non-causal MLP kernels (`_mlp_primal`), whichever warps the launch picks."""
    tri = _kernels(monkeypatch)
    monkeypatch.setattr(tri, "_mlp_primal", lambda causal, warps: primal)
    _assert_matches_reference(tri, "mlp", False, T, mb)


@pytest.mark.skipif(CUDA, reason="the CUDA tests run the bf16 builds themselves")
@pytest.mark.parametrize("causal", [False, True])
def test_mlp_bf16_product_builds_match_reference(monkeypatch, causal):
    """The builds for 16-bit inputs, whose MLP backward keeps its recomputed W1, W2 and the queries'
    half's largest results in bf16 buffers (layouts of their own), in the interpreter."""
    from ttt_video.ops.ttt import reference

    tri = _kernels(monkeypatch)
    monkeypatch.setattr(tri, "_tanh", _exact_tanh)
    monkeypatch.setattr(tri, "_operand", _rounded_operand)
    monkeypatch.setattr(tri, "_bf16_products", lambda q: True)
    monkeypatch.setattr(tri, "_mlp_primal", lambda causal, warps: not causal)  # as the GPU's 4-warp builds
    args = _inputs("mlp", 37, seed=3)
    out_r, state_r, grads_r = _run(reference, "mlp", args, mini_batch_size=16, causal=causal)
    out, state, grads = _run(tri, "mlp", [a.float() for a in args], mini_batch_size=16, causal=causal,
                             checkpoint_group=2)
    _check("out", out, out_r, 3e-2)  # one bf16 rounding of every product's operands: ~1e-2 here
    for n in state_r:
        _check(f"state {n}", state[n], state_r[n], 3e-2)
    for name, gt, gr in zip(_names("mlp"), grads, grads_r):
        _check(f"grad {name}", gt, gr, 3e-2)


@pytest.mark.skipif(CUDA, reason="float32 at head dim 128 is the PyTorch path on GPUs; see the 16-bit CUDA test")
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_head_dim_128_matches_reference(monkeypatch, kind):
    from ttt_video.ops.ttt import reference

    chunk = _module()._mlp_chunk_size
    tri = _kernels(monkeypatch)
    monkeypatch.setattr(tri, "_mlp_chunk_size", chunk)  # the GPU's chunks: 64 units
    args = _inputs(kind, 20, seed=11, batch=1, dim=128, eta_scale=0.02)
    out_r, state_r, grads_r = _run(reference, kind, args, mini_batch_size=16, causal=False)
    out, state, grads = _run(tri, kind, [a.float().to(DEVICE) for a in args], mini_batch_size=16, causal=False)
    _check("out", out, out_r, TOL)
    for n in state_r:
        _check(f"state {n}", state[n], state_r[n], TOL)
    for name, gt, gr in zip(_names(kind), grads, grads_r):
        _check(f"grad {name}", gt, gr, TOL)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_initial_state_and_carry(monkeypatch, kind):
    from ttt_video.ops.ttt import reference

    tri = _kernels(monkeypatch)
    args = _inputs(kind, 45, seed=7)
    n_w = len(args) - 6
    keys = ("w1", "b1", "w2", "b2")[:n_w]
    g = torch.Generator().manual_seed(8)
    state = {n: (w.unsqueeze(0) + 0.05 * torch.randn(B, *w.shape, generator=g, dtype=w.dtype))
             for n, w in zip(keys, args[4:4 + n_w])}
    kw = dict(mini_batch_size=MB, causal=True)
    out_r, final_r, grads_r = _run(reference, kind, args, state, **kw)
    args32 = [a.float().to(DEVICE) for a in args]
    state32 = {n: s.float().to(DEVICE) for n, s in state.items()}
    out, final, grads = _run(tri, kind, args32, state32, **kw)
    _check("out", out, out_r, TOL)
    for n in keys:
        _check(f"state {n}", final[n], final_r[n], TOL)
    names = ["q", "k", "v", "eta", "ln_w", "ln_b"] + [f"initial {n}" for n in keys]
    assert len(grads) == len(names)
    for name, gt, gr in zip(names, grads, grads_r):
        _check(f"grad {name}", gt, gr, TOL)

    fn = tri.ttt_mlp if kind == "mlp" else tri.ttt_linear
    cut = 2 * MB
    first, mid = fn(*[a[:, :, :cut] if i < 4 else a for i, a in enumerate(args32)], initial_state=state32,
                    return_state=True, **kw)
    second, end = fn(*[a[:, :, cut:] if i < 4 else a for i, a in enumerate(args32)], initial_state=mid,
                     return_state=True, **kw)
    _check("carried out", torch.cat([first, second], 2), out_r, TOL)
    for n in keys:
        _check(f"carried state {n}", end[n], final_r[n], TOL)


def test_supports_and_errors():
    triton_impl = _module()

    assert not triton_impl.supports(torch.zeros(1, 1, 8, 64))
    assert not triton_impl.supports(torch.zeros(1, 1, 8, 64, dtype=torch.float64, device=DEVICE))
    if CUDA:
        assert triton_impl.supports(torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16, device=DEVICE))
        assert not triton_impl.supports(torch.zeros(1, 1, 8, 48, dtype=torch.bfloat16, device=DEVICE))
        assert triton_impl.supports(torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16, device=DEVICE))
        assert not triton_impl.supports(torch.zeros(1, 1, 8, 256, dtype=torch.bfloat16, device=DEVICE))
        assert not triton_impl.supports(torch.zeros(1, 1, 8, 64, device=DEVICE), mlp=True)  # float32 MLP
        assert triton_impl.supports(torch.zeros(1, 1, 8, 64, device=DEVICE), mlp=False)
        assert not triton_impl.supports(torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16, device=DEVICE),
                                        mini_batch_size=24)
    args = _inputs("linear", 20, seed=0)
    with pytest.raises(ValueError, match="mini-batch"):
        triton_impl.ttt_linear(*args, mini_batch_size=24)


def test_mlp_hidden_chunks_follow_the_launch_warps():
    """Hidden chunks of D / 2 (at least 16), but a backward of more than 4 warps never below 64 units
    (at most D): its 32-unit builds read shared memory out of bounds on an H100 (8 warps at head dim
    64, 16 warps at mini-batch 128). The launch options carry the chunk chosen for their warps; the
    backward's also carry the stages of its keys' second pass."""
    chunk = _module()._mlp_chunk_size
    assert [chunk(d, 4, True) for d in (16, 32, 64, 128)] == [16, 16, 32, 64]
    assert [chunk(d, w, True) for d, w in ((16, 8), (32, 8), (64, 8), (64, 16), (128, 8))] == [16, 32, 64, 64, 64]
    assert [chunk(d, w, False) for d, w in ((64, 4), (64, 8), (64, 16), (128, 8))] == [32, 32, 32, 64]
    common = dict(D=64, BS=64, num_warps=8)
    S, opts = _module()._mlp_launch(4, torch.zeros(1), ("backward", 64), common, (2, 2), lambda opts: None, True)
    assert (S, opts["num_warps"], opts["FC"]) == (1, 8, 64)  # one program a chain where programs run in turn
    # the backward's options carry the stages of its keys' second pass: pipelined in the 4-warp builds only
    assert opts["KS"] == 1 and [_module()._mlp_keys_stages(w) for w in (4, 8, 16)] == [2, 1, 1]


@pytest.mark.parametrize("fast", [False, True] if CUDA else [False])
def test_gelu_parts_are_the_tanh_gelu_and_its_derivatives(fast):
    """The kernels' GELU value, first and second derivative against autograd of PyTorch's tanh GELU;
    `fast` is the GPU's tanh instruction, taken when the products are bf16."""
    _module()
    from .gelu_probe import gelu_parts_kernel

    z = torch.linspace(-6.0, 6.0, 1024, dtype=torch.float64, requires_grad=True)
    g0 = torch.nn.functional.gelu(z, approximate="tanh")
    (g1,) = torch.autograd.grad(g0.sum(), z, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), z)
    out = torch.empty(3 * z.numel(), device=DEVICE)
    gelu_parts_kernel[(1,)](z.detach().float().to(DEVICE), out, N=z.numel(), FAST=fast)
    # float32 arithmetic; with the fast tanh (relative error 2^-11) the worst case over this range is
    # 1.5e-3, 1.3e-2 and 0.12 (the derivatives scale the error of 1 - t^2 by factors up to ~100)
    tols = (2e-3, 2e-2, 0.15) if fast else (2e-5,) * 3
    for name, got, ref, tol in zip(("value", "first derivative", "second derivative"), out.view(3, -1).cpu(),
                                   (g0, g1, g2), tols):
        err = (got.double() - ref.detach()).abs().max().item()
        assert err < tol, f"{name}: max abs error {err:.1e}"

@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim,mb,dtype", [(64, 64, torch.bfloat16), (64, 16, torch.bfloat16),
                                          (64, 128, torch.bfloat16), (64, 64, torch.float16),
                                          (128, 64, torch.bfloat16), (128, 128, torch.bfloat16),
                                          (32, 64, torch.bfloat16), (32, 128, torch.bfloat16),
                                          (16, 16, torch.bfloat16)])
def test_cuda_16bit_realistic(kind, causal, dim, mb, dtype):
    _check_16bit(_module(), kind, causal, dim, mb, dtype)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("slices", [1, 2])
def test_cuda_mlp_forward_split_over_fewer_programs(monkeypatch, causal, slices):
    """Two chains get S = 4 programs each in the forward (the test above); more chains get fewer, down
    to one (no exchange). Each S gives the reference's outputs, states and gradients."""
    triton_impl = _module()
    most = triton_impl._mlp_slices
    monkeypatch.setattr(triton_impl, "_mlp_slices", lambda N, m, q, key, warmup: (
        most(N, m, q, key, warmup) if key[0] == "backward" else min(m, slices)))
    _check_16bit(triton_impl, "mlp", causal, 64, 64, torch.bfloat16)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="needs thread-block clusters")
def test_cuda_mlp_forward_cluster_barrier_matches_the_counters(monkeypatch):
    """On a GPU with thread-block clusters a chain's programs in the split forward are one cluster and meet
    at its barrier; the portable build (a counter a chain in global memory) gives the same outputs and
    final states, bit for bit."""
    triton_impl = _module()
    args = [a.to(torch.bfloat16) if i < 4 else a.float()
            for i, a in enumerate(_inputs("mlp", 1000, seed=6, batch=1, dim=64, device="cuda", eta_scale=0.02))]
    clusters = []
    launch = triton_impl._launch
    monkeypatch.setattr(triton_impl, "_launch", lambda fn, grid, *a, cluster=1, **kw: (
        clusters.append(cluster) if fn is triton_impl._mlp_fwd_kernel else None, launch(fn, grid, *a, cluster=cluster, **kw)))
    clustered = _run(triton_impl, "mlp", args, mini_batch_size=64, causal=False)
    monkeypatch.setattr(triton_impl, "_cluster_size", lambda q, N, S, build: 1)
    counted = _run(triton_impl, "mlp", args, mini_batch_size=64, causal=False)
    assert clusters == [4, 1]
    assert torch.equal(clustered[0], counted[0])
    for name in clustered[1]:
        assert torch.equal(clustered[1][name], counted[1][name]), name


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="needs thread-block clusters")
def test_cuda_driver_places_the_forward_clusters(monkeypatch):
    """The driver's count of the split forward's clusters that fit at once (`_max_active_clusters`) decides
    whether a launch's chains are clusters; on a GPU of 132 SMs (H100 SXM) all of the 48 (S = 4) and 96
    (S = 2) chains of the 48-head layer fit. None of a size beyond the portable 8, which the driver does
    not place."""
    triton_impl = _module()
    monkeypatch.setattr(triton_impl, "_hopper_forward", lambda *args: False)  # 96 chains: the Hopper kernel's
    seen = []
    size = triton_impl._cluster_size
    monkeypatch.setattr(triton_impl, "_cluster_size", lambda q, N, S, build: (
        seen.append((N, S, build)), size(q, N, S, build))[1])
    for batch in (24, 48):
        args = [a.to(torch.bfloat16) if i < 4 else a.float() for i, a in enumerate(
            _inputs("mlp", 256, seed=7, batch=batch, dim=64, device="cuda", eta_scale=0.02))]
        with torch.no_grad():
            triton_impl.ttt_mlp(*args, mini_batch_size=64)
    counts = [triton_impl._max_active_clusters(build(), S) for N, S, build in seen]
    for (N, S, build), count in zip(seen, counts):
        assert count > 0
        assert size(args[0], N, S, build) == (S if count >= N else 1)
    if torch.cuda.get_device_properties(0).multi_processor_count >= 132:
        assert [(N, S) for N, S, _ in seen] == [(48, 4), (96, 2)]
        assert counts[0] >= 48 and counts[1] >= 96
    assert triton_impl._max_active_clusters(seen[0][2](), 16) == 0


def test_mlp_forward_clusters_where_the_gpu_has_them(monkeypatch):
    """`_cluster_size`: a split forward's S programs a chain form one cluster on compute capability 9 and
    up, up to 8 (the portable cluster size), where the driver places all N clusters at once; one program a
    chain, older GPUs, the CPU and a GPU (or partition) with room for fewer clusters keep the counters."""
    triton_impl = _module()
    gpu = types.SimpleNamespace(is_cuda=True, device=0)
    room = {2: 132, 4: 60, 8: 0}
    monkeypatch.setattr(triton_impl, "_max_active_clusters", lambda kernel, cluster: room[cluster])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert [triton_impl._cluster_size(gpu, 48, S, lambda: None) for S in (1, 2, 4, 8, 16)] == [1, 2, 4, 1, 1]
    assert [triton_impl._cluster_size(gpu, N, 4, lambda: None) for N in (60, 61)] == [4, 1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert triton_impl._cluster_size(gpu, 48, 4, lambda: None) == 1
    assert triton_impl._cluster_size(torch.zeros(1), 48, 4, lambda: None) == 1


def _check_16bit(triton_impl, kind, causal, dim, mb, dtype, batch=1):
    from ttt_video.ops.ttt import torch as torch_impl

    args = _inputs(kind, 1000, seed=3, batch=batch, dim=dim, device="cuda", eta_scale=0.02)
    low = [a.to(dtype) if i < 4 else a.float() for i, a in enumerate(args)]
    if dim == 128 and mb == 128:  # over the shared memory of an H100: refused, the PyTorch path takes it
        assert not triton_impl.supports(low[0], mlp=kind == "mlp", mini_batch_size=mb)
        with pytest.raises(ValueError, match="shared memory"):
            _run(triton_impl, kind, low, mini_batch_size=mb, causal=causal)
        return
    out_r, state_r, grads_r = _run(torch_impl, kind, args, mini_batch_size=mb, causal=causal)
    out, state, grads = _run(triton_impl, kind, low, mini_batch_size=mb, causal=causal)
    assert out.dtype == dtype
    _check("out", out, out_r, 1e-2)
    for n in state_r:
        _check(f"state {n}", state[n], state_r[n], 1e-2)
    for name, gt, gr in zip(_names(kind), grads, grads_r):
        _check(f"grad {name}", gt, gr, 1e-2)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper GPU")
def test_cuda_mlp_forward_takes_the_hopper_kernel_where_it_applies(monkeypatch):
    """The bf16 TTT-MLP forward at head dim 64 and mini-batch 64 runs the Hopper kernel (`hopper.py`): one
    program a chain with more chains than half the SMs and at most as many (here as many: 132 chains of 2
    heads on an H100), two a chain as a cluster with at most half as many and more than a quarter (48 chains,
    as a CogVideoX-5B layer's pass). With and without checkpoints (T = 1,000: a last mini-batch of 40 tokens)
    it gives the reference's outputs, states and gradients (the backward starting from its checkpoints), and
    the portable kernel's outputs; 2 chains and causal mini-batches keep the portable kernel."""
    from ttt_video.ops.ttt import hopper

    triton_impl = _module()
    ran, splits = [], []
    forward = hopper.forward

    def spy(*args):  # hopper.forward, its launch recording each build's programs a chain
        launch = args[8]
        ran.append(forward(*args[:8], lambda *a, **k: (splits.append(k["cluster"]), launch(*a, **k)), *args[9:]))
        return ran[-1]

    monkeypatch.setattr(hopper, "forward", spy)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch in (sms // H, 48 // H):
        _check_16bit(triton_impl, "mlp", False, 64, 64, torch.bfloat16, batch=batch)
        args = [a.to(torch.bfloat16) if i < 4 else a.float()
                for i, a in enumerate(_inputs("mlp", 1000, seed=3, batch=batch, dim=64, device="cuda", eta_scale=0.02))]
        with torch.no_grad():
            out = triton_impl.ttt_mlp(*args, mini_batch_size=64)
        with monkeypatch.context() as portable_only, torch.no_grad():
            portable_only.setattr(triton_impl, "_hopper_forward", lambda *args: False)
            portable = triton_impl.ttt_mlp(*args, mini_batch_size=64)
        _check("hopper against portable", out, portable, 1e-2)
    _check_16bit(triton_impl, "mlp", False, 64, 64, torch.bfloat16)
    _check_16bit(triton_impl, "mlp", True, 64, 64, torch.bfloat16, batch=sms // H)
    assert ran == [True] * 4 + [False] and splits == [1, 1, 2, 2]


def _layer_inputs(T, seed, dim=64):
    """bf16 TTT-MLP inputs on the GPU as the TTT layer makes them: unit q and k per head, a unit-variance
    target v - k, eta = sigmoid(0) / (head dim x mini-batch), small inner weights, LayerNorm at its start."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, dim, generator=g), dim=-1) for _ in range(2))
    t = torch.randn(B, H, T, dim, generator=g)
    v = k + (t - t.mean(-1, keepdim=True)) / t.std(-1, keepdim=True)
    eta = torch.full((B, H, T), 0.5 / (dim * 64))
    weights = [torch.randn(H, dim, 4 * dim, generator=g) * 0.02, torch.zeros(H, 1, 4 * dim),
               torch.randn(H, 4 * dim, dim, generator=g) * 0.02, torch.zeros(H, 1, dim)]
    return [x.to("cuda", torch.bfloat16) for x in (q, k, v, eta)] + [
        x.cuda() for x in (*weights, torch.ones(H, dim), torch.zeros(H, dim))]


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper GPU")
def test_cuda_mlp_backward_takes_the_hopper_kernels_where_they_apply(monkeypatch):
    """On an H100 the bf16 TTT-MLP backward at head dim 64 and mini-batch 64, not causal, runs the Hopper
    kernels (`hopper.backward`, whatever the number of chains) and gives the reference's gradients, as the
    portable backward does: over one window of checkpoint groups (T = 1,000, a last mini-batch of 40
    tokens) and over three, the first partial (T = 9,000: 9 groups of 16 mini-batches, windows of 4; inputs
    as the layer makes them, over which random ones drift by about the tolerance in either backward), with
    the gradient of the final state carried in. Causal mini-batches keep the portable backward."""
    from ttt_video.ops.ttt import hopper
    from ttt_video.ops.ttt import torch as torch_impl

    triton_impl = _module()
    ran = []
    backward = hopper.backward
    monkeypatch.setattr(hopper, "backward", lambda *args: (ran.append(T), backward(*args))[1])
    for T in (1000, 9000):
        if T == 1000:
            args = _inputs("mlp", T, seed=7, batch=1, dim=64, device="cuda", eta_scale=0.02)
            low = [a.to(torch.bfloat16) if i < 4 else a.float() for i, a in enumerate(args)]
        else:
            low = _layer_inputs(T, seed=7)
            args = [a.float() for a in low]
        grads_r = _run(torch_impl, "mlp", args, mini_batch_size=64, causal=False)[2]
        grads = _run(triton_impl, "mlp", low, mini_batch_size=64, causal=False)[2]
        with monkeypatch.context() as portable_only:
            portable_only.setattr(triton_impl, "_hopper_backward", lambda *args: None)
            portable = _run(triton_impl, "mlp", low, mini_batch_size=64, causal=False)[2]
        for name, gt, gp, gr in zip(_names("mlp"), grads, portable, grads_r):
            _check(f"T={T} grad {name}", gt, gr, 1e-2)
            _check(f"T={T} portable grad {name}", gp, gr, 1e-2)
    assert ran == [1000, 9000]
    _check_16bit(triton_impl, "mlp", True, 64, 64, torch.bfloat16)
    assert ran == [1000, 9000]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_mlp_stays_near_float32_over_18_seconds_of_tokens():
    """Over a long sequence (T = 100,334, 1,568 mini-batches: 18 s of CogVideoX-5B video) with inputs as
    the TTT layer makes them (unit q and k per head, a unit-variance target v - k, eta = sigmoid(0) /
    (head dim x mini-batch)), the bfloat16 kernels stay as close to the float32 PyTorch path as over a
    short one: rounding does not build up along the chain (on an H100, relative distance 1.0e-3 to
    4.3e-3 for the output and every gradient at T = 16,722, 100,334 and 351,168)."""
    from ttt_video.ops.ttt import torch as torch_impl

    args = _layer_inputs(100_334, seed=6)
    out_r, state_r, grads_r = _run(torch_impl, "mlp", [a.float() for a in args], mini_batch_size=64, causal=False)
    out, state, grads = _run(_module(), "mlp", args, mini_batch_size=64, causal=False)
    _check("out", out, out_r, 1e-2)
    for n in state_r:
        _check(f"state {n}", state[n], state_r[n], 1e-2)
    for name, gt, gr in zip(_names("mlp"), grads, grads_r):
        _check(f"grad {name}", gt, gr, 1e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("per_sm,warps", [(1, 4), (2, 8)])
def test_cuda_mlp_with_more_chains_than_sms_runs_one_program_a_chain(monkeypatch, per_sm, warps):
    """With more chains than SMs, one program a chain in the forward and the backward. Up to two chains
    an SM they run at 4 warps (two an SM), all resident at once, where 8-warp programs (one an SM) would
    run in two waves; above, neither build keeps them all resident, and they run at 8 warps, the
    backward with 64-unit hidden chunks (its 32-unit build reads shared memory out of bounds). Those
    builds give the reference's outputs, states and gradients."""
    triton_impl = _module()
    monkeypatch.setattr(triton_impl, "_SLICES", {})
    monkeypatch.setattr(triton_impl, "_hopper_backward", lambda *args: None)  # the portable backward
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _check_16bit(triton_impl, "mlp", False, 64, 64, torch.bfloat16, batch=-(-(per_sm * sms + 12) // H))
    picked = {(k[3][0] == "backward", dict(k[3][-1])["num_warps"], dict(k[3][-1])["FC"]): s
              for k, s in triton_impl._SLICES.items()}
    fits = 1 if warps == 4 else 0
    assert picked == {(False, 4, 32): fits, (False, 8, 32): 0, (True, 4, 32): fits, (True, 8, 64): 0}


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_mlp_backward_gets_a_small_carveout_and_the_same_results(monkeypatch):
    """The MLP backward (82 KB of shared memory at head dim 64) runs with the smallest carveout that
    holds it; the carveout moves the L1 / shared-memory split only, so results repeat exactly."""
    triton_impl = _module()
    monkeypatch.setattr(triton_impl, "_hopper_backward", lambda *args: None)  # the portable backward
    args = [a.to(torch.bfloat16) if i < 4 else a.float()
            for i, a in enumerate(_inputs("mlp", 300, seed=4, batch=1, dim=64, device="cuda", eta_scale=0.02))]
    first = _run(triton_impl, "mlp", args, mini_batch_size=64, causal=False)
    set_now = [p for p in triton_impl._CARVEOUT.values() if p is not None]
    assert set_now and all(0 < p < 100 for p in set_now), triton_impl._CARVEOUT
    second = _run(triton_impl, "mlp", args, mini_batch_size=64, causal=False)
    for a, b in zip([first[0], *first[1].values(), *first[2]], [second[0], *second[1].values(), *second[2]]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_mlp_backward_split_matches_one_program(monkeypatch, causal):
    """With few chains the MLP backward runs each chain's state recompute and queries' halves on a
    program of its own (S = 2), ahead of the program that carries the adjoint; it gives the
    one-program (S = 1) results of a build with as many warps. Eight checkpoint groups, so the two
    groups' buffers in flight are each reused."""
    triton_impl = _module()
    monkeypatch.setattr(triton_impl, "_hopper_backward", lambda *args: None)  # the portable backward
    monkeypatch.setattr(triton_impl, "_SLICES", {})
    args = [a.to(torch.bfloat16) if i < 4 else a.float()
            for i, a in enumerate(_inputs("mlp", 2000, seed=5, batch=1, dim=64, device="cuda", eta_scale=0.02))]
    split = _run(triton_impl, "mlp", args, mini_batch_size=64, causal=causal, checkpoint_group=4)
    assert [s for k, s in triton_impl._SLICES.items() if k[3][0] == "backward"] == [2]
    most = triton_impl._mlp_slices
    monkeypatch.setattr(triton_impl, "_mlp_slices", lambda N, m, q, key, warmup: 1 if key[0] == "backward"
                        else most(N, m, q, key, warmup))
    options = triton_impl._launch_options
    monkeypatch.setattr(triton_impl, "_launch_options", lambda mlp, D, bs: {**options(mlp, D, bs), "num_warps": 4})
    one = _run(triton_impl, "mlp", args, mini_batch_size=64, causal=causal, checkpoint_group=4)
    assert torch.equal(split[0], one[0])
    for name, a, b in zip(_names("mlp"), split[2], one[2]):
        _check(f"grad {name}", a, b, 1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
def test_layer_io_kernels_match_the_eager_layer_steps(dtype, reverse):
    """Outputs and the gradients of every input against the eager steps (and their autograd), with the
    head-major side in token order and mirrored (a reversed scan's order)."""
    _module()
    from ttt_video.layers import ttt as ttt_layer
    from ttt_video.layers.rope import rope_3d
    from ttt_video.ops.ttt import layer_io

    g = torch.Generator().manual_seed(5)
    heads, dh, L = 3, 16, 37  # L not a multiple of the token block; H * Dh not a power of two
    qkv = torch.randn(2, L, 3 * heads * dh, generator=g).to(DEVICE, dtype)
    qkv[0, 3, dh:2 * dh] = 0  # a zero q row (head 1): the normalisation's clamp
    cos, sin = (t[:L].to(DEVICE) for t in rope_3d(3, 4, 4, dh))
    ln_w = (1 + 0.1 * torch.randn(heads, dh, generator=g)).to(DEVICE)
    ln_b = (0.1 * torch.randn(heads, dh, generator=g)).to(DEVICE)

    def close(a, r):  # bfloat16: the eager steps round between steps, the kernels do not
        if dtype == torch.bfloat16:
            assert _rel(a, r) < 1e-2, _rel(a, r)
        else:
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)

    def outputs_and_grads(fn, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        probes = [torch.randn(o.shape, generator=g).to(DEVICE, o.dtype) for o in outs]
        return [*outs, *torch.autograd.grad(sum((o * p).float().sum() for o, p in zip(outs, probes)), inputs)]

    state = g.get_state()
    for fused, eager, args in (
            (layer_io.inner_inputs, ttt_layer._inner_inputs, (qkv, ln_w, ln_b)),
            (layer_io.merge_heads, ttt_layer._merge_heads,
             (torch.randn(2, heads, L, dh, generator=g).to(DEVICE, dtype),
              (1 + 0.1 * torch.randn(heads * dh, generator=g)).to(DEVICE, dtype),
              (0.1 * torch.randn(heads * dh, generator=g)).to(DEVICE, dtype)))):
        if fused is layer_io.inner_inputs:
            call = [lambda x, w, b, f=f: f(x, cos, sin, w, b, heads, reverse) for f in (fused, eager)]
        else:
            call = [lambda o, w, b, f=f: f(o, w, b, reverse) for f in (fused, eager)]
        g.set_state(state)
        got = outputs_and_grads(call[0], *args)
        g.set_state(state)
        ref = outputs_and_grads(call[1], *args)
        assert len(got) == len(ref)
        for a, r in zip(got, ref):
            assert a.dtype == r.dtype and a.is_contiguous()
            close(a, r)


@pytest.mark.skipif(not CUDA, reason="millions of tokens: the GPU only")
def test_per_head_kernels_take_more_token_blocks_than_a_grid_axis_beyond_the_first():
    """The per-head forward kernels (q, k, v preparation; q / k norm and RoPE) put their programs on the
    grid's first axis: 2.2M tokens of one head are 68,750 blocks of 32, more than the 65,535 a second axis
    takes. The rows past that point against the eager steps."""
    from ttt_video.layers import ttt as ttt_layer
    from ttt_video.layers.rope import norm_rope
    from ttt_video.ops.ttt import layer_io

    g = torch.Generator(device=DEVICE).manual_seed(7)
    L, dh, tail = 2_200_000, 64, slice(2_150_000, None)
    qkv = torch.randn(1, L, 3 * dh, generator=g, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = (torch.randn(L, dh, generator=g, device=DEVICE) for _ in range(2))
    w, b = torch.ones(dh, device=DEVICE), torch.zeros(dh, device=DEVICE)
    with torch.no_grad():
        got = layer_io.inner_inputs(qkv, cos, sin, w[None], b[None], 1)
        ref = ttt_layer._inner_inputs(qkv[:, tail], cos[tail], sin[tail], w[None], b[None], 1)
        for a, r in zip(got, ref):
            assert _rel(a[:, :, tail], r) < 1e-2
        x = qkv[..., :dh].unflatten(-1, (1, dh)).transpose(1, 2)
        w, b = w.to(x.dtype), b.to(x.dtype)
        got = layer_io.norm_rope(x, w, b, cos, sin, 1e-6)
        assert _rel(got[:, :, tail], norm_rope(x[:, :, tail], w, b, cos[tail], sin[tail], 1e-6)) < 1e-2


@pytest.mark.parametrize("layout", ["projection", "qkv"])
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
def test_norm_rope_kernels_match_the_eager_step(dtype, rotate, layout):
    """Attention's q / k LayerNorm and RoPE (`layer_io.norm_rope` against `layers.rope.norm_rope` and its
    autograd): the output and the gradients of x, the weight and the bias, for q as a head view of its own
    projection (the input gradient then comes back with the projection's layout, no copy) and of a joint
    q, k, v projection. The output holds each token's heads together (`[B, L, H, Dh]` memory), so that
    attention's output, in q's layout, is the output projection's input as it is; the output's gradient
    comes back in that layout, and is also taken in another one."""
    _module()
    from ttt_video.layers.rope import norm_rope, rope_3d
    from ttt_video.ops.ttt import layer_io

    g = torch.Generator().manual_seed(6)
    B, heads, dh, L = 2, 3, 16, 37  # L not a multiple of the token block
    width = heads * dh * (3 if layout == "qkv" else 1)
    proj = torch.randn(B, L, width, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(dh, generator=g)).to(DEVICE, dtype)
    b = (0.1 * torch.randn(dh, generator=g)).to(DEVICE, dtype)
    cos, sin = (t[:L].to(DEVICE) for t in rope_3d(3, 4, 4, dh)) if rotate else (None, None)
    probe = torch.randn(B, heads, L, dh, generator=g).to(DEVICE, dtype)

    def run(fn, gy=probe.transpose(1, 2).contiguous().transpose(1, 2)):
        p, wt, bt = (t.detach().requires_grad_() for t in (proj, w, b))
        x = p[..., :heads * dh].unflatten(-1, (heads, dh)).transpose(1, 2)
        y = fn(x, wt, bt, cos, sin, 1e-6)
        return [y, *torch.autograd.grad(y, [p, wt, bt], gy)]

    got, ref = run(layer_io.norm_rope), run(norm_rope)
    assert got[0].transpose(1, 2).is_contiguous() and got[0].dtype == dtype
    heads_apart = run(layer_io.norm_rope, probe)  # the output's gradient in `[B, H, L, Dh]` memory
    for a, r in zip(heads_apart[1:], got[1:]):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    for a, r in zip(got, ref):
        if dtype == torch.bfloat16:  # the eager step rounds the LayerNorm's output, the kernel does not
            assert _rel(a, r) < 1e-2, _rel(a, r)
        else:
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
def test_modulated_norm_kernels_match_the_eager_step(dtype, affine):
    """adaLN (`layer_io.modulated_norm` against `layers.dit.modulated_norm` and its autograd): the output and
    the gradients of x, the LayerNorm's weight and bias and each batch element's shift and scale, for x a
    slice of frames (batch elements apart in memory) and shift / scale chunks of one projection."""
    _module()
    from ttt_video.layers.dit import modulated_norm
    from ttt_video.ops.ttt import layer_io

    g = torch.Generator().manual_seed(7)
    B, F_, N, D = 2, 5, 7, 48  # D not a power of two
    video = torch.randn(B, F_, N, D, generator=g).to(DEVICE, dtype)
    mod = (0.5 * torch.randn(B, 2 * D, generator=g)).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(DEVICE, dtype) if affine else None
    b = (0.1 * torch.randn(D, generator=g)).to(DEVICE, dtype) if affine else None
    probe = torch.randn(B, 3, N, D, generator=g).to(DEVICE, dtype)

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in (video, mod, w, b) if t is not None]
        v, m = leaves[:2]
        shift, scale = (c[:, None, None] for c in m.chunk(2, 1))
        y = fn(v[:, 1:4], *(leaves[2:] if affine else (None, None)), shift, scale, 1e-5)
        return [y, *torch.autograd.grad((y * probe).float().sum(), leaves)]

    got, ref = run(layer_io.modulated_norm), run(modulated_norm)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype
        if dtype == torch.bfloat16:  # the eager step rounds between its steps, the kernel does not
            assert _rel(a, r) < 1e-2, _rel(a, r)
        else:
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_batch, gate_grad", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
def test_gated_residual_kernels_match_the_eager_step(dtype, per_batch, gate_grad):
    """x + gate y (`layer_io.gated_residual` against `layers.dit.gated_residual` and its autograd): the output
    and the gradients of x, the gate (each batch element's, a chunk of one projection, or one for all; or a
    frozen one, for which the kernel keeps no y) and y, for x a slice of frames (batch elements apart in
    memory)."""
    _module()
    from ttt_video.layers.dit import gated_residual
    from ttt_video.ops.ttt import layer_io

    g = torch.Generator().manual_seed(8)
    B, F_, N, D = 2, 5, 7, 48
    video = torch.randn(B, F_, N, D, generator=g).to(DEVICE, dtype)
    y = torch.randn(B, 3, N, D, generator=g).to(DEVICE, dtype)
    gates = (torch.randn(B, 2 * D, generator=g) if per_batch else torch.randn(D, generator=g)).to(DEVICE, dtype)
    probe = torch.randn(B, 3, N, D, generator=g).to(DEVICE, dtype)

    def run(fn):
        leaves = [t.detach().requires_grad_(t is not gates or gate_grad) for t in (video, gates, y)]
        gate = leaves[1].chunk(2, 1)[1][:, None, None] if per_batch else leaves[1]
        out = fn(leaves[0][:, 1:4], gate, leaves[2])
        return [out, *torch.autograd.grad((out * probe).float().sum(), [t for t in leaves if t.requires_grad])]

    got, ref = run(layer_io.gated_residual), run(gated_residual)
    assert len(got) == len(ref) == (4 if gate_grad else 3)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype
        if dtype == torch.bfloat16:  # the eager step rounds the product, the kernel does not
            assert _rel(a, r) < 1e-2, _rel(a, r)
        else:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_a_blocks_recompute_keeps_the_ttt_results_for_the_passes_recompute(monkeypatch, kind):
    """CogVideoX's part-wise recompute: a checkpointed block holding the bidirectional TTT, its first
    pass checkpointed too, then a checkpointed part that takes their output. Backward recomputes the block
    (both passes run; the second keeps its activations for its backward, which comes next) and then the
    first pass: the block's recompute keeps the kernels' results for that pass's recompute, so a step
    launches the TTT forward 4 times instead of 5, with bit for bit the same gradients; the step's first
    forward keeps nothing, and where nothing recomputes the pass (TTT frozen, no gradient into it) what
    the block's recompute kept goes at the end of backward."""
    from torch.utils.checkpoint import checkpoint

    from ttt_video.layers.ttt import BidirectionalTTT
    from ttt_video.ops import memo

    tri = _kernels(monkeypatch)
    launches, keeps = [], []
    monkeypatch.setattr(tri, "_forward", lambda *args, real=tri._forward: launches.append(1) or real(*args))

    def keep(results, real=memo.keep):
        keeps.append((getattr(memo._local, "active", None) or (None, None))[1] == "keep")
        real(results)

    monkeypatch.setattr(memo, "keep", keep)
    torch.manual_seed(0)
    layer = BidirectionalTTT(2 * D, 2, kind=kind, mini_batch_size=MB, impl="triton").to(DEVICE)
    L = 37
    x0 = torch.randn(1, L, 2 * D, device=DEVICE)
    cos, sin = torch.ones(L, D, device=DEVICE), torch.zeros(L, D, device=DEVICE)

    scale = torch.nn.Parameter(torch.ones(2 * D, device=DEVICE))

    def block(x):
        return checkpoint(lambda t: t.sin() * scale, layer(x, cos, sin, checkpoint_passes=True), use_reentrant=False)

    def step(keeping=True, frozen=False):
        launches.clear()
        keeps.clear()
        layer.zero_grad()
        layer.requires_grad_(not frozen)
        x = x0.clone().requires_grad_(not frozen)
        with monkeypatch.context() as m:
            if not keeping:
                m.setattr(memo, "_in_backward", lambda: False)
            y = checkpoint(block, x, use_reentrant=False)
            assert len(launches) == 2 and keeps == [False, False]  # the first forward keeps nothing
            y.square().sum().backward()
        assert layer._memo.results is None
        return len(launches), keeps[2:], [x.grad, *(p.grad for p in layer.parameters())]

    runs, kept, grads = step()
    assert runs == 4 and kept == [True, False]
    runs, kept, plain = step(keeping=False)
    assert runs == 5 and kept == [False] * 3
    for a, b in zip(grads, plain):
        assert torch.equal(a, b)
    runs, kept, grads = step(frozen=True)
    assert runs == 4 and kept == [True, False] and scale.grad is not None
