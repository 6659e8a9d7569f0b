"""Titans neural memory as a module: written to with tokens, read with learned queries.

Tokens `[B, L, D]`; the op works on `[B, H, L, Dh]`. The state is a dict of per-batch memory
weights and momenta `[B, H, ...]` (see `ttt_video.ops.titans`), threaded through by the caller.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import titans_memory, titans_read


class NeuralMemory(nn.Module):
    """Per-head 2-layer MLP memory. `update(state, x)` writes tokens (keys and values projected
    from x, per-token learning rate, momentum and forgetting gates); `read(state)` returns
    `num_tokens` tokens `[B, num_tokens, D]` answered by the memory to learned queries."""

    no_weight_decay = ("b1", "b2")  # the memory's initial biases

    def __init__(self, dim, num_heads, num_tokens, chunk_size=64, base_lr=1.0, impl=None):
        super().__init__()
        self.num_heads, self.chunk_size, self.base_lr, self.impl = num_heads, chunk_size, base_lr, impl
        self.head_dim = hd = dim // num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.kv = nn.Linear(dim, 2 * dim)
        self.gates = nn.Linear(dim, 3 * num_heads)  # learning rate, momentum, forgetting
        self.queries = nn.Parameter(torch.randn(num_heads, num_tokens, hd))
        self.w1 = nn.Parameter(torch.randn(num_heads, hd, 4 * hd) / hd**0.5)
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, 4 * hd))
        self.w2 = nn.Parameter(torch.randn(num_heads, 4 * hd, hd) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(num_heads, 1, hd))
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, dim)
        self.reset_gates()

    def reset_gates(self):
        """Start near lr = base_lr / (8 chunk), momentum 0.5 and forgetting 3e-4 per token, so
        that a memory keeps most of what it holds over a few hundred tokens. A chunk's summed
        step, doubled by the momentum, stays well inside the stable range of a unit-norm
        regression (a summed lr of 0.5 diverged within a few chunks)."""
        nn.init.zeros_(self.gates.weight)
        with torch.no_grad():
            self.gates.bias.view(3, -1).copy_(torch.tensor([-2.0, 0.0, -8.0])[:, None])

    def initial_state(self, batch_size):
        return {n: w.unsqueeze(0).expand(batch_size, *w.shape) for n, w in
                zip(("w1", "b1", "w2", "b2"), (self.w1, self.b1, self.w2, self.b2))}

    def read(self, state):
        B = state["w1"].shape[0]
        q = F.normalize(self.queries, dim=-1).unsqueeze(0).expand(B, -1, -1, -1)
        y = titans_read(q, state)  # [B, H, M, Dh]
        return self.out(self.out_norm(y.transpose(1, 2).flatten(2)))

    def update(self, state, x):
        """x `[B, L, D]`: the tokens to remember. Returns the new state."""
        B, L, _ = x.shape
        h = self.norm(x)
        k, v = self.kv(h).view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = F.normalize(k, dim=-1), F.normalize(v, dim=-1)  # [B, H, L, Dh]; unit targets keep the weights bounded
        lr, momentum, decay = torch.sigmoid(self.gates(h)).view(B, L, 3, self.num_heads).permute(2, 0, 3, 1)
        lr = self.base_lr * lr / self.chunk_size  # [B, H, L]
        _, state = titans_memory(None, k, v, lr, momentum, decay, self.w1, self.b1, self.w2, self.b2,
                                 chunk_size=self.chunk_size, initial_state=state, return_state=True,
                                 impl=self.impl)
        return state
