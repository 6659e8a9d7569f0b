"""Where the layers fuse their memory-bound steps.

Around attention (each head's q and k layer-normed and rotated) and around the TTT op (q, k, v
normalised, rotated and re-targeted; heads moved in and out) a layer does elementwise work over a
whole segment or the whole video. On CUDA, for inputs of at least `FUSE_MIN_ELEMENTS`, such a step
(an eager function `name` or `_name`) runs as the Triton kernels `ttt_video.ops.ttt.layer_io.name`,
forward and backward; where Triton is missing or the head dim is not a power of two, as the eager
function `torch.compile`d. Smaller inputs, where fusing would cost more than it saves, and other
devices run the eager function (the same arithmetic). `TTT_VIDEO_COMPILE=0` never fuses, `=1`
always does (on CUDA).
"""

import os

import torch

FUSE_MIN_ELEMENTS = 2**24  # a 3 s CogVideoX segment has 55M; a shapes-tiny batch about 3M
_COMPILED = {}


def fuses(x):
    """Whether a step fuses for an input of x's size on CUDA (`TTT_VIDEO_COMPILE`)."""
    mode = os.environ.get("TTT_VIDEO_COMPILE", "auto")
    return mode == "1" or (mode != "0" and x.numel() >= FUSE_MIN_ELEMENTS)


def fused(fn, x, head_dim=None):
    """What runs the eager step `fn` for input x: its kernels, `fn` compiled, or `fn`. `head_dim`: for the
    steps whose kernels take a power of two only."""
    if not (x.is_cuda and fuses(x)):
        return fn
    if (kernel := _kernel(fn, head_dim)) is not None:
        return kernel
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _kernel(fn, head_dim):
    """The Triton kernels doing what `fn` does, or None (no Triton, or a head dim that is not a power of two)."""
    if head_dim is not None and head_dim & (head_dim - 1):
        return None
    try:
        from ..ops.ttt import layer_io
    except ImportError:
        return None
    return getattr(layer_io, fn.__name__.lstrip("_"))
