import json
import re

import pytest
import torch
from safetensors import safe_open

from ttt_video.data import cache
from ttt_video.data.cache import CachedDataset, cached_text, prepare
from ttt_video.data.dataset import ManifestDataset, collate
from ttt_video.encoders.text import build_text_encoder
from ttt_video.encoders.vae import DiffusersVAE, IdentityVAE, build_vae
from ttt_video.errors import UserError

from .test_dataset import data_cfg
from .videos import make_dataset


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder("minilm", 16)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    manifest = make_dataset(root)
    (root / "good.jsonl").write_text("".join(manifest.read_text().splitlines(keepends=True)[:3]))
    return root


def test_prepare_counts_skips_and_resumes(root, encoder, tmp_path, capsys):
    cfg = data_cfg(root / "manifest.jsonl")
    result = prepare(cfg, tmp_path / "c", shard_size=3, progress=False, text_encoder=encoder)
    assert (result.items, result.new) == (8, 8)  # 11 windows, 3 of trunc.mp4 past its end
    assert result.report.counts() == {"bad_line": 1, "missing": 1, "corrupt": 1, "too_short": 1,
                                      "bad_image": 1, "truncated": 1}
    assert capsys.readouterr().err.count("warning: skipped") == 6
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert sorted({e["shard"] for e in index["items"]}) == [f"shard-0000{i}.safetensors" for i in range(3)]
    with safe_open(tmp_path / "c" / "shard-00000.safetensors", "pt") as shard:
        assert sorted(shard.keys()) == sorted(f"{n}.{k}" for n in range(3)
                                              for k in ("mean", "cond_mean", "text", "text_mask"))  # std = 0
    assert {s["where"] for s in index["skipped"]} >= {"trunc.mp4", "manifest.jsonl:4"}
    again = prepare(cfg, tmp_path / "c", shard_size=3, progress=False, text_encoder=encoder)
    assert (again.items, again.new) == (8, 0)
    with pytest.raises(UserError, match="made with fps=8, the config has 16"):
        prepare(data_cfg(root / "manifest.jsonl", fps=16), tmp_path / "c", progress=False, text_encoder=encoder)


def test_interrupted_prepare_keeps_finished_shards(root, encoder, tmp_path, monkeypatch):
    calls = []

    class Failing(IdentityVAE):
        def encode(self, video):
            calls.append(1)
            if len(calls) == 5:  # during the third item, after the first shard of two
                raise KeyboardInterrupt
            return super().encode(video)

    monkeypatch.setattr(cache, "vae_from_config", lambda data_cfg, device: Failing())
    cfg = data_cfg(root / "good.jsonl")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path / "c", shard_size=2, progress=False, text_encoder=encoder)
    assert len(json.loads((tmp_path / "c" / "index.json").read_text())["items"]) == 2
    result = prepare(cfg, tmp_path / "c", shard_size=2, progress=False, text_encoder=encoder)
    assert (result.items, result.new) == (7, 5)


def test_cached_batches_equal_on_the_fly_batches(root, encoder, tmp_path):
    cfg = data_cfg(root / "good.jsonl", i2v_ratio=0.5)
    prepare(cfg, tmp_path / "c", shard_size=4, workers=2, progress=False, text_encoder=encoder)
    fly = ManifestDataset(cfg)
    cached = CachedDataset(data_cfg(root / "good.jsonl", i2v_ratio=0.5, cache_dir=str(tmp_path / "c")))
    assert cached.buckets == fly.buckets
    s_fly, s_cached = fly.batch_sampler(0, 8, 2), cached.batch_sampler(0, 8, 2)
    tasks = set()
    for micro in range(8):
        assert s_fly.indices(micro) == s_cached.indices(micro)
        a = collate([fly[i] for i in s_fly.indices(micro)])
        b = collate([cached[i] for i in s_cached.indices(micro)])
        torch.testing.assert_close(b["latents"], a["video"], rtol=0, atol=0)
        torch.testing.assert_close(b["cond_latents"], a["cond_image"], rtol=0, atol=0)
        assert b["captions"] == a["captions"] and b["task"] == a["task"]
        tasks.update(a["task"])
        flat = [c for row in a["captions"] for c in row]
        emb, mask = encoder.encode(flat)
        torch.testing.assert_close(b["text"].flatten(0, 1), emb)
        assert torch.equal(b["text_mask"].flatten(0, 1), mask)
        drop = torch.zeros(len(flat), dtype=torch.bool).view(b["text_mask"].shape[:2])
        drop[0, 0] = True
        text, text_mask = cached_text(b, cached.empty_text, drop)
        empty, empty_mask = encoder.encode([""])
        torch.testing.assert_close(text[0, 0], empty[0])
        assert torch.equal(text_mask[0, 0], empty_mask[0]) and torch.equal(text[-1, -1], b["text"][-1, -1])
    assert tasks == {"t2v", "i2v"}
    with pytest.raises(UserError, match="made with frames_per_scene=4"):
        CachedDataset(data_cfg(root / "good.jsonl", frames_per_scene=8, cache_dir=str(tmp_path / "c")))
    with pytest.raises(UserError, match="cache index not found"):
        CachedDataset(data_cfg(root / "good.jsonl", cache_dir=str(tmp_path / "none")))


