"""Model architectures, one file each; `build_model(cfg)` picks by `cfg.arch`."""

from ..errors import UserError
from .cogvideox_ttt import CogVideoXTTT, FrameworkCogVideoXTTT
from .sora_dit import SoraDiT
from .svd import SVD
from .tiny_dit import TinyDiT
from .titans_dit import TitansDiT

__all__ = ["ARCHS", "CogVideoXTTT", "FrameworkCogVideoXTTT", "SVD", "SoraDiT", "TinyDiT", "TitansDiT", "build_model"]

ARCHS = {"tiny-dit": TinyDiT, "cogvideox-ttt": FrameworkCogVideoXTTT.from_model_config, "sora-dit": SoraDiT,
         "titans-dit": TitansDiT, "svd": SVD}


def build_model(cfg):
    try:
        cls = ARCHS[cfg.arch]
    except KeyError:
        raise UserError(f"unknown model arch {cfg.arch!r}; available: {', '.join(sorted(ARCHS))}") from None
    if cfg.condition_frames and cfg.arch == "cogvideox-ttt":
        raise ValueError("model.condition_frames (image-to-video) is not implemented for cogvideox-ttt")
    return cls(cfg)
