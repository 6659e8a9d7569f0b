"""CogVideoX (2B, 5B; dimensions from a diffusers `transformer/config.json`) extended as in TTT-Video.

Every block: expert adaptive LayerNorms (one modulation for text, one for video), attention local
to each segment (a segment's video tokens with its own caption tokens, qk LayerNorm, 3D RoPE on
video tokens only, positions restarting per segment), then the gated bidirectional TTT over the
whole interleaved sequence [text_1, video_1, text_2, video_2, ...], then the feed-forward.
`ttt=None` is plain CogVideoX: with one segment it computes what diffusers'
`CogVideoXTransformer3DModel` computes, with diffusers' parameter names (three module paths
are renamed on load, see `DIFFUSERS_RENAMES`).

Layout (diffusers'): latents `[B, F, C, h, w]`; text `[B, L, Dt]` (one segment) or `[B, S, L, Dt]`.
S segments of n latent frames (13 for CogVideoX, 3 s) overlap by one frame: F = S * (n - 1) + 1.
Inside: video tokens `[B, F, N, D]` (N patches per frame), text tokens `[B, S, L, D]`; the shared
frame of two neighbouring segments is computed in both and the two outputs are averaged.
`FrameworkCogVideoXTTT`, what `build_model` gives the trainer, takes latents in the package's
layout `[B, C, F, h, w]` instead.
"""

import collections
import contextlib
import dataclasses
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from ..errors import UserError
from ..fileio import atomic_file, check_state_dict, read_json, read_safetensors, safetensors_files, write_text_atomic
from ..layers.dit import adaln, add_gated
from ..layers.fusion import fused
from ..layers.rope import norm_rope, with_text
from ..layers.ttt import KINDS as TTT_KINDS
from ..layers.ttt import BidirectionalTTT
from ..ops.attention import attend
from ..ops.memo import OpMemo

CONFIG_FILE = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS = "model.safetensors"

# diffusers' parameter names that differ from ours (module lists of ours hold no dropout slots)
DIFFUSERS_RENAMES = ((".attn1.to_out.0.", ".attn1.to_out."), (".ff.net.0.proj.", ".ff.proj_in."),
                     (".ff.net.2.", ".ff.proj_out."))


@dataclass
class CogVideoXTTTConfig:
    """diffusers' `CogVideoXTransformer3DModel` config keys, then the TTT-Video ones."""
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True
    ttt: str | None = "mlp"  # mlp | linear | None (plain CogVideoX)
    ttt_mini_batch_size: int = 64
    ttt_base_lr: float = 1.0
    gate_init: float = 0.1
    ttt_impl: str = "auto"  # auto | torch | triton | reference
    segment_frames: int | None = None  # latent frames per segment; None: from sample_frames (13)

    @property
    def dim(self):
        return self.num_attention_heads * self.attention_head_dim

    @property
    def frames_per_segment(self):
        if self.segment_frames is not None:
            return self.segment_frames
        return (self.sample_frames - 1) // self.temporal_compression_ratio + 1

    def validate(self):
        if self.ttt not in (None, *TTT_KINDS):
            raise UserError(f"unknown ttt {self.ttt!r}; choose one of {', '.join(TTT_KINDS)} or None")
        if self.dropout:
            raise UserError("dropout is not supported (CogVideoX uses 0.0)")
        if self.activation_fn not in ("gelu-approximate", "gelu"):
            raise UserError(f"unsupported activation_fn {self.activation_fn!r}")
        if self.timestep_activation_fn != "silu":
            raise UserError(f"unsupported timestep_activation_fn {self.timestep_activation_fn!r}")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise UserError("learned positional embeddings need use_rotary_positional_embeddings (as in diffusers)")
        if self.ofs_embed_dim and self.ofs_embed_dim != self.time_embed_dim:
            raise UserError("ofs_embed_dim must equal time_embed_dim (the two embeddings are added)")
        return self


def load_config(path, **overrides):
    """A `CogVideoXTTTConfig` from a config.json (diffusers' or ours); `overrides` replace its values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model folder {path.parent} is missing {path.name}")
    data = {k: v for k, v in read_json(path, "model config").items() if not k.startswith("_")}
    names = {f.name for f in dataclasses.fields(CogVideoXTTTConfig)}
    for source, keys in ((path, data), ("overrides", overrides)):
        unknown = sorted(set(keys) - names)
        if unknown:
            raise UserError(f"{source}: unknown CogVideoX config key {unknown[0]!r}")
    return CogVideoXTTTConfig(**{**data, **overrides}).validate()


def timestep_features(t, dim, flip_sin_to_cos, shift, max_period=10000):
    """Sinusoidal features of `t` `[B]` -> `[B, dim]`, as diffusers' `get_timestep_embedding`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], -1)
    return F.pad(emb, (0, dim % 2))


