"""Pure tensor functions: no module state. Layout `[B, H, T, Dh]`."""

from .titans import titans_memory, titans_read
from .ttt import ttt_linear, ttt_mlp

__all__ = ["titans_memory", "titans_read", "ttt_linear", "ttt_mlp"]
