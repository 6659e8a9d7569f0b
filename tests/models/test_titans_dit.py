import pytest
import torch

from .common import check_shapes_and_gradients, tiny_inputs, tiny_model


def _model(**kw):
    return tiny_model(arch="titans-dit", num_memory_tokens=3, num_persistent_tokens=2, memory_chunk_size=16, **kw)


def test_shapes_and_gradients():
    check_shapes_and_gradients(_model(), nonzero=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, text = tiny_inputs(2)
    grads = []
    for ckpt in (False, True):
        model = _model().train()
        model.gradient_checkpointing = ckpt
        model(x[:, :, :8], t, text).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_memory_carries_context_and_segments_are_causal():
    model = _model()
    x, t, text = tiny_inputs()
    text2, x2 = text.clone(), x.clone()
    text2[:, 0] = torch.randn_like(text2[:, 0])  # segment 1's caption
    x2[:, :, 8:] = torch.randn_like(x2[:, :, 8:])  # segment 3's latents
    with torch.no_grad():
        a, b, c = model(x, t, text), model(x, t, text2), model(x2, t, text)
    assert (a[:, :, 4:8] - b[:, :, 4:8]).abs().max() > 1e-5  # segment 2 remembers segment 1
    assert (a[:, :, 8:] - b[:, :, 8:]).abs().max() > 1e-5
    torch.testing.assert_close(a[:, :, :8], c[:, :, :8], rtol=0, atol=0)  # nothing flows back


def test_bad_shapes():
    x, t, text = tiny_inputs()
    with pytest.raises(ValueError, match="segments"):
        _model()(x[:, :, :11], t, text)