def sincos_1d(dim, pos):
    """`[len(pos), dim]`: sin then cos of pos * 10000^(-i / (dim / 2)), float64 as diffusers computes it."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], 1)


def sincos_3d(dim, frames, grid_h, grid_w, spatial_scale, temporal_scale):
    """CogVideoX-2B's absolute position embedding `[frames, grid_h * grid_w, dim]`: a quarter of the
    channels for time, then 3/8 for the width position and 3/8 for the height position."""
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32) / spatial_scale,
                          torch.arange(grid_w, dtype=torch.float32) / spatial_scale, indexing="ij")
    spatial_dim = 3 * dim // 4
    spatial = torch.cat([sincos_1d(spatial_dim // 2, x.flatten()), sincos_1d(spatial_dim // 2, y.flatten())], 1)
    temporal = sincos_1d(dim // 4, torch.arange(frames, dtype=torch.float32) / temporal_scale)
    emb = torch.cat([temporal[:, None].expand(-1, grid_h * grid_w, -1),
                     spatial[None].expand(frames, -1, -1)], -1)
    return emb.float()


def _rope_axis(dim, pos, theta):
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = torch.outer(pos, freqs)
    return ang.cos().repeat_interleave(2, 1), ang.sin().repeat_interleave(2, 1)  # [len(pos), dim]


def crop_region(grid_h, grid_w, base_h, base_w):
    """The (top, left), (bottom, right) corners of a grid_h x grid_w grid resized to fit the base grid
    and centred in it: RoPE positions of other resolutions are interpolated into the trained range."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rw, rh = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def cogvideox_rope(cfg, frames, grid_h, grid_w, theta=10000.0):
    """CogVideoX's 3D RoPE tables cos, sin `[frames * grid_h * grid_w, head_dim]` for one segment,
    float32 as diffusers' pipelines compute them (`_prepare_rotary_positional_embeddings`)."""
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    if cfg.patch_size_t is None:
        (top, left), (bottom, right) = crop_region(grid_h, grid_w, base_h, base_w)
        ph = torch.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=torch.float32)
        pw = torch.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=torch.float32)
        pt = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    else:
        ph, pw, pt = (torch.arange(n, dtype=torch.float32) for n in (grid_h, grid_w, frames))
    hd = cfg.attention_head_dim
    axes = [_rope_axis(hd // 4, pt, theta), _rope_axis(hd // 8 * 3, ph, theta), _rope_axis(hd // 8 * 3, pw, theta)]

    def grid(t, h, w):
        return torch.cat([t[:, None, None].expand(-1, grid_h, grid_w, -1),
                          h[None, :, None].expand(frames, -1, grid_w, -1),
                          w[None, None].expand(frames, grid_h, -1, -1)], -1).reshape(frames * grid_h * grid_w, -1)

    return grid(*(a[0] for a in axes)), grid(*(a[1] for a in axes))


_COPY_STREAMS = {}
_OFFLOADED = threading.local()  # in a `host_copies` context: the copies of the block before


class _HostCopy:
    """A tensor's copy in pinned host memory, made on a side stream, and its way back to the GPU: started on
    that stream by `prefetch`, or by `take` where nothing started it. On the meta device (`ttt-video plan`)
    only the GPU copy's lifetime: made by `prefetch`, handed over by `take`."""

    def __init__(self, t):
        self.shape, self.dtype, self.device, self.gpu = t.shape, t.dtype, t.device, None
        if t.is_meta:
            return
        self.stream = _COPY_STREAMS.setdefault(t.device, torch.cuda.Stream(t.device))
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(self.stream):
            self.host.copy_(t, non_blocking=True)
            self.done = self.stream.record_event()
        t.record_stream(self.stream)  # its memory is not reused before the copy is done

    def prefetch(self):
        if self.gpu is not None:
            return
        self.gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if self.device.type == "meta":
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the memory's last use before this
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.done)
            self.gpu.copy_(self.host, non_blocking=True)
            self.ready = self.stream.record_event()
        self.gpu.record_stream(self.stream)

    def take(self):
        self.prefetch()
        gpu, self.gpu = self.gpu, None
        if gpu.is_cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        return gpu


@contextlib.contextmanager
def host_copies(*tensors, chain=None):
    """A context in which autograd saves these tensors (a checkpointed block's inputs), where on
    CUDA, as copies in pinned host memory made on a side stream, and copies them back when backward
    needs them; other saved tensors, and tensors on other devices, are saved as usual. With `chain`, a
    list the blocks of one forward share (each context appends its copies), the copy back of the inputs
    of the block before this one starts on the side stream during this block's backward, once that is
    past the block's TTT layer (`Block`: past its peak), so that no block waits for its inputs. On the
    meta device (`ttt-video plan`) the GPU copies' lifetimes are simulated."""

    ids = {id(t) for t in tensors}  # not the tensors: the hooks live as long as what they saved
    copies, before = [], chain[-1] if chain else []
    if chain is not None:
        chain.append(copies)

    def pack(t):
        if id(t) not in ids or not (t.is_cuda or t.is_meta):
            return t
        copies.append(_HostCopy(t))
        return copies[-1]

    outer, _OFFLOADED.before = getattr(_OFFLOADED, "before", None), before
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p.take() if isinstance(p, _HostCopy) else p):
            yield
    finally:
        _OFFLOADED.before = outer


