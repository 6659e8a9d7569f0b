"""Scaled dot-product attention whose results a checkpointed part's recompute can take from the run before.

`attend(q, k, v)` is `F.scaled_dot_product_attention(q, k, v)`. Where it takes a gradient and PyTorch
would run cuDNN's or flash attention's fused kernel, it runs that kernel's forward and backward ops
itself, so that in an `ops.memo` context (CogVideoX's part-wise recompute: each segment's attention a
checkpointed part of a checkpointed block) the block's recompute keeps the forward's output and
log-sum-exp and the part's own recompute returns them: one attention forward a part fewer in a training
step, for one segment's output and log-sum-exp held from the block's recompute to the part's backward.

Its backward hands the kernel the output's gradient in the output's layout. PyTorch (2.11) caches
cuDNN's backward graphs by the shapes and strides of q, k and v alone, with the gradient's strides
fixed in the graph; a call whose gradient comes in another layout than the cached graph's gets wrong
gradients (measured on an H100). One layout for every call of `attend` keeps its own calls right.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from . import memo


class _Kernels:
    """A fused kernel's forward and backward ops: `forward(q, k, v)` gives the output, the log-sum-exp
    and the tensors its backward takes besides them; `backward(g, q, k, v, out, lse, *extra)` the
    gradients of q, k and v."""

    def __init__(self, name):
        self.name = name

    def forward(self, q, k, v):
        if self.name == "cudnn":
            out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, False, False)
        else:
            out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, False, False)
        return out, lse, seed, offset

    def backward(self, g, q, k, v, out, lse, seed, offset):
        Lq, Lk = q.shape[-2], k.shape[-2]
        if self.name == "cudnn":
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                g, q, k, v, out, lse, seed, offset, None, None, None, Lq, Lk, 0.0, False)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            g, q, k, v, out, lse, None, None, Lq, Lk, 0.0, False, seed, offset)


def _takes(op, *names):
    return set(names) <= {a.name for a in op.default._schema.arguments}


_KERNELS = {int(SDPBackend.FLASH_ATTENTION): _Kernels("flash")}
if _takes(torch.ops.aten._scaled_dot_product_cudnn_attention, "attn_bias", "compute_log_sumexp"):
    # the cuDNN ops' arguments as called above (PyTorch 2.5 on; before, PyTorch's own path runs it)
    _KERNELS[int(SDPBackend.CUDNN_ATTENTION)] = _Kernels("cudnn")


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernels):
        out, lse, *extra = memo.kept_or(lambda: kernels.forward(q, k, v))
        ctx.save_for_backward(q, k, v, out, lse, *extra)
        ctx.kernels = kernels
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, *rest = ctx.saved_tensors
        if g.stride() != out.stride():  # one layout for the gradient (above)
            g = torch.empty_like(out).copy_(g)
        return (*ctx.kernels.backward(g, q, k, v, out, *rest), None)


def attend(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q, k, v `[B, H, L, d]`, as `F.scaled_dot_product_attention`."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and q.is_cuda and torch.is_autocast_enabled("cuda"):  # as autocast casts the inputs of SDPA
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    kernels = _kernels(q, k, v) if grad else None
    if kernels is None:
        return F.scaled_dot_product_attention(q, k, v)
    return _Attention.apply(q, k, v, kernels)


def _kernels(q, k, v):
    """The fused kernels `F.scaled_dot_product_attention` runs on q, k, v where it is cuDNN's or flash
    attention's (CUDA), else None."""
    return _KERNELS.get(int(torch._fused_sdp_choice(q, k, v))) if q.is_cuda else None
