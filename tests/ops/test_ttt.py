import pytest
import torch

from ttt_video.ops import ttt_linear, ttt_mlp

B, H, D = 2, 3, 8


def _inputs(kind, T, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale + shift).requires_grad_()

    q, k, v = (r(B, H, T, D) for _ in range(3))
    eta = (torch.rand(B, H, T, generator=g, dtype=dtype) * 0.2).requires_grad_()
    if kind == "mlp":
        weights = [r(H, D, 4 * D, scale=0.3), r(H, 1, 4 * D, scale=0.1), r(H, 4 * D, D, scale=0.3), r(H, 1, D, scale=0.1)]
    else:
        weights = [r(H, D, D, scale=0.3), r(H, 1, D, scale=0.1)]
    return [q, k, v, eta, *weights, r(H, D, scale=0.1, shift=1.0), r(H, D, scale=0.1)]


def _op(kind):
    return ttt_mlp if kind == "mlp" else ttt_linear


def _out_and_grads(kind, args, impl, causal, mb=8):
    out, state = _op(kind)(*args, mini_batch_size=mb, causal=causal, return_state=True, impl=impl)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for s in state.values())
    return out, state, torch.autograd.grad(loss, args)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [19, 24])
def test_torch_matches_reference(kind, causal, T):
    args = _inputs(kind, T)
    out_r, state_r, grads_r = _out_and_grads(kind, args, "reference", causal)
    out_t, state_t, grads_t = _out_and_grads(kind, args, "torch", causal)
    assert not out_t.isnan().any()
    torch.testing.assert_close(out_t, out_r, rtol=1e-9, atol=1e-10)
    for n in state_r:
        torch.testing.assert_close(state_t[n], state_r[n], rtol=1e-9, atol=1e-10)
    names = ["q", "k", "v", "eta", *[f"w{i}" for i in range(len(args) - 6)], "ln_weight", "ln_bias"]
    for name, gt, gr in zip(names, grads_t, grads_r):
        assert gr.abs().max() > 0, name
        torch.testing.assert_close(gt, gr, rtol=1e-8, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_float32_close_to_float64_reference(kind):
    args = _inputs(kind, 21)
    ref = _op(kind)(*args, mini_batch_size=8, impl="reference")
    out = _op(kind)(*[a.detach().float() for a in args], mini_batch_size=8, impl="torch")
    assert out.dtype == torch.float32
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-5


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_causal_differs_from_non_causal(kind, impl):
    args = _inputs(kind, 16)
    a = _op(kind)(*args, mini_batch_size=8, causal=False, impl=impl)
    b = _op(kind)(*args, mini_batch_size=8, causal=True, impl=impl)
    # The last token of each mini-batch sees the same update either way.
    torch.testing.assert_close(a[:, :, 7], b[:, :, 7])
    assert (a[:, :, :7] - b[:, :, :7]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_state_carry_equals_one_pass(kind, causal, impl):
    args = _inputs(kind, 40)
    q, k, v, eta, *rest = args
    full, full_state = _op(kind)(*args, mini_batch_size=8, causal=causal, return_state=True, impl=impl)
    split = 16  # a mini-batch border
    first, state = _op(kind)(q[:, :, :split], k[:, :, :split], v[:, :, :split], eta[:, :, :split], *rest,
                             mini_batch_size=8, causal=causal, return_state=True, impl=impl)
    second, end_state = _op(kind)(q[:, :, split:], k[:, :, split:], v[:, :, split:], eta[:, :, split:], *rest,
                                  mini_batch_size=8, causal=causal, initial_state=state, return_state=True,
                                  impl=impl)
    torch.testing.assert_close(torch.cat([first, second], 2), full)
    for n in full_state:
        torch.testing.assert_close(end_state[n], full_state[n])


def test_initial_state_gradients_flow():
    args = _inputs("mlp", 12)
    q, k, v, eta, w1, b1, w2, b2, lw, lb = args
    state = {n: w.detach().unsqueeze(0).repeat(B, 1, 1, 1).requires_grad_() for n, w in
             zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2))}
    outs = []
    for impl in ("reference", "torch"):
        out = ttt_mlp(q, k, v, eta, w1, b1, w2, b2, lw, lb, mini_batch_size=8, initial_state=state, impl=impl)
        outs.append(torch.autograd.grad(out.square().sum(), list(state.values())))
    for a, b in zip(*outs):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)


def test_bf16_inputs_keep_dtype_and_match():
    args = _inputs("mlp", 20)
    ref = ttt_mlp(*args, mini_batch_size=8, impl="reference")
    low = [a.detach().to(torch.bfloat16) if i < 3 else a.detach().float() for i, a in enumerate(args)]
    out = ttt_mlp(*low, mini_batch_size=8, impl="torch")
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).norm() / ref.norm() < 2e-2


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown TTT impl"):
        ttt_linear(*_inputs("linear", 8), impl="cuda-magic")


@pytest.mark.parametrize("causal", [False, True])
def test_torch_rematerialised_groups_match_reference(causal):
    from ttt_video.ops.ttt import torch as torch_impl

    args = _inputs("mlp", 23)
    q, k, v, eta, w1, b1, w2, b2, lw, lb = args
    ref = ttt_mlp(*args, mini_batch_size=2, causal=causal, impl="reference")
    out = torch_impl.ttt_torch(q, k, v, eta, {"w1": w1, "b1": b1, "w2": w2, "b2": b2}, lw, lb, mini_batch_size=2,
                               causal=causal, eps=1e-6, initial_state=None, return_state=False,
                               checkpoint_group=3)  # 11 full mini-batches: 4 groups, then a tail of 1
    torch.testing.assert_close(out, ref)
    g_ref = torch.autograd.grad(ref.sum(), args)
    g_out = torch.autograd.grad(out.sum(), args)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)
