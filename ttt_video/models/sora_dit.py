"""A video DiT from scratch: spacetime patches, adaLN-zero time conditioning, and per block either
factorised attention (`attention_type="st"`: spatial attention within each latent frame, then
temporal attention across all frames of the video at each patch position) or full 3D attention
over every patch of the video (`"full"`). Text enters by cross-attention after the
self-attention: the patches of a segment attend to that segment's caption tokens only, so each
caption steers its own frames while self-attention carries context across the whole video.

Layout: latents `[B, C, F, h, w]`; text `[B, S, Lt, Dt]`; tokens `[B, T, N, D]` (T latent frames
after the time patch, N patches per frame).
"""

from einops import rearrange
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from ..layers.attention import SegmentAttention
from ..layers.rope import rope_3d
from ..layers.dit import VideoDiT, adaln, add_gated

ATTENTION_TYPES = ("st", "full")


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // num_heads, eps=1e-6)
        self.k_norm = nn.LayerNorm(dim // num_heads, eps=1e-6)

    def forward(self, x, context, key_mask=None):
        """x `[B, L, D]` attends to context `[B, Lc, D]`; key_mask `[B, Lc]` bool (True = attend)."""
        B, L, D = x.shape
        q = self.q_norm(self.q(x).view(B, L, self.num_heads, -1).transpose(1, 2))  # [B, H, L, Dh]
        k, v = self.kv(context).view(B, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None]
        o = scaled_dot_product_attention(q, self.k_norm(k), v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.dim
        self.factorised = cfg.attention_type == "st"
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SegmentAttention(dim, cfg.num_heads)  # spatial ("st") or 3D ("full")
        if self.factorised:
            self.norm_t = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.attn_t = SegmentAttention(dim, cfg.num_heads)
        self.norm_x = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = round(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, (9 if self.factorised else 6) * dim))

    def forward(self, x, c, text, text_mask, rope, time_rope):
        """x `[B, T, N, D]`, c `[B, D]`, text `[B, S, Lt, D]`, text_mask `[B, S, Lt]` bool or None;
        rope: cos/sin `[N, Dh]` ("st") or `[T*N, Dh]` ("full"); time_rope: cos/sin `[T, Dh]`."""
        B, T, N, D = x.shape
        S = text.shape[1]
        mods = self.ada(c)[:, None, None].chunk(9 if self.factorised else 6, -1)
        sa, ca, ga, sm, cm, gm = mods[:3] + mods[-3:]
        if self.factorised:
            h = adaln(self.norm1, x, sa, ca).reshape(B * T, N, D)
            x = add_gated(x, ga, self.attn(h, 1, *rope).view(B, T, N, D))
            st, ct, gt = mods[3:6]
            h = adaln(self.norm_t, x, st, ct).transpose(1, 2).reshape(B * N, T, D)
            x = add_gated(x, gt, self.attn_t(h, 1, *time_rope).view(B, N, T, D).transpose(1, 2))
        else:
            h = adaln(self.norm1, x, sa, ca).reshape(B, T * N, D)
            x = add_gated(x, ga, self.attn(h, 1, *rope).view(B, T, N, D))
        mask = None
        if text_mask is not None:  # a caption with no tokens attends to its padding rather than giving NaN
            mask = (text_mask | ~text_mask.any(-1, keepdim=True)).flatten(0, 1)  # [B*S, Lt]
        segments = self.norm_x(x).reshape(B * S, T // S * N, D)
        x = x + self.cross(segments, text.flatten(0, 1), mask).view(B, T, N, D)
        return add_gated(x, gm, self.mlp(adaln(self.norm2, x, sm, cm)))


class SoraDiT(VideoDiT):
    def __init__(self, cfg):
        if cfg.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention_type {cfg.attention_type!r}; choose one of {ATTENTION_TYPES}")
        super().__init__(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.initialize()

    def initialize(self):
        super().initialize()
        for block in self.blocks:  # a zero cross-attention output too: blocks start as the identity
            nn.init.zeros_(block.cross.out.weight)

    def forward(self, latents, timestep, text, text_mask=None, cond=None):
        """latents `[B, C, F, h, w]` (F a multiple of S and of the time patch), timestep `[B]`,
        text `[B, S, Lt, Dt]`, text_mask `[B, S, Lt]` bool, cond `[B, C + 1, F, h, w]` (models with
        `condition_frames`). Returns the prediction `[B, C, F, h, w]`."""
        S = text.shape[1]
        pt, ph, pw = self.cfg.patch_size
        seg_t, gh, gw = self.grid(latents, S)
        gt = S * seg_t

        def patches(v):
            return rearrange(v, "b c (t pt) (y ph) (x pw) -> b t (y x) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

        x = self.add_condition(self.patch_embed(patches(latents)), latents, cond, patches)  # [B, T, N, D]
        text = self.text_embed(text)  # [B, S, Lt, D]
        mask = None if text_mask is None else text_mask.bool()

        head_dim = self.cfg.dim // self.cfg.num_heads
        if self.cfg.attention_type == "st":
            rope = rope_3d(1, gh, gw, head_dim)
        else:
            rope = rope_3d(gt, gh, gw, head_dim)
        rope = tuple(t.to(x.device) for t in rope)
        time_rope = tuple(t.to(x.device) for t in rope_3d(gt, 1, 1, head_dim))
        c = self.t_embed(timestep)
        for block in self.blocks:
            x = self.run_block(block, x, c, text, mask, rope, time_rope)
        x = self.output(x, c)
        return rearrange(x, "b t (y x) (c pt ph pw) -> b c (t pt) (y ph) (x pw)", y=gh, x=gw, pt=pt, ph=ph, pw=pw)
