"""Fast PyTorch Titans neural memory: hand-derived surprise, one chunk in closed form, batched over B*H.

Layout: q, k, v `[B, H, T, D]`; lr, momentum, decay `[B, H, T]`; state tensors `[B*H, ...]` inside.
Memory arithmetic is float32 for any activation dtype (float64 stays float64).

Inside a chunk of c tokens, every surprise u_i is taken at the starting weights W_0, so the
weights after token t are linear in W_0, the starting momentum S_0 and the u_i:
    W_t = A_t W_0 + b_t S_0 - sum_{i<=t} K[t, i] lr_i u_i,
    A_t = prod_{m<=t} (1 - decay_m),   P_j = prod_{m<=j} momentum_m,
    D[t, j] = prod_{j<m<=t} (1 - decay_m),   E[j, i] = prod_{i<m<=j} momentum_m,
    K = D E,   b = D P.
Each u_i of a linear map is an outer product (k_i^T g_i), so a query's pre-activation under W_t is
one masked matrix product, as in the TTT dual form: Q W_t = A Q W_0 + b Q S_0 - (K lr * Q X^T) G.
"""

import math

import torch

KEYS = ("w1", "b1", "w2", "b2")
MOMENT_KEYS = tuple(f"s_{n}" for n in KEYS)


def _gelu(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))


def _gelu_grad(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _segment_products(a):
    """a `[N, c]` -> `[N, c, c]` with [t, j] = prod_{j<m<=t} a_m for j <= t, else 0.
    Built by a cumulative product (no division), so a factor of exactly 0 stays exact."""
    c = a.shape[-1]
    strict = torch.ones(c, c, dtype=torch.bool, device=a.device).tril(-1)
    factors = torch.where(strict, a[:, :, None], torch.ones_like(a)[:, :, None])
    return torch.cumprod(factors, 1) * torch.ones(c, c, dtype=a.dtype, device=a.device).tril()


def _surprise_sum(coef, k, x2, g1, g2):
    """sum_i coef_i u_i for each weight; coef `[N, c]`."""
    c1, c2 = coef[..., None] * g1, coef[..., None] * g2
    return {"w1": k.transpose(-1, -2) @ c1, "b1": c1.sum(1, keepdim=True),
            "w2": x2.transpose(-1, -2) @ c2, "b2": c2.sum(1, keepdim=True)}


def _chunk(state, q, k, v, lr, momentum, decay):
    """state: dict of `[N, ...]`; q (or None), k, v `[N, c, D]`; lr, momentum, decay `[N, c]`."""
    w1, b1, w2, b2 = (state[n] for n in KEYS)
    z1 = k @ w1 + b1  # [N, c, E]
    x2 = _gelu(z1)
    g2 = x2 @ w2 + b2 - v  # [N, c, D]: loss gradient at the output
    g1 = (g2 @ w2.transpose(-1, -2)) * _gelu_grad(z1)  # [N, c, E]

    keep = 1 - decay
    decayed = _segment_products(keep)  # D
    carried = _segment_products(momentum)  # E
    momentum_all = torch.cumprod(momentum, 1)  # P
    scaled = (decayed @ carried) * lr[:, None, :]  # K with column i scaled by lr_i
    from_weights = torch.cumprod(keep, 1)[..., None]  # A [N, c, 1]
    from_moment = decayed @ momentum_all[..., None]  # b [N, c, 1]

    out = None
    if q is not None:
        z1q = (from_weights * (q @ w1 + b1) + from_moment * (q @ state["s_w1"] + state["s_b1"])
               - (scaled * (q @ k.transpose(-1, -2) + 1)) @ g1)
        x2q = _gelu(z1q)
        out = (from_weights * (x2q @ w2 + b2) + from_moment * (x2q @ state["s_w2"] + state["s_b2"])
               - (scaled * (x2q @ x2.transpose(-1, -2) + 1)) @ g2)

    end = _surprise_sum(scaled[:, -1], k, x2, g1, g2)
    moment_step = _surprise_sum(carried[:, -1] * lr, k, x2, g1, g2)
    a_end, b_end = from_weights[:, -1, :, None], from_moment[:, -1, :, None]  # [N, 1, 1]
    p_end = momentum_all[:, -1, None, None]
    new = {}
    for n in KEYS:
        new[n] = a_end * state[n] + b_end * state[f"s_{n}"] - end[n]
        new[f"s_{n}"] = p_end * state[f"s_{n}"] - moment_step[n]
    return out, new


def titans_memory(q, k, v, lr, momentum, decay, w1, b1, w2, b2, *, chunk_size=64, initial_state=None,
                  return_state=False):
    B, H, T, D = k.shape
    N = B * H
    dtype = k.dtype
    f32 = torch.float64 if dtype == torch.float64 else torch.float32  # float64 only for tests
    weights = dict(zip(KEYS, (w1, b1, w2, b2)))
    state = {}
    for n, w in weights.items():
        if initial_state is None:
            state[n] = w.to(f32).unsqueeze(0).expand(B, *w.shape).reshape(N, *w.shape[1:])
        else:
            state[n] = initial_state[n].to(f32).reshape(N, *w.shape[1:])
        moment = None if initial_state is None else initial_state.get(f"s_{n}")
        state[f"s_{n}"] = torch.zeros_like(state[n]) if moment is None else moment.to(f32).reshape(N, *w.shape[1:])
    k, v = (x.to(f32).reshape(N, T, D) for x in (k, v))
    if q is not None:
        q = q.to(f32).reshape(N, T, D)
    lr, momentum, decay = (x.to(f32).reshape(N, T) for x in (lr, momentum, decay))

    pieces = []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        o, state = _chunk(state, None if q is None else q[:, s:e], k[:, s:e], v[:, s:e], lr[:, s:e],
                          momentum[:, s:e], decay[:, s:e])
        pieces.append(o)
    out = None if q is None else torch.cat(pieces, 1).reshape(B, H, T, -1).to(dtype)
    if not return_state:
        return out
    return out, {n: state[n].reshape(B, H, *state[n].shape[1:]) for n in KEYS + MOMENT_KEYS}
