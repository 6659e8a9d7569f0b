import contextlib
import json

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from ttt_video.config import apply_overrides
from ttt_video.errors import UserError
from ttt_video.models import CogVideoXTTT, FrameworkCogVideoXTTT, build_model
from ttt_video.models.cogvideox_ttt import CogVideoXTTTConfig, Segments
from ttt_video.presets import get_preset
from ttt_video.train.adapters import apply_adapter
from ttt_video.train.trainer import param_groups

from .common import eager_and_fused

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
            text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=49, max_text_seq_length=7)
VARIANTS = {
    "2b": {},  # absolute sin-cos positions, no RoPE
    "5b": {"use_rotary_positional_embeddings": True},
    "5b-i2v": {"use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True},
    "1.5": {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "ofs_embed_dim": 24},
}


def _reference(variant, seed=0):
    torch.manual_seed(seed)
    ref = CogVideoXTransformer3DModel(**TINY, **VARIANTS[variant]).eval()
    with torch.no_grad():  # move every saved weight (the learned position table too) off its initial value
        for t in ref.state_dict().values():
            t.add_(torch.randn_like(t) * 0.05)
    return ref


def _pipeline_rope(cfg, frames, height, width):
    """The 3D RoPE tables the way diffusers' CogVideoX pipelines build them."""
    p = cfg.patch_size
    gh, gw = height // p, width // p
    if cfg.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
        return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), frames)
    time_size = (frames + cfg.patch_size_t - 1) // cfg.patch_size_t
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (gh, gw), time_size, grid_type="slice",
                                   max_size=(cfg.sample_height // p, cfg.sample_width // p))


# (latent frames, height, width): the trained size (diffusers' stored tables) and others (recomputed,
# RoPE positions interpolated into the trained grid)
SHAPES = {"2b": [(13, 8, 8), (5, 6, 8)], "5b": [(13, 8, 8), (5, 4, 12)], "5b-i2v": [(13, 8, 8)], "1.5": [(4, 6, 8)]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_diffusers(variant, tmp_path):
    ref = _reference(variant)
    ref.save_pretrained(tmp_path / "transformer")
    model = CogVideoXTTT.from_diffusers(tmp_path, ttt=None).eval()
    for frames, height, width in SHAPES[variant]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, frames, 4, height, width, generator=g)
        text = torch.randn(2, TINY["max_text_seq_length"], 12, generator=g)
        t = torch.tensor([999, 17])
        ofs = torch.full((2,), 2.0) if variant == "1.5" else None
        rope = None
        if ref.config.use_rotary_positional_embeddings:
            rope = _pipeline_rope(ref.config, frames, height, width)
        with torch.no_grad():
            expected = ref(hidden_states=x, encoder_hidden_states=text, timestep=t, ofs=ofs, image_rotary_emb=rope,
                           return_dict=False)[0]
            out = model(x, text, t, ofs=ofs)
        assert out.shape == expected.shape
        assert (out - expected).abs().max().item() <= 1e-5


def test_sharded_loading(tmp_path):
    ref = _reference("5b")
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = CogVideoXTTT.from_diffusers(tmp_path, ttt=None)
    ours = model.state_dict()
    for name, value in ref.state_dict().items():
        key = name.replace(".attn1.to_out.0.", ".attn1.to_out.").replace(".ff.net.0.proj.", ".ff.proj_in.")
        key = key.replace(".ff.net.2.", ".ff.proj_out.")
        assert torch.equal(ours[key], value), name


def test_missing_files_are_named(tmp_path):
    _reference("5b").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(UserError, match=shard.name):
        CogVideoXTTT.from_diffusers(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors"):
        CogVideoXTTT.from_diffusers(tmp_path)
    with pytest.raises(UserError, match="unknown CogVideoX config key 'depth'"):
        CogVideoXTTT.from_diffusers(tmp_path, depth=3)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="config.json"):
        CogVideoXTTT.from_diffusers(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path runs on CUDA")
@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_fused_attention_steps_give_the_eager_model(variant, tmp_path, monkeypatch):
    """On CUDA attention's q and k LayerNorm and RoPE (none in the 2B layout) run as one kernel each way where
    they fuse (full-size segments; here forced by `TTT_VIDEO_COMPILE=1`): the output of two segments and
    every parameter's gradient as with the eager steps, in float32."""
    _reference(variant).save_pretrained(tmp_path)
    model = CogVideoXTTT.from_diffusers(tmp_path, ttt=None).cuda()
    runs = eager_and_fused(model, [a.cuda() for a in _segments_input(2)], monkeypatch)
    assert len(runs[0]) == len(runs[1]) == 1 + len(list(model.parameters()))
    for eager, fused in zip(*runs):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("cogvideox")
    _reference("5b").save_pretrained(path)
    return path


def _segments_input(S, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, S * 12 + 1, 4, 4, 4, generator=g)  # 13 latent frames per segment, one shared
    return x, torch.randn(1, S, TINY["max_text_seq_length"], 12, generator=g), torch.tensor([500])


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_ttt_shapes_gates_and_gradients(pretrained, kind):
    torch.manual_seed(0)
    model = CogVideoXTTT.from_diffusers(pretrained, ttt=kind, ttt_mini_batch_size=16)
    for block in model.transformer_blocks:
        assert torch.all(block.ttt.gate_fwd == 0.1) and torch.all(block.ttt.gate_bwd == 0.1)
    x, text, t = _segments_input(2)
    out = model(x, text, t)
    assert out.shape == x.shape
    with torch.no_grad():  # inference runs attention and feed-forward segment by segment
        torch.testing.assert_close(model(x, text, t), out.detach(), rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads.items():
        if ".ttt." in name:
            assert grad.abs().sum() > 0, name
    for parts in (False, True):  # each block recomputed whole, or part by part (offload: CUDA only)
        model.zero_grad()
        model.enable_gradient_checkpointing(parts=parts, offload=parts)
        model(x, text, t).square().mean().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)


class _CountingKernels:
    """A stand-in for a fused attention kernel's forward and backward ops (`ops.attention._Kernels`, CUDA
    only): the same arithmetic through `F.scaled_dot_product_attention`, its forward runs counted."""

    def __init__(self):
        self.runs = 0

    def forward(self, q, k, v):
        self.runs += 1
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        lse = s.logsumexp(-1)
        return (s - lse[..., None]).exp() @ v, lse

    def backward(self, g, q, k, v, out, lse):
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            return torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v), (q, k, v), g)


