import torch

from ttt_video.config import ModelConfig
from ttt_video.models import build_model


def tiny_model(**overrides):
    """A small model of any arch, its zero-initialised layers perturbed so every path carries signal."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{"dim": 32, "depth": 2, "num_heads": 2, "text_dim": 12, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_inputs(S=3):
    """Latents of S segments of 4 frames at 8x8, two timesteps, and S captions of 5 tokens."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, S * 4, 8, 8, generator=g)
    return x, torch.tensor([10.0, 700.0]), torch.randn(2, S, 5, 12, generator=g)


def check_shapes_and_gradients(model, nonzero=False):
    """A forward with padded captions keeps the latent shape and every parameter gets a gradient."""
    x, t, text = tiny_inputs()
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[:, :, -2:] = False
    out = model(x, t, text, mask)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and (not nonzero or p.grad.abs().max() > 0) for p in model.parameters())


def tiny_svd_pipeline(folder):
    """A Stable Video Diffusion pipeline folder of tiny random components (the real classes):
    UNet of two levels, VAE compressing 2x, CLIP vision tower at 224 pixels with 32-d embeddings."""
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), num_attention_heads=(2, 4),
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_frames=4)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                                       down_block_types=("DownEncoderBlock2D",) * 2)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=32,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          image_size=224, patch_size=56))
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    scheduler = EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True, sigma_min=0.002,
                                       sigma_max=700.0, timestep_type="continuous", timestep_spacing="leading",
                                       steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012)
    with torch.no_grad():  # the UNet's output layer starts at zero; perturb so every path carries signal
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=clip, unet=unet, scheduler=scheduler,
                                        feature_extractor=processor)
    pipe.save_pretrained(folder)
    return pipe


def eager_and_fused(model, inputs, monkeypatch):
    """The model's output and the gradients of its parameters that get one, for the loss mean(output^2), with
    the layers' steps eager (`TTT_VIDEO_COMPILE=0`) and fused (`=1`): two lists."""
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("TTT_VIDEO_COMPILE", flag)
        model.zero_grad()
        out = model(*inputs)
        out.square().mean().backward()
        runs.append([out.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)])
    return runs
