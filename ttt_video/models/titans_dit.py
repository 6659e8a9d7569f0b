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

from ..layers.attention import SegmentAttention
from ..layers.memory import NeuralMemory
from ..layers.rope import rope_3d, with_text
from ..layers.dit import VideoDiT, adaln, add_gated


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
        hidden = round(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, memory_tokens, cos, sin, key_mask):
        """x `[B, L, D]` (one segment), memory_tokens `[B, M, D]`, cos/sin `[P + M + L, Dh]`,
        key_mask `[B, 1, P + M + L]` bool or None."""
        sa, ca, ga, sm, cm, gm = self.ada(c)[:, None].chunk(6, -1)
        persistent = self.persistent.expand(x.shape[0], -1, -1)
        context = torch.cat([persistent, memory_tokens, adaln(self.norm1, x, sa, ca)], 1)
        x = add_gated(x, ga, self.attn(context, 1, cos, sin, key_mask)[:, self.num_context :])
        return add_gated(x, gm, self.mlp(adaln(self.norm2, x, sm, cm)))


class TitansDiT(VideoDiT):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.dim))  # text, video
        self.blocks = nn.ModuleList(MemoryBlock(cfg) for _ in range(cfg.depth))
        self.initialize()

    def initialize(self):
        super().initialize()
        nn.init.normal_(self.type_embed, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.persistent, std=0.02)
            block.memory.reset_gates()

    def forward(self, latents, timestep, text, text_mask=None, cond=None):
        """latents `[B, C, F, h, w]` (F a multiple of S and of the time patch), timestep `[B]`,
        text `[B, S, Lt, Dt]`, text_mask `[B, S, Lt]` bool, cond `[B, C + 1, F, h, w]` (models with
        `condition_frames`). Returns the prediction `[B, C, F, h, w]`."""
        B = latents.shape[0]
        S, Lt = text.shape[1], text.shape[2]
        pt, ph, pw = self.cfg.patch_size
        txt, video, (gt, gh, gw) = self.segment_tokens(latents, text, cond)
        video = video + self.type_embed[1]  # [B, S, Lv, D]
        tokens = torch.cat([txt + self.type_embed[0], video], 2)  # [B, S, Lt+Lv, D]

        num_context = self.cfg.num_persistent_tokens + self.cfg.num_memory_tokens
        cos, sin = (t.to(tokens.device) for t in rope_3d(gt, gh, gw, self.cfg.dim // self.cfg.num_heads))
        cos, sin = with_text(cos, sin, num_context + Lt, 1)
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
                x = self.run_block(block, x, c, memory_tokens, cos, sin, mask)
                if s + 1 < S:  # the last segment's memory is never read
                    states[i] = block.memory.update(states[i], x[:, Lt:])
            outs.append(x[:, Lt:])
        x = torch.stack(outs, 1)  # [B, S, Lv, D]
        x = self.output(x, c)
        return rearrange(x, "b s (t y x) (c pt ph pw) -> b c (s t pt) (y ph) (x pw)",
                         t=gt, y=gh, x=gw, pt=pt, ph=ph, pw=pw)
