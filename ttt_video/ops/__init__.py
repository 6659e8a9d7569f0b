"""Pure tensor functions: no module state. Layout `[B, H, T, Dh]`."""

from .ttt import ttt_linear, ttt_mlp

__all__ = ["ttt_linear", "ttt_mlp"]
