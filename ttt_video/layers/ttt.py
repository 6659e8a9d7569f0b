"""TTT layer (TTT-Linear / TTT-MLP) and its gated bidirectional wrapper, as in TTT-Video.

Tokens `[B, L, D]` (text and video interleaved per segment); the op works on `[B, H, L, Dh]`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import ttt_linear, ttt_mlp
from .rope import apply_rope

KINDS = ("linear", "mlp")


class TTT(nn.Module):
    """One TTT pass: projections, per-head normalisation, RoPE, the TTT op, post-norm, output projection."""

    def __init__(self, dim, num_heads, kind="mlp", mini_batch_size=64, base_lr=1.0, impl=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown TTT kind {kind!r}; choose one of {KINDS}")
        self.kind, self.num_heads, self.mini_batch_size, self.base_lr, self.impl = (
            kind, num_heads, mini_batch_size, base_lr, impl)
        self.head_dim = hd = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lr_gate = nn.Linear(dim, num_heads)  # per-head inner learning-rate gate
        self.ln_weight = nn.Parameter(torch.ones(num_heads, hd))
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, hd))
        inner = 4 * hd if kind == "mlp" else hd
        self.w1 = nn.Parameter(torch.randn(num_heads, hd, inner) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, inner))
        if kind == "mlp":
            self.w2 = nn.Parameter(torch.randn(num_heads, inner, hd) * 0.02)
            self.b2 = nn.Parameter(torch.zeros(num_heads, 1, hd))
        self.post_norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, dim)

    def inner_weights(self):
        return (self.w1, self.b1, self.w2, self.b2) if self.kind == "mlp" else (self.w1, self.b1)

    def forward(self, x, cos, sin, reverse=False):
        """x `[B, L, D]`; cos/sin `[L, Dh]` (identity rows for text). reverse runs the scan back to front."""
        B, L, D = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(F.normalize(q, dim=-1), cos, sin)  # [B, H, L, Dh]
        k = apply_rope(F.normalize(k, dim=-1), cos, sin)
        d = v - k  # reconstruction target v' = LN_h(v - k) + k
        d = F.layer_norm(d.float(), (self.head_dim,), eps=1e-6).to(d.dtype)
        v = d * self.ln_weight[:, None] + self.ln_bias[:, None] + k
        # the op in the projection's dtype: under autocast the norms above return float32
        q, k, v = (t.to(qkv.dtype) for t in (q, k, v))
        eta = self.base_lr * torch.sigmoid(self.lr_gate(x)) / (self.head_dim * self.mini_batch_size)
        eta = eta.transpose(1, 2)  # [B, H, L]
        if reverse:
            q, k, v, eta = (t.flip(2) for t in (q, k, v, eta))
        op = ttt_mlp if self.kind == "mlp" else ttt_linear
        o = op(q, k, v, eta, *self.inner_weights(), self.ln_weight, self.ln_bias,
               mini_batch_size=self.mini_batch_size, impl=self.impl)
        if reverse:
            o = o.flip(2)
        o = o.transpose(1, 2).reshape(B, L, D)
        return self.out(self.post_norm(o))


class BidirectionalTTT(nn.Module):
    """A TTT pass over the sequence, then one over the reversed sequence (shared TTT weights),
    each added through a tanh gate initialised small so a pretrained block starts near itself."""

    def __init__(self, dim, num_heads, kind="mlp", mini_batch_size=64, base_lr=1.0, gate_init=0.1, impl=None):
        super().__init__()
        self.ttt = TTT(dim, num_heads, kind, mini_batch_size, base_lr, impl)
        self.norm_fwd = nn.LayerNorm(dim, eps=1e-6)
        self.norm_bwd = nn.LayerNorm(dim, eps=1e-6)
        self.gate_fwd = nn.Parameter(torch.full((dim,), float(gate_init)))
        self.gate_bwd = nn.Parameter(torch.full((dim,), float(gate_init)))

    def forward(self, x, cos, sin):
        x = x + torch.tanh(self.gate_fwd) * self.ttt(self.norm_fwd(x), cos, sin)
        return x + torch.tanh(self.gate_bwd) * self.ttt(self.norm_bwd(x), cos, sin, reverse=True)

