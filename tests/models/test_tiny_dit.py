import pytest
import torch

from ttt_video.config import ModelConfig
from ttt_video.layers.dit import condition_input
from ttt_video.models import build_model

from .common import check_shapes_and_gradients, eager_and_fused, tiny_inputs, tiny_model


def _model(mixer):
    return tiny_model(seq_mixer=mixer, ttt_mini_batch_size=16)


@pytest.mark.parametrize("mixer", ["attention", "swa", "ttt-linear", "ttt-mlp"])
def test_shapes_and_gradients(mixer):
    check_shapes_and_gradients(_model(mixer))


@pytest.mark.parametrize("mixer,global_context", [("attention", False), ("swa", True), ("ttt-mlp", True),
                                                   ("ttt-linear", True)])
def test_only_ttt_carries_context_across_segments(mixer, global_context):
    model = _model(mixer)
    x, t, text = tiny_inputs()
    text2 = text.clone()
    text2[:, 0] = torch.randn_like(text2[:, 0])  # change the first segment's caption
    with torch.no_grad():
        a, b = model(x, t, text), model(x, t, text2)
    later = (a[:, :, 4:] - b[:, :, 4:]).abs().max().item()  # segments 2 and 3
    assert (a[:, :, :4] - b[:, :, :4]).abs().max() > 1e-4
    assert (later > 1e-5) == global_context


def test_rejects_bad_shapes_and_mixers():
    model = _model("attention")
    x, t, text = tiny_inputs()
    with pytest.raises(ValueError, match="segments"):
        model(x[:, :, :11], t, text)
    with pytest.raises(ValueError, match="seq_mixer"):
        build_model(ModelConfig(seq_mixer="mamba"))


def test_image_conditioning_shapes_gradients_and_effect():
    model = tiny_model(condition_frames=1, seq_mixer="attention")
    x, t, text = tiny_inputs()
    cond = condition_input(torch.randn(2, 3, 1, 8, 8), x.shape[2], torch.tensor([True, False]))
    assert cond.shape == (2, 4, 12, 8, 8) and cond[1].abs().sum() == 0 and (cond[0, 3, 0] == 1).all()
    out = model(x, t, text, cond=cond)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        plain = model(x, t, text)
        torch.testing.assert_close(model(x, t, text, cond=cond)[1], plain[1])  # item 1 has no condition
        assert (out[0] - plain[0]).abs().max() > 1e-4


def test_conditioning_starts_at_zero_and_loads_unconditioned_weights(tmp_path):
    from ttt_video.config import Config
    from ttt_video.train.checkpoint import load_model, load_weights, save_checkpoint

    cfg = Config()
    cfg.model = ModelConfig(dim=32, depth=2, num_heads=2, text_dim=12, seq_mixer="ttt-mlp", ttt_mini_batch_size=16)
    ckpt = save_checkpoint(tmp_path, 1, tiny_model(**vars(cfg.model)), cfg)  # every layer nonzero, as if trained
    plain, cfg = load_model(ckpt)
    x, t, text = tiny_inputs()
    with torch.no_grad():
        reference = plain(x, t, text)
        torch.testing.assert_close(plain(x, t, text, cond=None), reference, rtol=0, atol=0)
        cfg.model.condition_frames = 1
        conditioned = build_model(cfg.model).eval()
        load_weights(conditioned, ckpt)
        cond = condition_input(x[:, :, :1], x.shape[2])
        torch.testing.assert_close(conditioned(x, t, text, cond=cond), reference)
    with pytest.raises(ValueError, match="no image condition"):
        plain(x, t, text, cond=cond)
    with pytest.raises(ValueError, match="condition_frames must be 0 or 1"):
        build_model(ModelConfig(condition_frames=2))
    with pytest.raises(ValueError, match="not implemented for cogvideox-ttt"):
        build_model(ModelConfig(arch="cogvideox-ttt", condition_frames=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path runs on CUDA")
def test_fused_steps_give_the_eager_model(monkeypatch):
    """On CUDA (fusion forced by `TTT_VIDEO_COMPILE=1`; full-size inputs fuse by themselves) the adaLN norms,
    attention's q and k and the TTT layer's steps run as kernels: the output and every gradient within 1e-5
    of the eager model's (relative to their norms, float32). The TTT op is the PyTorch one: the Triton op's
    float32 products are tf32, which turns the steps' last-bit differences into ~3e-5 ones."""
    model = tiny_model(seq_mixer="ttt-mlp", ttt_mini_batch_size=16, ttt_impl="torch").cuda()
    runs = eager_and_fused(model, [a.cuda() for a in tiny_inputs()], monkeypatch)
    assert len(runs[0]) == len(runs[1]) > 1
    for eager, fused in zip(*runs):
        assert (fused - eager).norm() <= 1e-5 * eager.norm()
