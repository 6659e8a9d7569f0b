import torch

from ttt_video.config import ModelConfig
from ttt_video.models import build_model


def tiny_model(**overrides):
    """A small model of any arch, its zero-initialised layers perturbed so every path carries signal."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{"dim": 32, "depth": 2, "num_heads": 2, "text_dim": 12, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_inputs(S=3):
    """Latents of S segments of 4 frames at 8x8, two timesteps, and S captions of 5 tokens."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, S * 4, 8, 8, generator=g)
    return x, torch.tensor([10.0, 700.0]), torch.randn(2, S, 5, 12, generator=g)


def check_shapes_and_gradients(model, nonzero=False):
    """A forward with padded captions keeps the latent shape and every parameter gets a gradient."""
    x, t, text = tiny_inputs()
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[:, :, -2:] = False
    out = model(x, t, text, mask)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and (not nonzero or p.grad.abs().max() > 0) for p in model.parameters())