def _prefetch_at(x):
    """In a block's forward inside `host_copies`: the copy back of the block before's inputs starts when
    backward reaches x."""
    before = getattr(_OFFLOADED, "before", None)
    if before and x.requires_grad:
        def start(grad):
            for copy in before:
                copy.prefetch()

        x.register_hook(start)


class Segments:
    """Maps video tokens `[B, F, ...]` to S segments of n frames `[B, S, n, ...]` and back. Neighbouring
    segments share a frame (segment s holds frames s (n - 1) ... s (n - 1) + n - 1); a shared frame
    gets the mean of its two outputs. One segment is the whole video."""

    def __init__(self, num_frames, num_segments, frames_per_segment):
        self.num_frames, self.num_segments, self.n = num_frames, num_segments, frames_per_segment
        n = frames_per_segment
        if num_segments > 1 and num_frames != num_segments * (n - 1) + 1:
            raise UserError(f"{num_segments} segments of {n} latent frames sharing one frame need "
                            f"{num_segments * (n - 1) + 1} latent frames, got {num_frames}")

    def split(self, x):
        """x `[B, F, ...]` -> a view `[B, S, n, ...]`."""
        if self.num_segments == 1:
            return x[:, None]
        return x.unfold(1, self.n, self.n - 1).movedim(-1, 2)

    def frames(self, video):
        """Each segment's frames of video `[B, F, ...]`: S views `[B, n, ...]`, whose gradients backward writes
        into the video's gradient in one pass (`_Frames`)."""
        return (video,) if self.num_segments == 1 else _Frames.apply(self, video)

    def join(self, text, video):
        """text `[B, S, L, D]`, video `[B, F, N, D]` -> each segment's caption, then its frames
        `[B, S, L + n N, D]`, written in one pass (and so are the gradients of text and video)."""
        if text.shape[1] == 1:
            return torch.cat([text[:, 0], video.flatten(1, 2)], 1)[:, None]
        return _Join.apply(self, text, video)

    def merge(self, x):
        """x `[B, S, n, ...]` -> `[B, F, ...]`."""
        if self.num_segments == 1:
            return x[:, 0]
        return _Merge.apply(self, x)

    def unjoin(self, x, text_len, tokens_per_frame):
        """`join`'s inverse: x `[B, S, L + n N, D]`, or the S segments' `[B, L + n N, D]`, -> text `[B, S, L, D]`,
        video `[B, F, N, D]` (as `merge`), each way in one pass (`_Unjoin`)."""
        if self.num_segments == 1:
            text, video = x.split([text_len, x.shape[2] - text_len], 2)
            return text, video[:, 0].unflatten(1, (-1, tokens_per_frame))
        return _Unjoin.apply(self, text_len, tokens_per_frame, *((x, ) if isinstance(x, torch.Tensor) else x))

    def _fold(self, parts, mean):
        """The S segments' `[B, n, ...]` -> `[B, F, ...]`, a shared frame the mean (or the sum) of its two
        segments'."""
        n = self.n
        out = parts[0].new_empty(parts[0].shape[0], self.num_frames, *parts[0].shape[2:])
        for s, part in enumerate(parts):
            out[:, s * (n - 1):(s + 1) * (n - 1)] = part[:, :n - 1]
        out[:, -1] = parts[-1][:, -1]
        shared = out[:, n - 1:-1:n - 1]  # each holds the first frame of the segment after it; add the last before
        shared += torch.stack([part[:, -1] for part in parts[:-1]], 1)
        if mean:
            shared /= 2
        return out