def halve(data):
    return data[: len(data) // 2]


def edited(edit):
    """A damage that applies `edit` to the parsed index."""
    def damage(data):
        index = json.loads(data)
        edit(index)
        return json.dumps(index).encode()
    return damage


MALFORMED_INDEX = [
    (lambda index: index["items"][1].pop("shard"), "items[1] lacks 'shard'"),
    (lambda index: index["items"][0].pop("key"), "items[0] lacks 'key'"),
    (lambda index: index["items"][0].update(slot="0"), "items[0]['slot'] is '0', not an integer"),
    (lambda index: index["items"][0].update(bucket=[16, 24]), "items[0]['bucket'] is [16, 24], not [height, width, "),
    (lambda index: index["items"].insert(0, None), "items[0] is not an object"),
    (lambda index: index.update(settings=[]), "its settings are not an object"),
    (lambda index: index.update(skipped=[{"kind": "lost", "where": "a.mp4", "reason": "x"}]),
     "skipped[0]['kind'] is 'lost', not one of bad_line, missing, "),
]


@pytest.mark.parametrize("name,damage,msg", [
    ("shard-00000.safetensors", halve, "cache file {c}/shard-00000.safetensors is not a readable safetensors file"),
    ("empty_text.safetensors", halve, "cache file {c}/empty_text.safetensors is not a readable safetensors file"),
    ("index.json", halve, "cache index {c}/index.json is not valid JSON"),
    ("index.json", lambda data: b"[]", "{c}/index.json is not a `ttt-video prepare` index (no list of items)"),
    *[("index.json", edited(edit), f"{{c}}/index.json is not a `ttt-video prepare` index ({msg}")
      for edit, msg in MALFORMED_INDEX],
])
def test_a_corrupt_cache_is_named_before_training(root, encoder, tmp_path, name, damage, msg):
    cfg = data_cfg(root / "good.jsonl", cache_dir=str(tmp_path / "c"))
    prepare(cfg, tmp_path / "c", shard_size=4, progress=False, text_encoder=encoder)
    path = tmp_path / "c" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=re.escape(msg.format(c=tmp_path / "c"))):
        CachedDataset(cfg)
    if name == "index.json":  # a re-run of prepare reads the index too
        with pytest.raises(UserError, match=re.escape(msg.format(c=tmp_path / "c"))):
            prepare(cfg, tmp_path / "c", progress=False, text_encoder=encoder)


def test_an_item_its_shard_lacks_is_named_before_training(root, encoder, tmp_path):
    cfg = data_cfg(root / "good.jsonl", cache_dir=str(tmp_path / "c"))
    prepare(cfg, tmp_path / "c", shard_size=4, progress=False, text_encoder=encoder)
    index = tmp_path / "c" / "index.json"
    index.write_bytes(edited(lambda index: index["items"][5].update(slot=9))(index.read_bytes()))
    with pytest.raises(UserError, match=re.escape(f"cache file {tmp_path}/c/shard-00001.safetensors lacks 9.mean "
                                                  f"(items[5] of {index})")):
        CachedDataset(cfg)


