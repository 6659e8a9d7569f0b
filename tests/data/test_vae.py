import json

import pytest
import torch

from ttt_video.cli import main
from ttt_video.config import DataConfig
from ttt_video.encoders.vae import ExternalVAE, build_vae, vae_from_config
from ttt_video.errors import UserError

from .test_train_manifest import sets
from .videos import make_dataset

MODULE = "tests.data.test_vae"


class ToyVAE:
    """Halves height and width (mean of 2x2 pixels), adds a fourth channel, scales by `scale`."""

    latent_channels = 4
    temporal_compression = 1
    spatial_compression = 2

    def __init__(self, scale=1.0, device="cpu"):
        self.scale, self.device = scale, device

    def encode(self, video):
        pooled = torch.nn.functional.avg_pool3d(video, (1, 2, 2))
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * self.scale
        return mean, torch.full_like(mean, 0.1)

    def decode(self, latents):
        return torch.nn.functional.interpolate(latents[:, :3] / self.scale, scale_factor=(1, 2, 2))


class NoSpatial:
    latent_channels = 4
    temporal_compression = 1

    def encode(self, video):
        return video, video

    def decode(self, latents):
        return latents


def test_external_vae_round_trip_and_posterior_sample(tmp_path):
    vae = build_vae("external", module=MODULE, cls="ToyVAE", init_json='{"scale": 0.5}')
    assert isinstance(vae, ExternalVAE) and vae.adapter.scale == 0.5 and vae.adapter.device == "cpu"
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 1, 2)
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    mean, std = vae.encode(video)
    assert mean.shape == std.shape == (2, 4, 5, 8, 12)
    torch.testing.assert_close(mean[:, :3], torch.nn.functional.avg_pool3d(video, (1, 2, 2)) * 0.5)
    assert vae.decode(mean).shape == video.shape
    a, b = vae.sample(video, [[0, 1], [0, 2]]), vae.sample(video, [[0, 1], [0, 3]])
    assert a.shape == mean.shape and torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    init = tmp_path / "init.json"
    init.write_text(json.dumps({"scale": 2.0}))
    cfg = DataConfig(vae="external", vae_module=MODULE, vae_class="ToyVAE", vae_init_json=str(init))
    assert vae_from_config(cfg).adapter.scale == 2.0


@pytest.mark.parametrize("module,cls,init,msg", [
    (MODULE, "NoSpatial", "", "tests.data.test_vae.NoSpatial does not follow the VAE protocol: no spatial_compression"),
    ("no_such_module_xyz", "ToyVAE", "", "cannot import VAE module no_such_module_xyz"),
    (MODULE, "Missing", "", "VAE module tests.data.test_vae has no class Missing"),
    (MODULE, "ToyVAE", "{scale: 1}", "data.vae_init_json is not valid JSON"),
    (MODULE, "ToyVAE", "/no/init.json", "data.vae_init_json is neither a JSON object nor a file"),
    (MODULE, "ToyVAE", '{"size": 3}', "unexpected keyword argument 'size'"),
    ("", "", "", "needs data.vae_module and data.vae_class"),
])
def test_external_vae_errors_name_the_problem(module, cls, init, msg):
    with pytest.raises(UserError, match=msg):
        build_vae("external", module=module, cls=cls, init_json=init)


def tiny_cogvideox_vae(path):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 16), down_block_types=("CogVideoXDownBlock3D",) * 2,
                                 up_block_types=("CogVideoXUpBlock3D",) * 2, latent_channels=4, layers_per_block=1,
                                 norm_num_groups=4, sample_height=16, sample_width=16, scaling_factor=0.7)
    vae.save_pretrained(path)
    return vae.eval()


def test_cogvideox_adapter_follows_the_protocol_and_scales(tmp_path):
    reference = tiny_cogvideox_vae(tmp_path / "vae")
    vae = build_vae("external", module="ttt_video.encoders.cogvideox_vae", cls="CogVideoXVAE",
                    init_json=json.dumps({"path": str(tmp_path / "vae")}))
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 2, 2)
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    mean, std = vae.encode(video)
    assert mean.shape == std.shape == (1, 4, 5, 8, 12) and (std > 0).all()
    with torch.no_grad():
        dist = reference.encode(video).latent_dist
    torch.testing.assert_close(mean, dist.mean * 0.7, rtol=1e-4, atol=1e-5)
    assert vae.decode(mean).shape == video.shape
    with pytest.raises(UserError, match="VAE files missing"):
        build_vae("external", module="ttt_video.encoders.cogvideox_vae", cls="CogVideoXVAE",
                  init_json=json.dumps({"path": str(tmp_path / "none")}))


def test_prepare_with_an_external_vae(tmp_path, capsys):
    from safetensors.torch import load_file

    from ..train.test_trainer import TINY

    manifest = make_dataset(tmp_path / "data")
    code = main(["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "cache"), "--buckets", "16x24",
                 "--vae-module", MODULE, "--vae-class", "ToyVAE", "--vae-init-json", '{"scale": 0.5}',
                 "--no-progress", *sets(TINY + ["data.fps=8"])])
    capsys.readouterr()
    assert code == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["settings"]["vae"] == [MODULE, "ToyVAE", '{"scale": 0.5}']
    shard = load_file(tmp_path / "cache" / "shard-00000.safetensors")
    assert shard["0.mean"].shape[0] == 4 and shard["0.mean"].shape[2:] == (8, 12)
