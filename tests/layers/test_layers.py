import pytest
import torch

from ttt_video.layers.attention import SegmentAttention
from ttt_video.layers.rope import apply_rope, rope_3d, with_text
from ttt_video.layers.ttt import TTT, BidirectionalTTT


def test_rope_keeps_norm_and_depends_on_relative_position():
    cos, sin = rope_3d(6, 1, 1, 16)
    q = torch.randn(16).expand(6, 16)
    k = torch.randn(16).expand(6, 16)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # same offset, same score
    torch.testing.assert_close((rq[3] * rk[1]).sum(), (rq[5] * rk[3]).sum())
    assert not torch.allclose((rq[3] * rk[1]).sum(), (rq[4] * rk[1]).sum())


def test_text_rows_are_not_rotated_and_positions_restart_per_segment():
    cos, sin = rope_3d(2, 2, 2, 8)
    c, s = with_text(cos, sin, text_len=3, num_segments=2)
    assert c.shape == (2 * (3 + 8), 8)
    x = torch.randn(c.shape[0], 8)
    y = apply_rope(x, c, s)
    torch.testing.assert_close(y[:3], x[:3])
    torch.testing.assert_close(c[:11], c[11:])


def test_segment_attention_is_local():
    torch.manual_seed(0)
    attn = SegmentAttention(32, 4)
    cos, sin = with_text(*rope_3d(1, 2, 2, 8), 2, 1)
    x = torch.randn(1, 3 * 6, 32)
    y = attn(x, 3, cos, sin)
    x2 = x.clone()
    x2[:, 12:] += 1.0  # change segment 3 only
    y2 = attn(x2, 3, cos, sin)
    torch.testing.assert_close(y[:, :12], y2[:, :12])
    assert (y[:, 12:] - y2[:, 12:]).abs().max() > 1e-3


def test_ttt_reverse_pass_is_the_forward_pass_on_the_flipped_sequence():
    torch.manual_seed(0)
    layer = TTT(32, 2, kind="mlp", mini_batch_size=8).double()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_3d(24, 1, 1, 16))
    rev = layer(x, cos, sin, reverse=True)
    ref = layer(x.flip(1), cos.flip(0), sin.flip(0)).flip(1)
    torch.testing.assert_close(rev, ref)
    assert (rev - layer(x, cos, sin)).abs().max() > 1e-6


def test_bidirectional_gates_and_global_context():
    torch.manual_seed(0)
    block = BidirectionalTTT(32, 2, kind="linear", mini_batch_size=8, gate_init=0.0)
    cos, sin = rope_3d(40, 1, 1, 16)
    x = torch.randn(1, 40, 32)
    torch.testing.assert_close(block(x, cos, sin), x)  # closed gates: identity
    with torch.no_grad():
        block.gate_fwd.fill_(0.5)
        block.gate_bwd.fill_(0.5)
    y = block(x, cos, sin)
    x2 = x.clone()
    x2[:, -1] = torch.randn(32)  # the reversed pass carries the last token's change to the first mini-batch
    assert (block(x2, cos, sin)[:, 0] - y[:, 0]).abs().max() > 1e-5


def test_memory_stays_bounded_when_its_value_projection_grows():
    from ttt_video.layers.memory import NeuralMemory

    torch.manual_seed(0)
    memory = NeuralMemory(64, 4, 8, chunk_size=64)
    with torch.no_grad():
        memory.kv.weight.mul_(10)  # unnormalised values of this size overflowed the memory
    state = memory.initial_state(2)
    for _ in range(8):  # 8 segments of 256 tokens
        state = memory.update(state, torch.randn(2, 256, 64))
    assert all(torch.isfinite(w).all() and w.abs().max() < 10 for w in state.values())
    assert torch.isfinite(memory.read(state)).all()


