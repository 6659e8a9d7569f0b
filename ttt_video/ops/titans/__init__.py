"""Titans neural memory (Behrouz et al., 2025) with implementation dispatch.

Shapes: q, k, v `[B, H, T, D]`; lr, momentum, decay `[B, H, T]` (per token and head: the inner
learning rate theta_t >= 0, the momentum eta_t and the forgetting gate alpha_t, both in [0, 1]);
memory weights w1 `[H, D, E]`, b1 `[H, 1, E]`, w2 `[H, E, D]`, b2 `[H, 1, D]`.

Per batch element and head:
- memory M(x; W) = gelu(x w1 + b1) w2 + b2 (exact gelu); W_0 = the given weights;
- associative loss l_t(W) = 1/2 ||M(k_t; W) - v_t||^2;
- the sequence is cut into chunks of `chunk_size` tokens (the last may be shorter); the surprise
  u_t = grad l_t is taken at the weights the chunk starts from (the paper's parallel form;
  chunk_size=1 is the token-by-token recurrence, with the gradient at W_{t-1});
- momentum S_t = eta_t S_{t-1} - theta_t u_t (S_0 = 0 unless given);
- weights W_t = (1 - alpha_t) W_{t-1} + S_t;
- read-out y_t = M(q_t; W_t): each token reads the memory right after its own update, as in
  the paper's retrieval, so y is causal within a chunk as well as across chunks.

`initial_state` is a dict of per-batch weights `[B, H, ...]` ("w1", "b1", "w2", "b2") and
optionally their momenta ("s_w1", ...; zero when left out). `return_state=True` returns
`(out, state)` with all eight. `q=None` skips the read-out (only the state, out is None).

`impl`: "reference" (the definition, token by token with autograd; float64 in tests), "torch"
(each chunk in closed form batched over B*H), or None (torch).
"""

from . import reference
from . import torch as torch_impl

IMPLS = ("reference", "torch")


def _pick(impl):
    if impl is None or impl == "torch":
        return torch_impl
    if impl == "reference":
        return reference
    raise ValueError(f"unknown Titans impl {impl!r}; choose one of {IMPLS}")


def titans_memory(q, k, v, lr, momentum, decay, w1, b1, w2, b2, *, chunk_size=64, initial_state=None,
                  return_state=False, impl=None):
    """Update the memory with (k, v) and read it with q; see the module docstring."""
    if q is None and not return_state:
        raise ValueError("titans_memory with q=None returns nothing; pass return_state=True")
    return _pick(impl).titans_memory(q, k, v, lr, momentum, decay, w1, b1, w2, b2, chunk_size=chunk_size,
                                     initial_state=initial_state, return_state=return_state)


def titans_read(q, state):
    """Read a memory state: q `[B, H, M, D]`, state weights `[B, H, ...]` -> M(q) `[B, H, M, D]`."""
    return reference.memory_mlp(state, q)