class _Frames(torch.autograd.Function):
    """`Segments.frames` of several segments. A slice a segment would give each segment's gradient a zero
    tensor of the video's size in backward, and `split(video).unbind(1)` a stack of them and a fold."""

    @staticmethod
    def forward(ctx, segments, video):
        ctx.segments = segments
        return segments.split(video).unbind(1)

    @staticmethod
    def backward(ctx, *grads):
        return None, ctx.segments._fold(grads, mean=False)


class _Join(torch.autograd.Function):
    """`Segments.join` of several segments. Its backward writes each input's gradient once: autograd through
    the forward's slice writes would clone the whole gradient at each of them."""

    @staticmethod
    def forward(ctx, segments, text, video):
        ctx.segments, ctx.dtypes, ctx.L = segments, (text.dtype, video.dtype), text.shape[2]
        return _joined(segments, text, video)

    @staticmethod
    def backward(ctx, grad):
        segments, L = ctx.segments, ctx.L
        frames = grad[:, :, L:].unflatten(2, (segments.n, -1)).unbind(1)
        return None, grad[:, :, :L].to(ctx.dtypes[0]), segments._fold(frames, mean=False).to(ctx.dtypes[1])


def _joined(segments, text, video):
    """`Segments.join`'s output, written once."""
    B, S, L, D = text.shape
    n, N = segments.n, video.shape[2]
    out = video.new_empty(B, S, L + n * N, D, dtype=torch.promote_types(text.dtype, video.dtype))
    out[:, :, :L] = text
    frames = out[:, :, L:].unflatten(2, (n, N))
    frames[:, :, :n - 1] = video[:, :S * (n - 1)].unflatten(1, (S, n - 1))
    frames[:, :, n - 1] = video[:, n - 1::n - 1]  # each segment's last frame opens the next one
    return out


def _halve_shared(frames):
    """A mean's gradient at the shared frames of `[B, S, n, ...]`, in place."""
    frames[:, :-1, -1].div_(2)
    frames[:, 1:, 0].div_(2)


class _Merge(torch.autograd.Function):
    """`Segments.merge` of several segments; its backward is one copy of the gradient, halved at the shared
    frames (autograd through the forward's slices would give each slice a zero tensor of x's size)."""

    @staticmethod
    def forward(ctx, segments, x):
        ctx.segments = segments
        return segments._fold(x.unbind(1), mean=True)

    @staticmethod
    def backward(ctx, grad):
        g = ctx.segments.split(grad).contiguous()
        _halve_shared(g)
        return None, g


class _Unjoin(torch.autograd.Function):
    """`Segments.unjoin` of several segments, from x `[B, S, L + n N, D]` or the S segments' tensors. Its
    backward writes x's gradient once, as `join` writes its output (through a split and `merge`, autograd
    writes it twice; a list's, concatenated first, three times)."""

    @staticmethod
    def forward(ctx, segments, text_len, tokens_per_frame, *xs):
        parts = xs[0].unbind(1) if len(xs) == 1 else xs
        text = torch.stack([p[:, :text_len] for p in parts], 1)
        video = segments._fold([p[:, text_len:].unflatten(1, (-1, tokens_per_frame)) for p in parts], mean=True)
        ctx.segments, ctx.text_len, ctx.whole = segments, text_len, len(xs) == 1
        return text, video

    @staticmethod
    def backward(ctx, g_text, g_video):
        g = _joined(ctx.segments, g_text, g_video)
        _halve_shared(g[:, :, ctx.text_len:].unflatten(2, (ctx.segments.n, -1)))
        return None, None, None, *((g, ) if ctx.whole else g.unbind(1))


