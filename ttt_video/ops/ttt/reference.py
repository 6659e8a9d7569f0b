"""Naive TTT-MLP / TTT-Linear: the definition, written with autograd, one mini-batch at a time.

Layout: q, k, v `[B, H, T, D]`; eta `[B, H, T]`; inner weights per head `[H, ...]`,
per-batch state `[B, H, ...]`. Runs in whatever dtype it is given (float64 in tests).

The inner gradient is taken with `torch.func.grad`, so this file states the semantics
directly; the fast paths derive the same gradients by hand and are tested against it.
"""

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

MLP_KEYS = ("w1", "b1", "w2", "b2")
LINEAR_KEYS = ("w1", "b1")


def layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def inner_model(params, x):
    z = x @ params["w1"] + params["b1"]
    if "w2" in params:
        z = F.gelu(z, approximate="tanh") @ params["w2"] + params["b2"]
    return z


def _token_loss(params, k, target, ln_w, ln_b, eps):
    y = layer_norm(inner_model(params, k[None]), ln_w, ln_b, eps)[0]
    return 0.5 * ((y - target) ** 2).sum()


def _minibatch(params, q, k, v, eta, ln_w, ln_b, eps, causal):
    """One head, one mini-batch: q, k, v `[b, D]`, eta `[b]`, params unbatched."""
    target = v - k
    per_token = vmap(grad(_token_loss), in_dims=(None, 0, 0, None, None, None))(
        params, k, target, ln_w, ln_b, eps
    )  # each [b, *param_shape]
    if causal:
        steps = {n: torch.cumsum(eta.view(-1, *[1] * (g.dim() - 1)) * g, 0) for n, g in per_token.items()}
        out = []
        for t in range(q.shape[0]):
            w_t = {n: params[n] - steps[n][t] for n in params}
            out.append(layer_norm(inner_model(w_t, q[t : t + 1]), ln_w, ln_b, eps))
        new = {n: params[n] - steps[n][-1] for n in params}
        return q + torch.cat(out), new
    new = {n: params[n] - (eta.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) for n, g in per_token.items()}
    return q + layer_norm(inner_model(new, q), ln_w, ln_b, eps), new


def ttt_reference(q, k, v, eta, weights, ln_weight, ln_bias, *, mini_batch_size, causal, eps, initial_state, return_state):
    """Shared body of both ops: `weights` maps names to `[H, ...]` tensors."""
    B, H, T, _ = q.shape
    outs = torch.empty_like(q)
    final = {n: [[None] * H for _ in range(B)] for n in weights}
    for b in range(B):
        for h in range(H):
            if initial_state is None:
                params = {n: w[h] for n, w in weights.items()}
            else:
                params = {n: initial_state[n][b, h] for n in weights}
            pieces = []
            for s in range(0, T, mini_batch_size):
                e = min(s + mini_batch_size, T)
                o, params = _minibatch(
                    params, q[b, h, s:e], k[b, h, s:e], v[b, h, s:e], eta[b, h, s:e],
                    ln_weight[h], ln_bias[h], eps, causal,
                )
                pieces.append(o)
            outs[b, h] = torch.cat(pieces)
            for n in weights:
                final[n][b][h] = params[n]
    if not return_state:
        return outs
    state = {n: torch.stack([torch.stack(row) for row in final[n]]) for n in weights}
    return outs, state


def ttt_mlp(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias, *, mini_batch_size=64, causal=False, eps=1e-6,
            initial_state=None, return_state=False):
    weights = dict(zip(MLP_KEYS, (w1, b1, w2, b2)))
    return ttt_reference(q, k, v, eta, weights, ln_weight, ln_bias, mini_batch_size=mini_batch_size,
                         causal=causal, eps=eps, initial_state=initial_state, return_state=return_state)


def ttt_linear(q, k, v, eta, w1, b1, ln_weight, ln_bias, *, mini_batch_size=64, causal=False, eps=1e-6,
               initial_state=None, return_state=False):
    weights = dict(zip(LINEAR_KEYS, (w1, b1)))
    return ttt_reference(q, k, v, eta, weights, ln_weight, ln_bias, mini_batch_size=mini_batch_size,
                         causal=causal, eps=eps, initial_state=initial_state, return_state=return_state)
