import pytest
import torch

from ttt_video.config import ModelConfig
from ttt_video.errors import UserError
from ttt_video.layers.dit import condition_input
from ttt_video.models import build_model
from ttt_video.models.svd import pipeline_folder
from ttt_video.train.adapters import TEMPORAL_MODULES, apply_adapter


def svd_model(folder, **overrides):
    cfg = ModelConfig(arch="svd", pretrained=str(folder), in_channels=4, condition_frames=1, **overrides)
    return build_model(cfg).eval()


def test_output_equals_the_unet_called_as_the_pipeline_calls_it(svd_pipeline):
    folder, pipe = svd_pipeline
    model = svd_model(folder, fps_id=6, motion_bucket_id=100, noise_aug_strength=0.05)
    g = torch.Generator().manual_seed(0)
    B, C, F, h, w = 2, 4, 3, 8, 12
    x = torch.randn(B, C, F, h, w, generator=g)
    image_latents = torch.randn(B, C, h, w, generator=g)
    embeddings = torch.randn(B, 1, 32, generator=g)
    t = torch.tensor([-1.2, 1.6])
    with torch.no_grad():
        ours = model(x, t, embeddings[:, None], torch.ones(B, 1, 1, dtype=torch.bool),
                     cond=condition_input(image_latents[:, :, None], F))
        # StableVideoDiffusionPipeline: latents [B, F, C, h, w], the image latents repeated over
        # frames and concatenated on channels, time ids (fps - 1, motion bucket, noise strength)
        sample = torch.cat([x.transpose(1, 2), image_latents[:, None].repeat(1, F, 1, 1, 1)], dim=2)
        time_ids = pipe._get_add_time_ids(7 - 1, 100, 0.05, torch.float32, B, 1, False)
        reference = pipe.unet(sample, t, encoder_hidden_states=embeddings, added_time_ids=time_ids,
                              return_dict=False)[0]
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, reference.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_the_unet_and_gradient_checkpointing_switches(svd_pipeline):
    folder, _ = svd_pipeline
    model = svd_model(folder / "unet")  # the unet/ folder alone loads too
    assert pipeline_folder(str(folder / "unet")) == pipeline_folder(str(folder)) == folder
    assert all(k.startswith("unet.") for k in model.state_dict())
    model.enable_gradient_checkpointing()
    assert model.unet.is_gradient_checkpointing
    model.enable_gradient_checkpointing(False)
    assert not model.unet.is_gradient_checkpointing


def test_temporal_adapter_trains_only_the_temporal_layers(svd_pipeline):
    model = apply_adapter(svd_model(svd_pipeline[0]), "temporal")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trained and frozen
    assert all(any(f".{m}." in n for m in TEMPORAL_MODULES) for n in trained)
    assert {m for m in TEMPORAL_MODULES if any(f".{m}." in n for n in trained)} == set(TEMPORAL_MODULES)
    assert any(".spatial_res_block." in n for n in frozen) and any(".transformer_blocks." in n for n in frozen)


@pytest.mark.parametrize("overrides,msg", [
    (dict(pretrained=""), "arch svd needs model.pretrained"),
    (dict(pretrained="/no/svd"), "no UNetSpatioTemporalConditionModel in /no/svd"),
    (dict(in_channels=3), "set model.in_channels=4"),
])
def test_configuration_errors_name_the_fix(svd_pipeline, overrides, msg):
    cfg = {**dict(arch="svd", pretrained=str(svd_pipeline[0]), in_channels=4, condition_frames=1), **overrides}
    with pytest.raises(UserError, match=msg):
        build_model(ModelConfig(**cfg))
    with pytest.raises(ValueError, match="image-to-video only"):
        build_model(ModelConfig(arch="svd", pretrained=str(svd_pipeline[0]), in_channels=4))
