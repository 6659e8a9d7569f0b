"""TTT layer (TTT-Linear / TTT-MLP) and its gated bidirectional wrapper, as in TTT-Video.

Tokens `[B, L, D]` (text and video interleaved per segment); the op works on `[B, H, L, Dh]`.

Around the op the layer is memory-bound elementwise work over the whole video (normalising,
rotating and re-targeting q, k, v; moving heads in and out): `_inner_inputs` and `_merge_heads`,
fused on CUDA as `layers.fusion` says.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import ttt_linear, ttt_mlp
from ..ops.memo import OpMemo
from .dit import add_gated
from .fusion import fused
from .rope import apply_rope

KINDS = ("linear", "mlp")


def _inner_inputs(qkv, cos, sin, ln_weight, ln_bias, num_heads, reverse=False):
    """qkv `[B, L, 3 D]` -> contiguous q, k, v `[B, H, L, Dh]` in qkv's dtype: q and k unit-norm
    per head and rotated; the reconstruction target v' = LN_h(v - k) + k. With `reverse` the tokens
    come out last to first (cos/sin stay in qkv's order)."""
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q = apply_rope(F.normalize(q, dim=-1), cos, sin)
    k = apply_rope(F.normalize(k, dim=-1), cos, sin)
    d = v - k
    d = F.layer_norm(d.float(), (d.shape[-1],), eps=1e-6).to(d.dtype)
    v = d * ln_weight[:, None] + ln_bias[:, None] + k
    # under autocast the norms above return float32; the op gets the projection's dtype
    return tuple((t.flip(2) if reverse else t).to(qkv.dtype).contiguous() for t in (q, k, v))


def _merge_heads(o, weight, bias, reverse=False):
    """o `[B, H, L, Dh]` -> post-normed `[B, L, H * Dh]`; with `reverse` o holds the tokens last to first."""
    o = (o.flip(2) if reverse else o).transpose(1, 2).flatten(2)
    return F.layer_norm(o, o.shape[-1:], weight, bias, eps=1e-6)


class TTT(nn.Module):
    """One TTT pass: projections, per-head normalisation, RoPE, the TTT op, post-norm, output projection."""

    no_weight_decay = ("b1", "b2", "ln_weight", "ln_bias")  # inner biases, per-head LayerNorm

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
        """x `[B, L, D]`; cos/sin `[L, Dh]` (identity rows for text). reverse runs the scan back to front:
        the op gets the tokens last to first, from the head split on; the rest works per token."""
        prepare = fused(_inner_inputs, x, self.head_dim)
        q, k, v = prepare(self.qkv(x), cos, sin, self.ln_weight, self.ln_bias, self.num_heads, reverse)
        eta = self.base_lr * torch.sigmoid(self.lr_gate(x)) / (self.head_dim * self.mini_batch_size)
        eta = eta.transpose(1, 2)  # [B, H, L]
        op = ttt_mlp if self.kind == "mlp" else ttt_linear
        o = op(q, k, v, eta.flip(2) if reverse else eta, *self.inner_weights(), self.ln_weight, self.ln_bias,
               mini_batch_size=self.mini_batch_size, impl=self.impl)
        merge = fused(_merge_heads, x, self.head_dim)
        return self.out(merge(o, self.post_norm.weight, self.post_norm.bias, reverse))


class BidirectionalTTT(nn.Module):
    """A TTT pass over the sequence, then one over the reversed sequence (shared TTT weights),
    each added through a tanh gate initialised small so a pretrained block starts near itself.
    `checkpoint_passes` is for a checkpointed block (CogVideoX's part-wise recompute): training keeps
    only the first pass's input and recomputes that pass in backward, so the block's recompute holds one
    pass's activations, the second's, whose backward comes first. The TTT kernels' results of the first
    pass's run in the block's recompute are kept for the pass's own recompute, which then skips the kernels
    (`ops.memo`: one TTT forward fewer, for the output and inner-state checkpoints held from the block's
    recompute to the pass's backward). The second pass runs once in the block's recompute: a checkpoint of
    its own would run its projections and norms once more for one pass's activations less."""

    def __init__(self, dim, num_heads, kind="mlp", mini_batch_size=64, base_lr=1.0, gate_init=0.1, impl=None):
        super().__init__()
        self.ttt = TTT(dim, num_heads, kind, mini_batch_size, base_lr, impl)
        self.norm_fwd = nn.LayerNorm(dim, eps=1e-6)
        self.norm_bwd = nn.LayerNorm(dim, eps=1e-6)
        self.gate_fwd = nn.Parameter(torch.full((dim,), float(gate_init)))
        self.gate_bwd = nn.Parameter(torch.full((dim,), float(gate_init)))
        self._memo = OpMemo()  # the first pass's TTT results between its runs in backward

    def forward(self, x, cos, sin, checkpoint_passes=False):
        if checkpoint_passes and torch.is_grad_enabled():
            x = checkpoint(self._gated_pass, x, cos, sin, False, use_reentrant=False, context_fn=self._memo.contexts)
        else:
            x = self._gated_pass(x, cos, sin, False)
        return self._gated_pass(x, cos, sin, True)

    def _gated_pass(self, x, cos, sin, reverse):
        norm, gate = (self.norm_bwd, self.gate_bwd) if reverse else (self.norm_fwd, self.gate_fwd)
        # the gate in the stream's dtype: under autocast a float32 gate would turn the bf16 stream float32
        return add_gated(x, torch.tanh(gate).to(x.dtype), self.ttt(norm(x), cos, sin, reverse=reverse))
