import pytest
import torch

from ttt_video.config import ModelConfig
from ttt_video.models import build_model

from .common import tiny_inputs, tiny_model


def _model(attention_type):
    return tiny_model(arch="sora-dit", attention_type=attention_type)


@pytest.mark.parametrize("attention_type", ["st", "full"])
def test_shapes_and_gradients(attention_type):
    model = _model(attention_type)
    x, t, text = tiny_inputs()
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[:, :, -2:] = False
    mask[0, 1] = False  # an empty caption
    out = model(x, t, text, mask)
    assert out.shape == x.shape
    assert out.isfinite().all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


@pytest.mark.parametrize("attention_type", ["st", "full"])
def test_captions_steer_their_segment_and_attention_spans_the_video(attention_type):
    model = _model(attention_type)
    x, t, text = tiny_inputs()
    text2 = text.clone()
    text2[:, 0] = torch.randn_like(text2[:, 0])
    x2 = x.clone()
    x2[:, :, -1] = torch.randn_like(x2[:, :, -1])  # the last frame
    with torch.no_grad():
        a, b, c = model(x, t, text), model(x, t, text2), model(x2, t, text)
    assert (a[:, :, :4] - b[:, :, :4]).abs().max() > 1e-4
    assert (a[:, :, :2] - c[:, :, :2]).abs().max() > 1e-5  # the first frames see the last one


def test_st_and_full_differ_and_badtiny_inputs():
    x, t, text = tiny_inputs()
    with torch.no_grad():
        assert (_model("st")(x, t, text) - _model("full")(x, t, text)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="segments"):
        _model("st")(x[:, :, :11], t, text)
    with pytest.raises(ValueError, match="attention_type"):
        build_model(ModelConfig(arch="sora-dit", attention_type="axial"))
