import pytest
import torch

from ttt_video.ops import titans_memory, titans_read

B, H, D, E = 2, 3, 6, 10
NAMES = ["q", "k", "v", "lr", "momentum", "decay", "w1", "b1", "w2", "b2"]


def _inputs(T, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    def u(low, high):
        return (low + (high - low) * torch.rand(B, H, T, generator=g, dtype=dtype)).requires_grad_()

    q, k, v = (r(B, H, T, D) for _ in range(3))
    gates = [u(0.0, 0.1), u(0.3, 0.9), u(0.0, 0.2)]  # lr, momentum, decay
    weights = [r(H, D, E, scale=0.4), r(H, 1, E, scale=0.1), r(H, E, D, scale=0.4), r(H, 1, D, scale=0.1)]
    return [q, k, v, *gates, *weights]


def _out_and_grads(args, impl, chunk):
    out, state = titans_memory(*args, chunk_size=chunk, return_state=True, impl=impl)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    for n in sorted(state):
        loss = loss + (state[n] * torch.randn(state[n].shape, generator=g, dtype=out.dtype)).sum()
    return out, state, torch.autograd.grad(loss, args)


@pytest.mark.parametrize("T,chunk", [(13, 5), (12, 4), (7, 1)])
def test_torch_matches_reference(T, chunk):
    args = _inputs(T)
    out_r, state_r, grads_r = _out_and_grads(args, "reference", chunk)
    out_t, state_t, grads_t = _out_and_grads(args, "torch", chunk)
    assert not out_t.isnan().any()
    torch.testing.assert_close(out_t, out_r, rtol=1e-9, atol=1e-10)
    assert set(state_t) == set(state_r) == {"w1", "b1", "w2", "b2", "s_w1", "s_b1", "s_w2", "s_b2"}
    for n in state_r:
        torch.testing.assert_close(state_t[n], state_r[n], rtol=1e-9, atol=1e-10, msg=f"state {n}")
    for name, gt, gr in zip(NAMES, grads_t, grads_r):
        assert gr.abs().max() > 0, name
        torch.testing.assert_close(gt, gr, rtol=1e-8, atol=1e-9, msg=f"grad of {name}")


def test_chunk_of_one_is_the_token_recurrence():
    """With chunks of one token the gradient is at W_{t-1}: a small explicit loop states it."""
    args = [a.detach() for a in _inputs(5)]
    q, k, v, lr, mom, decay, *weights = args
    out = titans_memory(*args, chunk_size=1, impl="torch")
    b, h = 1, 2
    w = [x[h].clone().requires_grad_() for x in weights]
    s = [torch.zeros_like(x) for x in w]
    for t in range(5):
        w1, b1, w2, b2 = w
        pred = torch.nn.functional.gelu(k[b, h, t : t + 1] @ w1 + b1) @ w2 + b2
        grads = torch.autograd.grad(0.5 * (pred - v[b, h, t]).square().sum(), w)
        s = [mom[b, h, t] * si - lr[b, h, t] * gi for si, gi in zip(s, grads)]
        w = [((1 - decay[b, h, t]) * wi + si).detach().requires_grad_() for wi, si in zip(w, s)]
        y = titans_read(q[b, h, t : t + 1], dict(zip(("w1", "b1", "w2", "b2"), w)))
        torch.testing.assert_close(out[b, h, t : t + 1], y.detach())


def test_float32_close_to_float64_reference():
    args = _inputs(21)
    ref = titans_memory(*args, chunk_size=8, impl="reference")
    out = titans_memory(*[a.detach().float() for a in args], chunk_size=8, impl="torch")
    assert out.dtype == torch.float32
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_state_carry_equals_one_pass(impl):
    args = _inputs(22)
    seq, rest = args[:6], args[6:]
    full, full_state = titans_memory(*args, chunk_size=4, return_state=True, impl=impl)
    split = 12  # a chunk border
    first, state = titans_memory(*[x[:, :, :split] for x in seq], *rest, chunk_size=4, return_state=True,
                                 impl=impl)
    second, end_state = titans_memory(*[x[:, :, split:] for x in seq], *rest, chunk_size=4, initial_state=state,
                                      return_state=True, impl=impl)
    torch.testing.assert_close(torch.cat([first, second], 2), full)
    for n in full_state:
        torch.testing.assert_close(end_state[n], full_state[n])


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_state_only_without_queries(impl):
    args = _inputs(9)
    _, state = titans_memory(*args, chunk_size=4, return_state=True, impl=impl)
    none, state_only = titans_memory(None, *args[1:], chunk_size=4, return_state=True, impl=impl)
    assert none is None
    for n in state:
        torch.testing.assert_close(state_only[n], state[n])
    with pytest.raises(ValueError, match="return_state"):
        titans_memory(None, *args[1:], chunk_size=4, impl=impl)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_lr_zero_keeps_the_initial_memory(impl):
    q, k, v, lr, mom, decay, *weights = [a.detach() for a in _inputs(11)]
    out, state = titans_memory(q, k, v, torch.zeros_like(lr), mom, torch.zeros_like(decay), *weights,
                               chunk_size=4, return_state=True, impl=impl)
    initial = dict(zip(("w1", "b1", "w2", "b2"), (w.expand(B, *w.shape) for w in weights)))
    torch.testing.assert_close(out, titans_read(q, initial))
    for n, w in initial.items():
        torch.testing.assert_close(state[n], w)
        assert state[f"s_{n}"].abs().max() == 0


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_decay_one_forgets_everything(impl):
    """Full decay with no momentum and no new surprise at a chunk's last token empties the
    memory: what follows depends neither on the initial memory nor on the tokens before."""
    a = [x.detach() for x in _inputs(12, seed=0)]
    b = [x.detach() for x in _inputs(12, seed=1)]
    for x in (a, b):
        x[3][:, :, 3] = 0.0  # lr
        x[4][:, :, 3] = 0.0  # momentum
        x[5][:, :, 3] = 1.0  # decay
    b[:6] = [torch.cat([xb[:, :, :4], xa[:, :, 4:]], 2) for xa, xb in zip(a[:6], b[:6])]  # same after token 3
    head, state = titans_memory(*[x[:, :, :4] for x in b[:6]], *b[6:], chunk_size=4, return_state=True, impl=impl)
    assert all(s.abs().max() == 0 for s in state.values())
    out_a, state_a = titans_memory(*a, chunk_size=4, return_state=True, impl=impl)
    out_b, state_b = titans_memory(*b, chunk_size=4, return_state=True, impl=impl)
    assert (out_a[:, :, :4] - out_b[:, :, :4]).abs().max() > 1e-3
    torch.testing.assert_close(out_a[:, :, 4:], out_b[:, :, 4:])
    for n in state_a:
        torch.testing.assert_close(state_a[n], state_b[n])


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown Titans impl"):
        titans_memory(*_inputs(4), impl="cuda-magic")
