"""A video DiT whose only context across segments is a Titans neural memory in every block.

The video runs segment by segment, each segment through all blocks. A block attends within
[its persistent tokens, its memory's read-out tokens, the segment's caption tokens, the segment's
video tokens]: a fixed number of memory tokens stands for everything before, so there is no KV
cache and the cost per segment does not grow with the video. After a block has processed a
segment, its memory (`ttt_video.ops.titans`) is written with the block's output video tokens of
that segment (they have attended to the caption), and the next segment reads the memory through
learned queries. Segment s therefore sees earlier segments only through the memory and never
sees later ones. adaLN-zero from the timestep, as in `tiny_dit`.

Layout: latents `[B, C, F, h, w]`; text `[B, S, Lt, Dt]`; a segment's tokens `[B, Lt + Lv, D]`,
`[B, P + M + Lt + Lv, D]` inside attention (P persistent, M memory tokens).
"""

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.attention import SegmentAttention
from ..layers.memory import NeuralMemory
from ..layers.rope import rope_3d, with_text
from .tiny_dit import TimestepEmbedder, modulate


class MemoryBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.dim
        self.num_context = cfg.num_persistent_tokens + cfg.num_memory_tokens
        self.persistent = nn.Parameter(torch.zeros(cfg.num_persistent_tokens, dim))
        self.memory = NeuralMemory(dim, cfg.num_heads, cfg.num_memory_tokens, cfg.memory_chunk_size, cfg.ttt_base_lr)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SegmentAttention(dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, memory_tokens, cos, sin, key_mask):
        """x `[B, L, D]` (one segment), memory_tokens `[B, M, D]`, cos/sin `[P + M + L, Dh]`,
        key_mask `[B, 1, P + M + L]` bool or None."""
        sa, ca, ga, sm, cm, gm = self.ada(c)[:, None].chunk(6, -1)
        persistent = self.persistent.expand(x.shape[0], -1, -1)
        context = torch.cat([persistent, memory_tokens, modulate(self.norm1(x), sa, ca)], 1)
        x = x + ga * self.attn(context, 1, cos, sin, key_mask)[:, self.num_context :]
        return x + gm * self.mlp(modulate(self.norm2(x), sm, cm))


class TitansDiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        pt, ph, pw = cfg.patch_size
        self.patch_dim = cfg.in_channels * pt * ph * pw
        self.patch_embed = nn.Linear(self.patch_dim, cfg.dim)
        self.text_embed = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.dim))
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.dim))  # text, video
        self.t_embed = TimestepEmbedder(cfg.dim)
        self.blocks = nn.ModuleList(MemoryBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.final = nn.Linear(cfg.dim, self.patch_dim)
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        self.initialize()

    def initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.type_embed, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.persistent, std=0.02)
            block.memory.reset_gates()
            nn.init.zeros_(block.ada[-1].weight)  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(block.ada[-1].bias)
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, latents, timestep, text, text_mask=None):
        """latents `[B, C, F, h, w]` (F a multiple of S and of the time patch), timestep `[B]`,
        text `[B, S, Lt, Dt]`, text_mask `[B, S, Lt]` bool. Returns the prediction `[B, C, F, h, w]`."""
        B, C, F, h, w = latents.shape
        S, Lt = text.shape[1], text.shape[2]
        pt, ph, pw = self.cfg.patch_size
        if F % (S * pt) or h % ph or w % pw:
            raise ValueError(f"latents {tuple(latents.shape)} do not split into {S} segments "
                             f"of patches {self.cfg.patch_size}")
        gt, gh, gw = F // S // pt, h // ph, w // pw
        video = rearrange(latents, "b c (s t pt) (y ph) (x pw) -> b s (t y x) (c pt ph pw)",
                          s=S, pt=pt, ph=ph, pw=pw)
        video = self.patch_embed(video) + self.type_embed[1]  # [B, S, Lv, D]
        txt = self.text_embed(text) + self.type_embed[0]  # [B, S, Lt, D]
        tokens = torch.cat([txt, video], 2)  # [B, S, Lt+Lv, D]

        num_context = self.cfg.num_persistent_tokens + self.cfg.num_memory_tokens
        cos, sin = rope_3d(gt, gh, gw, self.cfg.dim // self.cfg.num_heads)
        cos, sin = (t.to(tokens.device) for t in with_text(cos, sin, num_context + Lt, 1))
        key_mask = None
        if text_mask is not None:
            always = torch.ones(B, S, num_context, dtype=torch.bool, device=tokens.device)
            video_mask = torch.ones(B, S, video.shape[2], dtype=torch.bool, device=tokens.device)
            key_mask = torch.cat([always, text_mask.bool(), video_mask], 2)  # [B, S, P+M+Lt+Lv]
        c = self.t_embed(timestep)
        states = [block.memory.initial_state(B) for block in self.blocks]
        outs = []
        for s in range(S):
            x = tokens[:, s]
            mask = None if key_mask is None else key_mask[:, s : s + 1]
            for i, block in enumerate(self.blocks):
                memory_tokens = block.memory.read(states[i])  # [B, M, D]
                if self.gradient_checkpointing and self.training:
                    x = checkpoint(block, x, c, memory_tokens, cos, sin, mask, use_reentrant=False)
                else:
                    x = block(x, c, memory_tokens, cos, sin, mask)
                if s + 1 < S:  # the last segment's memory is never read
                    states[i] = block.memory.update(states[i], x[:, Lt:])
            outs.append(x[:, Lt:])
        x = torch.stack(outs, 1)  # [B, S, Lv, D]
        shift, scale = self.final_ada(c)[:, None, None].chunk(2, -1)
        x = self.final(modulate(self.final_norm(x), shift, scale))
        return rearrange(x, "b s (t y x) (c pt ph pw) -> b c (s t pt) (y ph) (x pw)",
                         t=gt, y=gh, x=gw, pt=pt, ph=ph, pw=pw)
