"""Naive Titans neural memory: the definition, written with autograd, one token at a time.

Layout: q, k, v `[B, H, T, D]`; lr, momentum, decay `[B, H, T]`; memory weights per head
`[H, ...]`, per-batch state `[B, H, ...]`. Runs in whatever dtype it is given (float64 in tests).
The per-token gradients of a chunk are taken with `torch.func.grad` at the chunk's starting
weights; the fast path derives them by hand and is tested against this file.
"""

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

KEYS = ("w1", "b1", "w2", "b2")
MOMENT_KEYS = tuple(f"s_{n}" for n in KEYS)


def memory_mlp(params, x):
    """M(x) = gelu(x w1 + b1) w2 + b2 (exact gelu); params `[..., D, E]` etc., x `[..., L, D]`."""
    return F.gelu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _token_loss(params, k, v):
    return 0.5 * ((memory_mlp(params, k[None])[0] - v) ** 2).sum()


def _chunk(params, moment, q, k, v, lr, momentum, decay):
    """One head, one chunk: q (or None), k, v `[c, D]`; lr, momentum, decay `[c]`."""
    surprise = vmap(grad(_token_loss), in_dims=(None, 0, 0))(params, k, v)  # at the chunk's start
    outs = []
    for t in range(k.shape[0]):
        moment = {n: momentum[t] * moment[n] - lr[t] * surprise[n][t] for n in KEYS}
        params = {n: (1 - decay[t]) * params[n] + moment[n] for n in KEYS}
        if q is not None:
            outs.append(memory_mlp(params, q[t : t + 1]))
    return outs, params, moment


def titans_memory(q, k, v, lr, momentum, decay, w1, b1, w2, b2, *, chunk_size=64, initial_state=None,
                  return_state=False):
    B, H, T, _ = k.shape
    weights = dict(zip(KEYS, (w1, b1, w2, b2)))
    outs = [[None] * H for _ in range(B)]
    final = {n: [[None] * H for _ in range(B)] for n in KEYS + MOMENT_KEYS}
    for b in range(B):
        for h in range(H):
            if initial_state is None:
                params = {n: w[h] for n, w in weights.items()}
            else:
                params = {n: initial_state[n][b, h] for n in KEYS}
            moment = {n: initial_state[f"s_{n}"][b, h] if initial_state is not None and f"s_{n}" in initial_state
                      else torch.zeros_like(params[n]) for n in KEYS}
            pieces = []
            for s in range(0, T, chunk_size):
                e = min(s + chunk_size, T)
                o, params, moment = _chunk(params, moment, None if q is None else q[b, h, s:e], k[b, h, s:e],
                                           v[b, h, s:e], lr[b, h, s:e], momentum[b, h, s:e], decay[b, h, s:e])
                pieces += o
            if q is not None:
                outs[b][h] = torch.cat(pieces)
            for n in KEYS:
                final[n][b][h] = params[n]
                final[f"s_{n}"][b][h] = moment[n]
    out = None if q is None else torch.stack([torch.stack(row) for row in outs])
    if not return_state:
        return out
    return out, {n: torch.stack([torch.stack(row) for row in final[n]]) for n in final}
