"""Model architectures, one file each; `build_model(cfg)` picks by `cfg.arch`."""

from .tiny_dit import TinyDiT

ARCHS = {"tiny-dit": TinyDiT}


def build_model(cfg):
    try:
        cls = ARCHS[cfg.arch]
    except KeyError:
        raise ValueError(f"unknown model arch {cfg.arch!r}; available: {', '.join(sorted(ARCHS))}") from None
    return cls(cfg)