def test_ttt_op_gets_one_activation_dtype_under_autocast(monkeypatch):
    import ttt_video.layers.ttt as ttt_layer

    seen = []

    def op(q, k, v, eta, *weights, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return q
    monkeypatch.setattr(ttt_layer, "ttt_mlp", op)
    layer = TTT(64, 4, kind="mlp", mini_batch_size=16)
    cos, sin = rope_3d(2, 2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(1, 16, 64), cos, sin)
    assert seen == [(torch.bfloat16,) * 3]  # the norms run in float32 under autocast; the op must not


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path runs on CUDA")
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_ttt_layer_equals_eager(monkeypatch, reverse):
    """Output and gradients, each within 1e-5 of the eager layer's norm: the kernels sum in another order,
    and single elements of a gradient that cancels (the q, k, v projection's) differ by more than 1e-4."""
    torch.manual_seed(0)
    layer = TTT(128, 2, kind="mlp", mini_batch_size=16).cuda()
    x = torch.randn(2, 80, 128, device="cuda", requires_grad=True)
    cos, sin = (t.cuda() for t in rope_3d(5, 4, 4, 64))
    outs = []
    for compile_flag in ("0", "1"):
        monkeypatch.setenv("TTT_VIDEO_COMPILE", compile_flag)
        y = layer(x, cos, sin, reverse=reverse)
        outs.append((y, *torch.autograd.grad(y.square().sum(), [x, layer.qkv.weight, layer.ln_weight])))
    for eager, fused in zip(*outs):
        assert (fused - eager).norm() <= 1e-5 * eager.norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path runs on CUDA")
def test_fused_segment_attention_equals_eager(monkeypatch):
    """q and k layer-normed and rotated by one kernel (`layers.fusion`) against the eager steps: the output
    and the gradients of the input and of the norms' weights."""
    torch.manual_seed(0)
    attn = SegmentAttention(128, 2).cuda()
    with torch.no_grad():
        attn.q_norm.weight.add_(0.1 * torch.randn_like(attn.q_norm.weight))
        attn.k_norm.bias.add_(0.1 * torch.randn_like(attn.k_norm.bias))
    x = torch.randn(2, 2 * 40, 128, device="cuda", requires_grad=True)
    cos, sin = (t[:40].cuda() for t in rope_3d(5, 4, 4, 64))
    outs = []
    for compile_flag in ("0", "1"):
        monkeypatch.setenv("TTT_VIDEO_COMPILE", compile_flag)
        y = attn(x, 2, cos, sin)
        params = [x, attn.qkv.weight, attn.q_norm.weight, attn.q_norm.bias, attn.k_norm.weight, attn.k_norm.bias]
        outs.append((y, *torch.autograd.grad(y.square().sum(), params)))
    for eager, fused in zip(*outs):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path runs on CUDA")
@pytest.mark.parametrize("reverse", [False, True])
def test_inference_kernels_give_the_eager_layer(monkeypatch, reverse):
    torch.manual_seed(0)
    layer = TTT(128, 2, kind="linear", mini_batch_size=16).cuda().to(torch.bfloat16)
    x = torch.randn(2, 80, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = (t.cuda() for t in rope_3d(5, 4, 4, 64))
    outs = []
    for compile_flag in ("0", "1"):
        monkeypatch.setenv("TTT_VIDEO_COMPILE", compile_flag)
        with torch.no_grad():
            outs.append(layer(x, cos, sin, reverse=reverse))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)


def test_fusion_is_chosen_by_device_size_and_switch(monkeypatch):
    from ttt_video.layers import fusion, rope
    from ttt_video.layers import ttt as ttt_layer

    class Input:  # what `fused` looks at: the device and the size
        def __init__(self, numel, is_cuda=True):
            self.n, self.is_cuda = numel, is_cuda

        def numel(self):
            return self.n

    big, small = fusion.FUSE_MIN_ELEMENTS, fusion.FUSE_MIN_ELEMENTS - 1
    fn = ttt_layer._merge_heads
    monkeypatch.delenv("TTT_VIDEO_COMPILE", raising=False)
    assert fusion.fused(fn, Input(big), 64) is not fn and fusion.fused(fn, Input(small), 64) is fn
    assert fusion.fused(fn, Input(big, is_cuda=False), 64) is fn
    monkeypatch.setenv("TTT_VIDEO_COMPILE", "0")
    assert fusion.fused(fn, Input(big), 64) is fn
    monkeypatch.setenv("TTT_VIDEO_COMPILE", "1")
    assert fusion.fused(fn, Input(small), 64) is not fn
    pytest.importorskip("triton")
    from ttt_video.ops.ttt import layer_io

    with torch.no_grad():
        assert fusion.fused(fn, Input(big), 64) is layer_io.merge_heads
        assert fusion.fused(ttt_layer._inner_inputs, Input(big), 64) is layer_io.inner_inputs
        assert fusion.fused(rope.norm_rope, Input(big), 64) is layer_io.norm_rope
        assert fusion.fused(fn, Input(big), 48) is not layer_io.merge_heads  # compiled instead
