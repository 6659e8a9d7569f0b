"""3D rotary position embedding for video tokens.

The head dim splits into time / height / width parts (1/4, 3/8, 3/8, each even); each part
rotates adjacent channel pairs by its own axis position. Tables are `[L, Dh]`; text tokens
get the identity rotation (cos 1, sin 0), so one table covers an interleaved sequence.
"""

import torch
import torch.nn.functional as F


def _axis_angles(pos, dim, theta):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.repeat_interleave(pos.double()[:, None] * inv[None], 2, dim=1)  # [L, dim]


def rope_3d(frames, height, width, head_dim, theta=10000.0):
    """cos, sin `[frames*height*width, head_dim]` for a (t, y, x) grid in raster order."""
    dt = head_dim // 4 // 2 * 2
    dh = (head_dim - dt) // 2 // 2 * 2
    dw = head_dim - dt - dh
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    ang = torch.cat([_axis_angles(t.flatten(), dt, theta), _axis_angles(y.flatten(), dh, theta),
                     _axis_angles(x.flatten(), dw, theta)], 1)
    return ang.cos().float(), ang.sin().float()


def with_text(cos, sin, text_len, num_segments):
    """Tables for `num_segments` segments of [text_len text tokens, video tokens]; positions restart per segment.
    Built on cos / sin's device: move one segment's tables there first, not the whole video's."""
    one = cos.new_ones(text_len, cos.shape[1])
    zero = sin.new_zeros(text_len, sin.shape[1])
    return torch.cat([one, cos], 0).repeat(num_segments, 1), torch.cat([zero, sin], 0).repeat(num_segments, 1)


def apply_rope(x, cos, sin):
    """x `[..., L, Dh]`, cos/sin `[L, Dh]`: rotate adjacent pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def norm_rope(x, weight, bias, cos=None, sin=None, eps=1e-6):
    """Attention's q or k `[B, H, L, Dh]`: LayerNorm over the head dim (weight, bias `[Dh]`, shared by the
    heads), then `apply_rope` unless cos / sin are None."""
    x = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return x if cos is None else apply_rope(x, cos, sin)