def tiny_autoencoder(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(path)
    return vae.eval()


def test_diffusers_vae_encodes_frame_by_frame_in_latent_units(tmp_path):
    reference = tiny_autoencoder(tmp_path / "vae")
    vae = build_vae(str(tmp_path / "vae"))
    assert isinstance(vae, DiffusersVAE) and vae.latent_channels == 4
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    mean, std = vae.encode(video)
    assert mean.shape == std.shape == (2, 4, 5, 8, 12) and (std > 0).all()
    with torch.no_grad():
        dist = reference.encode(video[1, :, 3][None]).latent_dist
    torch.testing.assert_close(mean[1, :, 3], (dist.mean[0] - 0.1) * 0.5, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std[1, :, 3], dist.std[0] * 0.5, rtol=1e-4, atol=1e-5)
    assert vae.decode(mean).shape == video.shape
    a, b = vae.sample(video, [[0, 1], [0, 2]]), vae.sample(video, [[0, 1], [0, 3]])
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    with pytest.raises(UserError, match="VAE folder not found"):
        build_vae(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="VAE files missing: .*config.json"):
        build_vae(str(tmp_path / "empty"))


def _prepared_with_a_vae(root, encoder, tmp_path):
    """The good manifest, every item i2v, prepared with a tiny diffusers VAE: (its config, the cache)."""
    tiny_autoencoder(tmp_path / "vae")
    cfg = data_cfg(root / "good.jsonl", vae=str(tmp_path / "vae"), i2v_ratio=1.0)
    prepare(cfg, tmp_path / "c", progress=False, text_encoder=encoder)
    return cfg, CachedDataset(data_cfg(root / "good.jsonl", vae=str(tmp_path / "vae"), i2v_ratio=1.0,
                                       cache_dir=str(tmp_path / "c")))


def test_prepare_with_a_diffusers_vae(root, encoder, tmp_path):
    _, cached = _prepared_with_a_vae(root, encoder, tmp_path)
    item = cached[0]
    assert item["latents"].shape == (4, 8, 8, 12) and item["cond_latents"].shape == (4, 1, 8, 12)
    assert not torch.equal(item["latents"], cached._get(cached.entries[0], "mean"))  # a posterior sample
    torch.testing.assert_close(cached[0]["latents"], item["latents"])  # fixed by (seed, draw)


def test_cached_i2v_condition_equals_the_one_encoded_on_the_fly(root, encoder, tmp_path):
    from ttt_video.train.trainer import image_condition

    cfg, cached = _prepared_with_a_vae(root, encoder, tmp_path)
    vae, dataset, conditioned = build_vae(cfg.vae), ManifestDataset(cfg), 0
    for draw in range(len(dataset)):
        decoded, from_cache = collate([dataset[draw]]), collate([cached[draw]])
        x0 = vae.sample(decoded["video"], [[cfg.seed, draw]])
        torch.testing.assert_close(x0, from_cache["latents"], rtol=1e-4, atol=1e-5)
        on_the_fly = image_condition(decoded, x0, vae, [draw], cfg)
        torch.testing.assert_close(on_the_fly, image_condition(from_cache, x0, None, [draw], cfg),
                                   rtol=1e-4, atol=1e-5)
        assert bool(on_the_fly[0, -1, 0].all()) == (decoded["task"][0] == "i2v")
        conditioned += decoded["task"][0] == "i2v"
    assert conditioned > 0


def test_diffusers_cogvideox_vae_compresses_time(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    AutoencoderKLCogVideoX(block_out_channels=(8, 16), down_block_types=("CogVideoXDownBlock3D",) * 2,
                           up_block_types=("CogVideoXUpBlock3D",) * 2, latent_channels=4, layers_per_block=1,
                           norm_num_groups=4, sample_height=16, sample_width=16).save_pretrained(tmp_path / "vae")
    vae = build_vae(str(tmp_path / "vae"))
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    mean, std = vae.encode(video)
    assert mean.shape == std.shape == (1, 4, 5, 8, 12) and (std > 0).all()
    assert vae.decode(mean).shape == video.shape


def test_cache_settings_record_scene_markers_only_when_on():
    from ttt_video.config import DataConfig

    assert "scene_markers" not in cache.cache_settings(DataConfig())  # caches made before the setting match
    assert cache.cache_settings(DataConfig(scene_markers=True))["scene_markers"] is True
    made_with = {"settings": cache.cache_settings(DataConfig(scene_markers=True))}
    cache._check_settings(made_with, DataConfig(scene_markers=True), "c")
    with pytest.raises(UserError, match="made with scene_markers=True, the config has None"):
        cache._check_settings(made_with, DataConfig(), "c")
    with pytest.raises(UserError, match="made with scene_markers=None, the config has True"):
        cache._check_settings({"settings": cache.cache_settings(DataConfig())}, DataConfig(scene_markers=True), "c")
