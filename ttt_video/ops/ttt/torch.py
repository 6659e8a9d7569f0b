"""Fast PyTorch TTT-MLP / TTT-Linear: hand-derived inner gradients, batched over B*H.

Layout: q, k, v `[B, H, T, D]`; eta `[B, H, T]`; state tensors `[B*H, ...]` inside.
Inner weights and arithmetic are float32 for any activation dtype (float64 stays float64).

One mini-batch in closed form. With G the eta-scaled gradient of the inner loss at each
token's pre-activation, the update is W' = W - X^T G, b' = b - sum(G). Non-causal, every
token sees the whole mini-batch's update: the queries go through the updated weights,
Z_q = Q W' + b'. Causal, token t sees the updates of tokens s <= t (M the lower triangle),
in the dual form
    Z_q = Q W + b - (M * (Q X^T + 1)) G.

Training memory: the scan runs in groups of `checkpoint_group` mini-batches under
activation checkpointing, so only the inner state at group borders is kept.
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .reference import inner_model

MLP_KEYS = ("w1", "b1", "w2", "b2")
LINEAR_KEYS = ("w1", "b1")
_GELU_C = math.sqrt(2.0 / math.pi)


def _ln_fwd(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    return xhat * w + b, xhat, rstd


def _ln_bwd(dy, xhat, rstd, w):
    """Gradient through LayerNorm over the last dim."""
    dxhat = dy * w
    d = xhat.shape[-1]
    return rstd / d * (d * dxhat - dxhat.sum(-1, keepdim=True) - xhat * (dxhat * xhat).sum(-1, keepdim=True))


def _gelu_tanh_grad(z):
    t = torch.tanh(_GELU_C * (z + 0.044715 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z)


def _minibatch(state, q, k, v, eta, ln_w, ln_b, eps, mask):
    """q, k, v `[N, b, D]`, eta `[N, b, 1]`, ln `[N, 1, D]`, causal mask `[b, b]` (None: non-causal);
    returns out, new state."""
    mlp = "w2" in state
    w1, b1 = state["w1"], state["b1"]
    z1 = k @ w1 + b1  # [N, b, D1]
    if mlp:
        x2 = F.gelu(z1, approximate="tanh")
        z2 = x2 @ state["w2"] + state["b2"]  # [N, b, D]
    else:
        z2 = z1
    y, xhat, rstd = _ln_fwd(z2, ln_w, ln_b, eps)
    g2 = eta * _ln_bwd(y - (v - k), xhat, rstd, ln_w)  # [N, b, D]

    if mlp:
        g1 = (g2 @ state["w2"].transpose(-1, -2)) * _gelu_tanh_grad(z1)  # [N, b, D1]
    else:
        g1 = g2
    new = {"w1": w1 - k.transpose(-1, -2) @ g1, "b1": b1 - g1.sum(-2, keepdim=True)}
    if mlp:
        new["w2"] = state["w2"] - x2.transpose(-1, -2) @ g2
        new["b2"] = state["b2"] - g2.sum(-2, keepdim=True)
    if mask is None:
        zq = inner_model(new, q)
    else:
        ones = torch.ones_like(mask)
        zq = q @ w1 + b1 - (mask * (q @ k.transpose(-1, -2) + ones)) @ g1
        if mlp:
            xq = F.gelu(zq, approximate="tanh")
            zq = xq @ state["w2"] + state["b2"] - (mask * (xq @ x2.transpose(-1, -2) + ones)) @ g2
    out, _, _ = _ln_fwd(zq, ln_w, ln_b, eps)
    return q + out, new


def _scan(keys, q, k, v, eta, ln_w, ln_b, eps, causal, *state):
    """Sequential scan over mini-batches: q, k, v `[N, n, b, D]`, eta `[N, n, b, 1]`."""
    state = dict(zip(keys, state))
    b = q.shape[2]
    mask = torch.tril(torch.ones(b, b, device=q.device, dtype=q.dtype)) if causal else None
    outs = []
    for i in range(q.shape[1]):
        o, state = _minibatch(state, q[:, i], k[:, i], v[:, i], eta[:, i], ln_w, ln_b, eps, mask)
        outs.append(o)
    return (torch.stack(outs, 1), *(state[n] for n in keys))


def ttt_torch(q, k, v, eta, weights, ln_weight, ln_bias, *, mini_batch_size, causal, eps, initial_state,
              return_state, checkpoint_group=16):
    B, H, T, D = q.shape
    N = B * H
    dtype = q.dtype
    keys = tuple(weights)
    f32 = torch.float64 if dtype == torch.float64 else torch.float32  # float64 only for tests
    if initial_state is None:
        state = [w.to(f32).unsqueeze(0).expand(B, *w.shape).reshape(N, *w.shape[1:]) for w in weights.values()]
    else:
        state = [initial_state[n].to(f32).reshape(N, *initial_state[n].shape[2:]) for n in keys]
    ln_w = ln_weight.to(f32).unsqueeze(0).expand(B, H, D).reshape(N, 1, D)
    ln_b = ln_bias.to(f32).unsqueeze(0).expand(B, H, D).reshape(N, 1, D)
    q, k, v = (x.to(f32).reshape(N, T, D) for x in (q, k, v))
    eta = eta.to(f32).reshape(N, T, 1)

    n_full, tail = divmod(T, mini_batch_size)
    pieces = []
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, eta, ln_w, ln_b, *state)
    )
    b = mini_batch_size
    for s in range(0, n_full, checkpoint_group):
        e = min(s + checkpoint_group, n_full)
        chunk = [x[:, s * b : e * b].reshape(N, e - s, b, -1) for x in (q, k, v, eta)]
        args = (keys, *chunk, ln_w, ln_b, eps, causal, *state)
        if needs_grad:
            res = checkpoint(_scan, *args, use_reentrant=False)
        else:
            res = _scan(*args)
        pieces.append(res[0].reshape(N, (e - s) * b, D))
        state = list(res[1:])
    if tail:
        chunk = [x[:, n_full * b :].reshape(N, 1, tail, -1) for x in (q, k, v, eta)]
        res = _scan(keys, *chunk, ln_w, ln_b, eps, causal, *state)
        pieces.append(res[0].reshape(N, tail, D))
        state = list(res[1:])
    out = torch.cat(pieces, 1).reshape(B, H, T, D).to(dtype)
    if not return_state:
        return out
    return out, {n: s.reshape(B, H, *s.shape[1:]) for n, s in zip(keys, state)}


def ttt_mlp(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias, *, mini_batch_size=64, causal=False, eps=1e-6,
            initial_state=None, return_state=False):
    return ttt_torch(q, k, v, eta, dict(zip(MLP_KEYS, (w1, b1, w2, b2))), ln_weight, ln_bias,
                     mini_batch_size=mini_batch_size, causal=causal, eps=eps, initial_state=initial_state,
                     return_state=return_state)


def ttt_linear(q, k, v, eta, w1, b1, ln_weight, ln_bias, *, mini_batch_size=64, causal=False, eps=1e-6,
               initial_state=None, return_state=False):
    return ttt_torch(q, k, v, eta, dict(zip(LINEAR_KEYS, (w1, b1))), ln_weight, ln_bias,
                     mini_batch_size=mini_batch_size, causal=causal, eps=eps, initial_state=initial_state,
                     return_state=return_state)