class PatchEmbed(nn.Module):
    """Video patches and caption tokens to the model width (diffusers' `CogVideoXPatchEmbed` names)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        p, pt = cfg.patch_size, cfg.patch_size_t
        if pt is None:
            self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, p, stride=p, bias=cfg.patch_bias)
        else:
            self.proj = nn.Linear(cfg.in_channels * p * p * pt, cfg.dim)
        self.text_proj = nn.Linear(cfg.text_embed_dim, cfg.dim)
        if cfg.use_learned_positional_embeddings:
            gh, gw = cfg.sample_height // p, cfg.sample_width // p
            frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
            self.register_buffer("pos_embedding", torch.zeros(1, cfg.max_text_seq_length + frames * gh * gw, cfg.dim))

    def forward(self, latents):
        """latents `[B, F, C, h, w]` -> video tokens `[B, T, N, D]` (T = F / patch_size_t)."""
        B = latents.shape[0]
        if self.cfg.patch_size_t is None:
            x = self.proj(latents.flatten(0, 1))  # [B*F, D, h/p, w/p]
            # one copy here, not one in each fused kernel that takes a part of the video later
            return x.flatten(2).transpose(1, 2).unflatten(0, (B, -1)).contiguous()
        p, pt = self.cfg.patch_size, self.cfg.patch_size_t
        return self.proj(rearrange(latents, "b (t pt) c (y p) (x q) -> b t (y x) (c pt p q)", pt=pt, p=p, q=p))

    def positions(self, frames, grid_h, grid_w, text_len):
        """Absolute position embeddings of one segment: text `[L, D]` (or None) and video `[frames, N, D]`
        (or None when the model uses RoPE only). A learned table covers the text positions too."""
        cfg = self.cfg
        if cfg.use_learned_positional_embeddings:
            gh, gw = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
            trained = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
            if (frames, grid_h, grid_w, text_len) != (trained, gh, gw, cfg.max_text_seq_length):
                raise UserError(f"this model's learned position embedding covers {cfg.max_text_seq_length} text "
                                f"tokens and {trained} x {gh} x {gw} patches per segment, got {text_len} and "
                                f"{frames} x {grid_h} x {grid_w}")
            table = self.pos_embedding[0]
            return table[:text_len], table[text_len:].view(frames, gh * gw, -1)
        if cfg.use_rotary_positional_embeddings:
            return None, None
        return None, sincos_3d(cfg.dim, frames, grid_h, grid_w, cfg.spatial_interpolation_scale,
                               cfg.temporal_interpolation_scale).to(self.proj.weight.device)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ExpertNorm(nn.Module):
    """One LayerNorm, modulated separately for video and text from the timestep embedding."""

    def __init__(self, cond_dim, dim, affine, eps):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def modulation(self, emb):
        """emb `[B, E]` -> shift, scale and gate for video, then for text, each `[B, 1, 1, D]`."""
        return [c[:, None, None] for c in self.linear(F.silu(emb)).chunk(6, 1)]

    def forward(self, x, shift, scale):
        return adaln(self.norm, x, shift, scale)


class FinalNorm(nn.Module):
    def __init__(self, cond_dim, dim, affine, eps):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, video, emb):
        shift, scale = (c[:, None, None] for c in self.linear(F.silu(emb)).chunk(2, 1))
        return adaln(self.norm, video, shift, scale)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, self.heads = cfg.dim, cfg.num_attention_heads
        self.to_q = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.to_k = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.to_v = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.norm_q = nn.LayerNorm(cfg.attention_head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(cfg.attention_head_dim, eps=1e-6)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, rope):
        """x `[B', L', D]`; rope: cos, sin `[L', Dh]` (identity rows for text) or None."""
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        prepare = fused(norm_rope, q, q.shape[-1])  # [B', H, L', Dh]
        q, k = (prepare(t, norm.weight, norm.bias, *(rope or (None, None)), norm.eps)
                for t, norm in ((q, self.norm_q), (k, self.norm_k)))
        o = attend(q, k, v)
        return self.to_out(o.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.approximate = "tanh" if cfg.activation_fn == "gelu-approximate" else "none"
        self.proj_in = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.proj_out = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x):
        return self.proj_out(F.gelu(self.proj_in(x), approximate=self.approximate))


_RECOMPUTE = threading.local()


@contextlib.contextmanager
def _block_recompute():
    """Marks the recompute of a checkpointed block in backward (`CogVideoXTTT.forward`'s checkpoint)."""
    outer, _RECOMPUTE.block = getattr(_RECOMPUTE, "block", False), True
    try:
        yield
    finally:
        _RECOMPUTE.block = outer


class Block(nn.Module):
    """Attention and feed-forward run segment by segment where nothing is saved for backward
    (inference: one segment's temporaries at a time, not the whole video's). With `parts`,
    training does the same and recomputes the block part by part in backward: each segment's
    attention, the first TTT pass and each segment's worth of feed-forward keep only their inputs, so
    one part's activations are held at a time, besides the second TTT pass's (`BidirectionalTTT`: it
    runs once in the block's recompute and its backward comes next). Backward's recompute of the block
    runs only what gives the parts' inputs, and what it ran once is not run again: each segment's
    attention keeps its kernel's results for the part's own recompute (`ops.attention`), as the first
    TTT pass keeps the TTT kernels' (`ops.memo`), and the video's feed-forward parts, whose outputs feed
    only the block's output, are skipped there. So a step runs the attention and TTT kernels and the
    video's feed-forward twice (in its first forward and once in backward), the rest of the attention
    parts and of the first TTT pass three times."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = ExpertNorm(cfg.time_embed_dim, cfg.dim, cfg.norm_elementwise_affine, cfg.norm_eps)
        self.attn1 = Attention(cfg)
        self.ttt = None
        self.norm2 = ExpertNorm(cfg.time_embed_dim, cfg.dim, cfg.norm_elementwise_affine, cfg.norm_eps)
        self.ff = FeedForward(cfg)
        self._attention_memos = collections.defaultdict(OpMemo)  # by segment, between its runs in backward

    def forward(self, video, text, emb, segments, seg_rope, ttt_rope, parts=False):
        """video `[B, F, N, D]`, text `[B, S, L, D]`, emb `[B, E]`."""
        B, S, L, D = text.shape
        by_segment = parts or not torch.is_grad_enabled()
        part = self._part if torch.is_grad_enabled() else (lambda fn, *args, memo=None: fn(*args))
        shift, scale, gate, t_shift, t_scale, t_gate = self.norm1.modulation(emb)
        mod = (shift, scale, t_shift, t_scale)
        if by_segment and S > 1:
            # the segments' inputs from one op each (`Segments.frames`, split), whose backward puts their
            # gradients together once
            one = Segments(segments.n, 1, segments.n)
            inputs = zip(segments.frames(video), text.split(1, 1))
            x = [part(self._attend, v, t, *mod, one, seg_rope, memo=self._attention_memos[s])[:, 0]
                 for s, (v, t) in enumerate(inputs)]
        else:
            x = self._attend(video, text, *mod, segments, seg_rope)
        N = video.shape[2]
        x_text, x_video = segments.unjoin(x, L, N)
        _prefetch_at(x_video)  # the attention's output: its gradient comes after the TTT layer's backward
        video, text = add_gated(video, gate, x_video), add_gated(text, t_gate, x_text)
        if self.ttt is not None:
            x = segments.join(text, video).flatten(1, 2)  # [B, S*(L + n*N), D]
            text, video = segments.unjoin(self.ttt(x, *ttt_rope, checkpoint_passes=parts).unflatten(1, (S, -1)), L, N)
        shift, scale, gate, t_shift, t_scale, t_gate = self.norm2.modulation(emb)
        n = segments.n
        if by_segment and video.shape[1] > n:
            video = torch.cat([part(self._frames_feed_forward, v, shift, scale, gate) for v in video.split(n, 1)], 1)
        else:
            video = self._feed_forward(video, shift, scale, gate)
        return video, self._feed_forward(text, t_shift, t_scale, t_gate)

    @staticmethod
    def _part(fn, *args, memo=None):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=memo.contexts if memo else noop_context_fn)

    def _attend(self, video, text, shift, scale, t_shift, t_scale, segments, rope):
        """Each segment's caption and frames through the first norm and attention: `[B, S, L + n N, D]`."""
        x = segments.join(self.norm1(text, t_shift, t_scale), self.norm1(video, shift, scale))
        return self.attn1(x.flatten(0, 1), rope).unflatten(0, x.shape[:2])

    def _feed_forward(self, x, shift, scale, gate):
        return add_gated(x, gate, self.ff(self.norm2(x, shift, scale)))

    def _frames_feed_forward(self, x, shift, scale, gate):
        """A part of the video's frames through the feed-forward. In the block's recompute its output feeds
        only the block's output, which backward does not take: x stands in for it there (the part's own
        recompute, after the block's, runs it)."""
        if getattr(_RECOMPUTE, "block", False):
            return x
        return self._feed_forward(x, shift, scale, gate)


class CogVideoXTTT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.validate()
        dim = cfg.dim
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = TimestepEmbedding(dim, cfg.time_embed_dim)
        self.ofs_embedding = TimestepEmbedding(cfg.ofs_embed_dim, cfg.ofs_embed_dim) if cfg.ofs_embed_dim else None
        self.transformer_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.norm_out = FinalNorm(cfg.time_embed_dim, dim, cfg.norm_elementwise_affine, cfg.norm_eps)
        p = cfg.patch_size * cfg.patch_size * (cfg.patch_size_t or 1)
        self.proj_out = nn.Linear(dim, p * (cfg.out_channels or cfg.in_channels))
        self.gradient_checkpointing = self.checkpoint_parts = self.offload_checkpoints = False
        if cfg.ttt is not None:
            self.add_ttt()

    def add_ttt(self):
        """Give every block a freshly initialised gated bidirectional TTT (after loading pretrained weights)."""
        cfg = self.cfg
        if cfg.ttt is None:
            raise UserError("add_ttt needs cfg.ttt set to 'mlp' or 'linear'")
        device = self.proj_out.weight.device
        for block in self.transformer_blocks:
            block.ttt = BidirectionalTTT(cfg.dim, cfg.num_attention_heads, kind=cfg.ttt,
                                         mini_batch_size=cfg.ttt_mini_batch_size, base_lr=cfg.ttt_base_lr,
                                         gate_init=cfg.gate_init,
                                         impl=None if cfg.ttt_impl == "auto" else cfg.ttt_impl).to(device)

    def enable_gradient_checkpointing(self, enabled=True, parts=False, offload=False):
        """Training keeps only each block's inputs and recomputes the block in backward. `parts`: the
        recompute keeps only each part's inputs in turn (`Block`); `offload`: the blocks' inputs wait
        for backward in pinned host memory instead of on the GPU (CUDA)."""
        if (parts or offload) and not enabled:
            raise ValueError("parts and offload refine gradient checkpointing; enable it too")
        self.gradient_checkpointing, self.checkpoint_parts, self.offload_checkpoints = enabled, parts, offload
        return self

    @property
    def text_dim(self):
        return self.cfg.text_embed_dim

    def forward(self, hidden_states, encoder_hidden_states, timestep, ofs=None):
        """hidden_states `[B, F, C, h, w]`; encoder_hidden_states `[B, L, Dt]` (one segment) or
        `[B, S, L, Dt]` (S segments of `cfg.frames_per_segment` latent frames sharing one frame);
        timestep `[B]` or a number; ofs as timestep (models with `ofs_embed_dim`). Returns `[B, F, C_out, h, w]`."""
        cfg = self.cfg
        B, num_frames, _, h, w = hidden_states.shape
        text = encoder_hidden_states if encoder_hidden_states.dim() == 4 else encoder_hidden_states[:, None]
        S, L = text.shape[1], text.shape[2]
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        if h % p or w % p or num_frames % pt:
            raise UserError(f"latents {num_frames}x{h}x{w} (frames x height x width) must divide by the patch "
                            f"size {pt}x{p}x{p}")
        if S > 1 and pt > 1:
            raise UserError("several segments need a model without a temporal patch (patch_size_t unset)")
        gh, gw, T = h // p, w // p, num_frames // pt
        segments = Segments(T, S, cfg.frames_per_segment)
        n = T if S == 1 else cfg.frames_per_segment

        emb = self._embed_time(timestep, B, hidden_states)
        if self.ofs_embedding is not None:
            if ofs is None:
                raise UserError("this model (ofs_embed_dim set) needs `ofs`; CogVideoX pipelines pass 2.0")
            ofs_t = torch.as_tensor(ofs, device=hidden_states.device).reshape(-1).expand(B)
            emb = emb + self.ofs_embedding(timestep_features(
                ofs_t, cfg.ofs_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(hidden_states.dtype))

        video = self.patch_embed(hidden_states)  # [B, T, N, D]
        text = self.patch_embed.text_proj(text)  # [B, S, L, D]
        text_pos, video_pos = self.patch_embed.positions(n, gh, gw, L)
        if text_pos is not None:
            text = text + text_pos.to(text.dtype)
        if video_pos is not None:
            video = segments.merge(segments.split(video) + video_pos.to(video.dtype))

        cos, sin = (t.to(video.device) for t in cogvideox_rope(cfg, n, gh, gw))
        seg_rope = ttt_rope = None
        if cfg.use_rotary_positional_embeddings:
            seg_rope = with_text(cos, sin, L, 1)
        if cfg.ttt is not None:
            ttt_rope = with_text(cos, sin, L, S)
        offloaded = []  # the blocks' inputs in host memory, in order (`host_copies`)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                saving = (host_copies(video, text, chain=offloaded) if self.offload_checkpoints
                          else contextlib.nullcontext())
                with saving:
                    video, text = checkpoint(block, video, text, emb, segments, seg_rope, ttt_rope,
                                             self.checkpoint_parts, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), _block_recompute()))
            else:
                video, text = block(video, text, emb, segments, seg_rope, ttt_rope)

        video = self.proj_out(self.norm_out(self.norm_final(video), emb))  # [B, T, N, C_out * pt * p * p]
        if cfg.patch_size_t is None:
            return rearrange(video, "b f (y x) (c p q) -> b f c (y p) (x q)", y=gh, p=p, q=p)
        return rearrange(video, "b t (y x) (c pt p q) -> b (t pt) c (y p) (x q)", y=gh, pt=pt, p=p, q=p)

    def _embed_time(self, timestep, batch_size, like):
        t = torch.as_tensor(timestep, device=like.device)
        t = t.reshape(-1).expand(batch_size) if t.numel() == 1 else t
        feats = timestep_features(t, self.cfg.dim, self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        return self.time_embedding(feats.to(like.dtype))

    @classmethod
    def from_diffusers(cls, path, ttt="mlp", dtype=torch.float32, **overrides):
        """Load a local diffusers `CogVideoXTransformer3DModel` folder (the `transformer` folder, or a
        pipeline folder holding one): config.json plus one or sharded safetensors files. Pretrained
        weights load as `dtype`; the new TTT parameters are initialised afresh. Nothing is downloaded."""
        folder = transformer_folder(path)
        if not folder.is_dir():
            raise UserError(f"model folder not found: {folder}")
        cfg = load_config(folder / CONFIG_FILE, ttt=ttt, **overrides)
        state = {}
        for file in diffusers_weight_files(folder):
            state.update({_rename(k): v.to(dtype) for k, v in read_safetensors(file, "model weights").items()})
        with torch.device("meta"):
            model = cls(dataclasses.replace(cfg, ttt=None))
        _load_exact(model, state, folder)
        model.cfg = cfg
        if cfg.ttt is not None:
            model.add_ttt()
        return model

    @classmethod
    def from_model_config(cls, model_cfg):
        """Build from the project's `ModelConfig` (arch "cogvideox-ttt"): the pretrained folder in
        `pretrained`, the TTT from `seq_mixer`, the `ttt_*` / `gate_init` fields and `segment_frames`."""
        if not model_cfg.pretrained:
            raise UserError("model.pretrained must name a local diffusers CogVideoX folder for arch cogvideox-ttt")
        return cls.from_diffusers(model_cfg.pretrained, **ttt_settings(model_cfg))

    def save_pretrained(self, path):
        """Our own checkpoint: model.safetensors plus the resolved config.json, each written atomically."""
        path = Path(path)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_file(path / WEIGHTS, lambda tmp: save_file(weights, tmp))
        write_text_atomic(path / CONFIG_FILE, json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a checkpoint written by `save_pretrained`."""
        folder = Path(path)
        return cls.from_weights(load_config(folder / CONFIG_FILE, **overrides), folder / WEIGHTS)

    @classmethod
    def from_weights(cls, cfg, file):
        """A model of `cfg` holding exactly the weights of the safetensors `file` (TTT included)."""
        file = Path(file)
        if not file.is_file():
            raise UserError(f"model folder {file.parent} is missing {file.name}")
        with torch.device("meta"):
            model = cls(cfg)
        _load_exact(model, read_safetensors(file, "model weights"), file)
        return model


class FrameworkCogVideoXTTT(CogVideoXTTT):
    """`CogVideoXTTT` called the way the package calls every model (`build_model`, the trainer):
    latents `[B, C, F, h, w]`, timestep `[B]`, text `[B, S, L, Dt]` (S segments of
    `cfg.frames_per_segment` latent frames sharing one frame). The text mask is accepted and
    ignored: CogVideoX was trained seeing its T5 padding. Parameters and state dict are
    `CogVideoXTTT`'s, so checkpoints of either load into the other."""

    def forward(self, latents, timestep, text, text_mask=None):
        return super().forward(latents.transpose(1, 2), text, timestep).transpose(1, 2)


def ttt_settings(model_cfg):
    """The project's `ModelConfig` (`seq_mixer`, `ttt_*`, `gate_init`, `segment_frames`) as
    `CogVideoXTTTConfig` overrides."""
    mixer = model_cfg.seq_mixer
    extra = {"segment_frames": model_cfg.segment_frames} if model_cfg.segment_frames else {}
    return {"ttt": {"attention": None, "ttt-mlp": "mlp", "ttt-linear": "linear"}.get(mixer, mixer),
            "ttt_mini_batch_size": model_cfg.ttt_mini_batch_size, "ttt_base_lr": model_cfg.ttt_base_lr,
            "gate_init": model_cfg.gate_init, "ttt_impl": model_cfg.ttt_impl, **extra}


def transformer_folder(path):
    """The transformer folder of a diffusers CogVideoX pipeline folder (one holding transformer/ or
    vae/), else `path` itself."""
    folder = Path(path)
    pipeline = (folder / "transformer").is_dir() or (folder / "vae").is_dir()
    return folder / "transformer" if pipeline else folder


def diffusers_weight_files(folder):
    """The safetensors files of a diffusers model folder: one file, or the shards its index names."""
    return safetensors_files(folder, DIFFUSERS_WEIGHTS)


def _rename(key):
    for old, new in DIFFUSERS_RENAMES:
        key = key.replace(old, new)
    return key


def _load_exact(model, state, where):
    """Assign `state` (read from `where`, a file or folder) to a model built on the meta device;
    every parameter and buffer must be there, with the model's shape."""
    check_state_dict(state, model.state_dict(), where)
    model.load_state_dict(state, assign=True)
