"""CogVideoX-TTT's long-video training memory (`enable_gradient_checkpointing(parts=, offload=)`) on
a GPU: the same gradients as whole-block recomputation, with less memory. (On the CPU the parts are
checked in test_cogvideox_ttt.py; offloading needs CUDA.) No diffusers here: the GPU image lacks it."""

import pytest
import torch

from ttt_video.models.cogvideox_ttt import CogVideoXTTT, CogVideoXTTTConfig

SEGMENTS, LAYERS = 3, 4


def _step(model, x, text, t, parts, offload):
    """Gradients of a training step, and the memory it holds above the model's own between forward
    and backward and at its peak."""
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing(parts=parts, offload=offload)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = model(x, text, t).square().mean()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {n: p.grad.clone() for n, p in model.named_parameters()}, held, peak


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parts_and_offload_keep_gradients_and_lower_peak_memory():
    torch.manual_seed(0)
    cfg = CogVideoXTTTConfig(num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
                             time_embed_dim=64, text_embed_dim=64, num_layers=LAYERS, sample_height=64,
                             sample_width=64, max_text_seq_length=16, use_rotary_positional_embeddings=True,
                             ttt="linear")
    model = CogVideoXTTT(cfg).cuda().train()
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, SEGMENTS * 12 + 1, 16, 32, 32, device="cuda", generator=g)  # 256 patches a frame
    text = torch.randn(1, SEGMENTS, 16, 64, device="cuda", generator=g)
    t = torch.tensor([500], device="cuda")
    whole, _, whole_peak = _step(model, x, text, t, False, False)
    parts, parts_held, parts_peak = _step(model, x, text, t, True, False)
    offloaded, offloaded_held, offloaded_peak = _step(model, x, text, t, True, True)
    for grads in (parts, offloaded):
        for name, grad in grads.items():
            torch.testing.assert_close(grad, whole[name], rtol=1e-4, atol=1e-6, msg=name)
    assert parts_peak < 0.7 * whole_peak, (parts_peak, whole_peak)
    # the blocks' inputs wait in host memory: after the forward at most the last copy's source is on
    # the GPU (the allocator frees it once the side stream's copy is done), in backward one at a time
    video = (x.shape[1] * 256) * cfg.dim * 4
    assert offloaded_held < parts_held - (LAYERS - 1) * video, (offloaded_held, parts_held)
    assert offloaded_peak < parts_peak - video, (offloaded_peak, parts_peak)
