"""`ops.attention.attend` on the GPU: cuDNN's and flash attention's forward and backward ops run directly,
their results kept from a block's recompute for a part's recompute (the CPU test of the plumbing, with
a stand-in kernel, is tests/models/test_cogvideox_ttt.py's part-wise recompute test). References run
PyTorch's math backend: its cuDNN backend caches backward graphs that a call with another gradient
layout would reuse (`ops/attention.py`)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ttt_video.ops import attention
from ttt_video.ops.memo import OpMemo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="fused attention kernels need CUDA")
BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
B, H, L, D = 2, 4, 300, 64


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


LAYOUTS = ["views", "tokens", "heads"]


def _heads(x, layout):
    """q, k, v `[B, H, L, D]` of a joint projection x `[B, L, 3 H D]`: its views; each in `[B, L, H, D]` memory
    of its own (CogVideoX's attention: q and k out of the fused norm and RoPE, v a view of its projection); or
    each contiguous."""
    q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in x.chunk(3, -1))
    if layout == "tokens":
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return (q.contiguous(), k.contiguous(), v.contiguous()) if layout == "heads" else (q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_blocks_recompute_keeps_the_attention_results_for_the_parts_recompute(backend, monkeypatch):
    """A checkpointed block whose attention is a checkpointed part with a memo, then a part that takes its
    output: the step's first forward and the block's recompute run the kernel, the part's recompute takes
    what the block's kept, and the gradients are those of the math backend."""
    runs = []
    monkeypatch.setattr(attention._Kernels, "forward",
                        lambda self, *a, real=attention._Kernels.forward: runs.append(self.name) or real(self, *a))
    torch.manual_seed(0)
    x0 = torch.randn(B, L, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    scale = torch.nn.Parameter(torch.ones(H * D, device="cuda", dtype=torch.bfloat16))
    memo = OpMemo()

    def block(x, memo):
        context = memo.contexts if memo else torch.utils.checkpoint.noop_context_fn
        y = checkpoint(lambda t: attention.attend(*_heads(t, "tokens")).transpose(1, 2).flatten(2), x * 1.5,
                       use_reentrant=False, context_fn=context)
        return checkpoint(lambda t: t.sin() * scale, y, use_reentrant=False)

    def step(backend, memo):
        runs.clear()
        scale.grad = None
        x = x0.clone().requires_grad_()
        with sdpa_kernel(backend):
            y = checkpoint(block, x, memo, use_reentrant=False)
            y.float().square().sum().backward()
        return list(runs), x.grad, scale.grad

    ran, grad, scale_grad = step(backend, memo)
    assert ran == [{SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash"}[backend]] * 2
    assert memo.results is None
    ran, ref, ref_scale = step(SDPBackend.MATH, None)
    assert ran == []
    assert _rel(grad, ref) < 1e-2 and _rel(scale_grad, ref_scale) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_right_whatever_layout_the_output_gradient_comes_in(backend):
    """For each layout of q, k and v (one cached cuDNN graph each), the output's gradient arriving in two
    layouts, one call after the other: both right."""
    torch.manual_seed(1)
    x0 = torch.randn(B, L, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    probe = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    for layout in LAYOUTS:
        for merge in (lambda o: o.transpose(1, 2).flatten(2), lambda o: o):
            grads = []
            for b in (backend, SDPBackend.MATH):
                x = x0.clone().requires_grad_()
                with sdpa_kernel(b):
                    y = merge(attention.attend(*_heads(x, layout)))
                grads.append(torch.autograd.grad((y * merge(probe)).float().sum(), x)[0])
            assert _rel(*grads) < 1e-2, (layout, _rel(*grads))


def test_without_a_gradient_it_is_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert torch.equal(attention.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_it_takes_the_autocast_dtype_as_sdpa_does(dtype):
    """q and k in float32 (an eager LayerNorm under autocast gives float32), v in half precision."""
    torch.manual_seed(0)
    q, k = (torch.randn(1, 2, 100, 64, device="cuda", requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 100, 64, device="cuda", dtype=dtype, requires_grad=True)
    outs = []
    for fn in (attention.attend, F.scaled_dot_product_attention):
        with torch.autocast("cuda", dtype=dtype):
            out = fn(q, k, v)
        outs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and _rel(a, b) < 1e-2