def test_part_wise_recompute_runs_each_part_twice_with_the_same_gradients(pretrained, monkeypatch):
    """Backward's recompute of a block (`parts`): each segment's attention keeps its kernel's results for
    the part's own recompute, and the video's feed-forward parts are skipped there (their outputs feed only
    the block's output). A step then runs each attention kernel and each feed-forward part twice instead of
    three times, with bit for bit the gradients of the step that runs them three times; nothing is kept
    past backward."""
    from ttt_video.models import cogvideox_ttt
    from ttt_video.ops import attention, memo

    kernels = _CountingKernels()
    monkeypatch.setattr(attention, "_kernels", lambda q, k, v: kernels)
    feed_forwards = []
    monkeypatch.setattr(cogvideox_ttt.FeedForward, "forward",
                        lambda self, x, real=cogvideox_ttt.FeedForward.forward: feed_forwards.append(1) or real(self, x))
    torch.manual_seed(0)
    model = CogVideoXTTT.from_diffusers(pretrained, ttt="linear", ttt_mini_batch_size=16)
    model.enable_gradient_checkpointing(parts=True)
    S, blocks = 3, len(model.transformer_blocks)
    x, text, t = _segments_input(S)

    def step(saving):
        kernels.runs = 0
        feed_forwards.clear()
        model.zero_grad()
        with monkeypatch.context() as m:
            if not saving:
                m.setattr(memo, "_in_backward", lambda: False)
                m.setattr(cogvideox_ttt, "_block_recompute", contextlib.nullcontext)
            model(x, text, t).square().mean().backward()
        assert all(m.results is None for b in model.transformer_blocks for m in b._attention_memos.values())
        return kernels.runs, len(feed_forwards), [p.grad for p in model.parameters()]

    runs, ffs, grads = step(saving=True)
    runs_plain, ffs_plain, plain = step(saving=False)
    parts = -(-x.shape[1] // 13)  # the video's feed-forward parts of 13 frames; the captions' runs in the block
    assert (runs, ffs) == (2 * S * blocks, (2 * parts + 2) * blocks)
    assert (runs_plain, ffs_plain) == (3 * S * blocks, (3 * parts + 2) * blocks)
    for a, b in zip(grads, plain):
        assert torch.equal(a, b)
    model.enable_gradient_checkpointing(False)
    model.zero_grad()
    model(x, text, t).square().mean().backward()
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_zero_gates_give_plain_cogvideox(pretrained):
    plain = CogVideoXTTT.from_diffusers(pretrained, ttt=None).eval()
    model = CogVideoXTTT.from_diffusers(pretrained, ttt="mlp", ttt_mini_batch_size=16).eval()
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.ttt.gate_fwd.zero_()
            block.ttt.gate_bwd.zero_()
        x, text, t = _segments_input(2)
        assert torch.equal(model(x, text, t), plain(x, text, t))


@pytest.mark.parametrize("ttt,global_context", [(None, False), ("mlp", True)])
def test_first_caption_reaches_third_segment_only_through_ttt(pretrained, ttt, global_context):
    model = CogVideoXTTT.from_diffusers(pretrained, ttt=ttt, ttt_mini_batch_size=16, gate_init=0.5).eval()
    x, text, t = _segments_input(3)
    other = text.clone()
    other[:, 0] += 1.0
    with torch.no_grad():
        change = (model(x, text, t) - model(x, other, t)).abs().amax(dim=(0, 2, 3, 4))  # per latent frame
    assert change[:13].max() > 1e-3  # segment 1 follows its own caption
    # Frames 25..36 belong to segment 3 alone. Without TTT, a caption moves one segment per block
    # through the shared frames, so with two blocks it cannot reach them.
    assert (change[25:].max() > 1e-3) == global_context
    if not global_context:
        assert change[25:].max() == 0


@pytest.mark.parametrize("num_segments", [1, 2, 4])
def test_segments_join_and_merge(num_segments):
    """Against gathering each segment's frames by index and averaging the shared frames by counting
    (outputs and gradients): join writes caption then frames per segment, merge takes the mean where
    two segments share a frame, split and frames give each segment's frames, unjoin (of one tensor, or of
    the segments' tensors) gives the captions and the merged frames."""
    n, N, L, D = 4, 3, 2, 5
    F = num_segments * (n - 1) + 1 if num_segments > 1 else 7
    seg = Segments(F, num_segments, n)
    index = (torch.arange(num_segments)[:, None] * (n - 1) + torch.arange(n)[None] if num_segments > 1
             else torch.arange(F)[None])
    count = torch.bincount(index.flatten(), minlength=F).double()
    g = torch.Generator().manual_seed(0)
    text, video = torch.randn(2, num_segments, L, D, generator=g), torch.randn(2, F, N, D, generator=g)
    x = torch.randn(2, num_segments, index.shape[1], N, D, generator=g)
    y = torch.randn(2, num_segments, L + index.shape[1] * N, D, generator=g)

    def merged(x):
        summed = torch.zeros(2, F, N, D, dtype=x.dtype).index_add(1, index.flatten(), x.flatten(1, 2))
        return summed / count.view(-1, 1, 1)

    def reference(text, video, x, y):
        joined = torch.cat([text, video[:, index].flatten(2, 3)], 2)
        frames = video[:, index]
        return joined, merged(x), frames, frames, y[:, :, :L], merged(y[:, :, L:].unflatten(2, (-1, N)))

    got, ref = ([t.double().requires_grad_() for t in (text, video, x, y)] for _ in range(2))
    outs = (seg.join(*got[:2]), seg.merge(got[2]), seg.split(got[1]), torch.stack(seg.frames(got[1]), 1),
            *seg.unjoin(got[3], L, N))
    refs = reference(*ref)
    if num_segments > 1:
        outs += seg.unjoin(list(got[3].unbind(1)), L, N)
        refs += refs[-2:]
    for a, r in zip(outs, refs):
        torch.testing.assert_close(a, r)
    probes = [torch.randn(r.shape, generator=g, dtype=torch.double) for r in refs]
    grads = torch.autograd.grad(sum((a * p).sum() for a, p in zip(outs, probes)), got)
    for a, r in zip(grads, torch.autograd.grad(sum((r * p).sum() for r, p in zip(refs, probes)), ref)):
        torch.testing.assert_close(a, r)


def test_segment_frame_count_is_checked(pretrained):
    model = CogVideoXTTT.from_diffusers(pretrained, ttt=None)
    x, text, t = _segments_input(3)
    with pytest.raises(UserError, match="3 segments of 13 latent frames sharing one frame need 37"):
        model(x[:, :-1], text, t)
    with pytest.raises(UserError, match="must divide by the patch size"):
        model(x[..., :3], text, t)


def test_framework_call_takes_the_package_layout(pretrained):
    torch.manual_seed(0)
    model = CogVideoXTTT.from_diffusers(pretrained, ttt="mlp", ttt_mini_batch_size=16).eval()
    torch.manual_seed(0)
    framework = FrameworkCogVideoXTTT.from_diffusers(pretrained, ttt="mlp", ttt_mini_batch_size=16).eval()
    assert framework.text_dim == 12 and framework.state_dict().keys() == model.state_dict().keys()
    x, text, t = _segments_input(2)
    mask = torch.ones(text.shape[:3], dtype=torch.bool)
    with torch.no_grad():
        out = framework(x.transpose(1, 2), t, text, mask)  # latents [B, C, F, h, w]
        assert torch.equal(out, model(x, text, t).transpose(1, 2))


def test_own_checkpoint_round_trip(pretrained, tmp_path):
    torch.manual_seed(0)
    model = CogVideoXTTT.from_diffusers(pretrained, ttt="linear", ttt_mini_batch_size=16).eval()
    model.save_pretrained(tmp_path)
    again = CogVideoXTTT.from_pretrained(tmp_path).eval()
    assert again.cfg == model.cfg
    x, text, t = _segments_input(2)
    with torch.no_grad():
        torch.testing.assert_close(again(x, text, t), model(x, text, t), rtol=0, atol=1e-6)


def test_later_stages_train_ttt_and_attention_only(pretrained):
    model = CogVideoXTTT.from_diffusers(pretrained, ttt="mlp", ttt_mini_batch_size=16)
    apply_adapter(model, "ttt-qkvo")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        expected = ".ttt." in name or any(f".attn1.{k}." in name for k in ("to_q", "to_k", "to_v", "to_out"))
        assert (name in trained) == expected, name
    assert any("gate_fwd" in n for n in trained) and not any("norm_q" in n or ".ff." in n for n in trained)
    x, text, t = _segments_input(2)
    model(x, text, t).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trained), name

    apply_adapter(model, "full")
    groups = param_groups(model, weight_decay=1e-4, lr=1e-5, ttt_lr=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(names)
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert g["lr"] == (1e-4 if ".ttt." in name else 1e-5), name
            owner = name.split(".")[-2]
            exempt = (name.endswith(("bias", ".b1", ".b2", ".ln_weight", ".ln_bias", "gate_fwd", "gate_bwd"))
                      or "norm" in owner)  # norm_q, post_norm, norm_fwd, ExpertNorm's norm ...; not its linear
            assert g["weight_decay"] == (0.0 if exempt else 1e-4), name
    decays = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert "transformer_blocks.0.norm1.linear.weight" in decays and "transformer_blocks.0.ttt.ttt.w1" in decays
    assert "transformer_blocks.0.ttt.ttt.b1" not in decays


@pytest.mark.parametrize("seconds", [3, 9, 18, 30, 63])
def test_presets_build_the_stage(pretrained, seconds):
    cfg = apply_overrides(get_preset(f"cogvideox-5b-ttt-{seconds}s"),
                          [f"model.pretrained={pretrained}", "model.ttt_mini_batch_size=16"])
    assert cfg.data.num_scenes == seconds // 3 and cfg.data.text_max_length == 226
    assert cfg.train.weight_decay == 1e-4 and cfg.train.grad_clip == 0.1 and cfg.train.caption_dropout == 0.1
    assert cfg.train.lr == 1e-5 and cfg.train.ttt_lr == (1e-4 if seconds == 3 else 1e-5)
    assert cfg.train.grad_checkpointing and cfg.diffusion.objective == "v-prediction"
    model = build_model(cfg.model)
    assert isinstance(model, CogVideoXTTT) and model.cfg.ttt == "mlp"
    apply_adapter(model, cfg.train.adapter)
    assert all(p.requires_grad for p in model.parameters()) == (seconds == 3)


def test_build_model_needs_the_pretrained_folder():
    cfg = get_preset("cogvideox-5b-ttt-3s")
    with pytest.raises(UserError, match="model.pretrained"):
        build_model(cfg.model)


@pytest.mark.parametrize("parts", [False, True])
def test_offloaded_block_inputs_come_back_during_the_next_blocks_backward(monkeypatch, parts):
    """With offloaded inputs (on the meta device, as `ttt-video plan` runs it) the copy back of a block's
    inputs starts in the backward of the block after it, once that backward is past its TTT layer (the
    block's recompute and the TTT passes' backward: its peak), before the block itself takes them."""
    from ttt_video.layers.ttt import BidirectionalTTT
    from ttt_video.models import cogvideox_ttt

    cfg = CogVideoXTTTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                             time_embed_dim=16, text_embed_dim=16, num_layers=3, sample_height=16, sample_width=16,
                             max_text_seq_length=8, use_rotary_positional_embeddings=True, ttt="linear",
                             ttt_mini_batch_size=16)
    with torch.device("meta"):
        model = CogVideoXTTT(cfg).train()
        x, text, t = torch.randn(1, 25, 4, 8, 8), torch.randn(1, 2, 8, 16), torch.tensor([500])
    model.enable_gradient_checkpointing(parts=parts, offload=True)
    log, copies = [], {}

    def logged(name, fn):
        def run(self, *args):
            copy = isinstance(self, cogvideox_ttt._HostCopy)  # each block's video and captions, in order
            log.append((name, copies.setdefault(id(self), len(copies)) // 2 if copy else None))
            return fn(self, *args)
        return run

    for name in ("__init__", "prefetch", "take"):
        monkeypatch.setattr(cogvideox_ttt._HostCopy, name, logged(name, getattr(cogvideox_ttt._HostCopy, name)))
    monkeypatch.setattr(BidirectionalTTT, "_gated_pass", logged("ttt", BidirectionalTTT._gated_pass))
    model(x, text, t).square().mean().backward()
    first = {event: i for i, event in reversed(list(enumerate(log)))}
    for k in (2, 1):
        taken, started = first[("take", k)], first[("prefetch", k - 1)]
        ttt = [name for name, _ in log[taken:started]].count("ttt")
        assert ttt == (3 if parts else 2)  # the passes in the block's recompute (and the first in its own)
        assert started < first[("take", k - 1)]
