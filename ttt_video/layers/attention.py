"""Attention local to each segment: a segment's video tokens attend with its own caption tokens.

Tokens `[B, S * L_seg, D]`: S segments laid end to end, each `[text, video]`. Reshaping to
`[B * S, L_seg, D]` makes the attention local without masks across segments.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import fused
from .rope import apply_rope, norm_rope


class SegmentAttention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x, num_segments, cos, sin, key_mask=None, attn_mask=None):
        """x `[B, S*L_seg, D]`; cos/sin `[L_seg, Dh]`; key_mask `[B, S, L_seg]` bool (True = attend);
        attn_mask `[L_seg, L_seg]` bool, shared by every segment."""
        B, L, D = x.shape
        seg = L // num_segments
        qkv = self.qkv(x).view(B * num_segments, seg, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B*S, H, L_seg, Dh]
        if isinstance(self.q_norm, nn.LayerNorm):
            prepare = fused(norm_rope, q, q.shape[-1])
            q, k = (prepare(t, norm.weight, norm.bias, cos, sin, norm.eps)
                    for t, norm in ((q, self.q_norm), (k, self.k_norm)))
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None if key_mask is None else key_mask.reshape(B * num_segments, 1, 1, seg)
        if attn_mask is not None:
            mask = attn_mask if mask is None else mask & attn_mask
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, L, D))


class SlidingWindowAttention(nn.Module):
    """Attention over the whole sequence within a band of `window` tokens on each side, added
    through a tanh gate like the TTT wrapper: the sliding-window baseline for long context."""

    def __init__(self, dim, num_heads, window, gate_init=0.1):
        super().__init__()
        self.window = window
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SegmentAttention(dim, num_heads)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init)))

    def forward(self, x, cos, sin):
        """x `[B, L, D]`; cos/sin `[L, Dh]` for the whole sequence."""
        pos = torch.arange(x.shape[1], device=x.device)
        band = (pos[:, None] - pos[None]).abs() <= self.window  # [L, L]
        return x + torch.tanh(self.gate) * self.attn(self.norm(x), 1, cos, sin, attn_mask=band)
