import pytest
import torch

from ttt_video.config import ModelConfig
from ttt_video.models import build_model

from .common import tiny_inputs, tiny_model


def _model(mixer):
    return tiny_model(seq_mixer=mixer, ttt_mini_batch_size=16)


@pytest.mark.parametrize("mixer", ["attention", "swa", "ttt-linear", "ttt-mlp"])
def test_shapes_and_gradients(mixer):
    model = _model(mixer)
    x, t, text = tiny_inputs()
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[:, :, -2:] = False
    out = model(x, t, text, mask)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


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
