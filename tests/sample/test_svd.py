import torch

from ttt_video.config import ModelConfig
from ttt_video.diffusion.edm import frame_guidance, karras_sigmas, sample_edm
from ttt_video.encoders.svd_image import SVDImageEncoder
from ttt_video.encoders.vae import build_vae
from ttt_video.layers.dit import condition_input
from ttt_video.models import build_model


def test_sampling_equals_the_diffusers_pipeline(svd_pipeline):
    """Conditioning, model call and sampler together against StableVideoDiffusionPipeline. The
    image is at the CLIP input size, where the pipeline's tensor path resizes nothing for CLIP;
    for the VAE it resizes the image to the video's size (nearest), as done here."""
    folder, pipe = svd_pipeline
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    F, steps, H, W = 3, 3, 16, 24
    reference = pipe(image, height=H, width=W, num_frames=F, num_inference_steps=steps, min_guidance_scale=1.0,
                     max_guidance_scale=2.5, fps=7, motion_bucket_id=90, noise_aug_strength=0.1,
                     generator=torch.Generator().manual_seed(1), output_type="latent").frames  # [B, F, C, h, w]

    g = torch.Generator().manual_seed(1)  # the pipeline draws the augmentation noise, then the latents
    aug, noise = torch.randn(1, 3, 1, H, W, generator=g), torch.randn(1, F, 4, H // 2, W // 2, generator=g)
    model = build_model(ModelConfig(arch="svd", pretrained=str(folder), in_channels=4, condition_frames=1, fps_id=6,
                                    motion_bucket_id=90, noise_aug_strength=0.1)).eval()
    encoder = SVDImageEncoder(folder, build_vae(str(folder / "vae")), noise_aug_strength=0.1)
    small = torch.nn.functional.interpolate(image, size=(H, W))[:, :, None] * 2 - 1
    text, mask = encoder.embed(image[:, :, None] * 2 - 1), torch.ones(1, 1, 1, dtype=torch.bool)
    cond = condition_input(encoder.latents(small, aug), F)

    def model_fn(x, t, text, mask, cond):
        return model(x, t, text, mask, cond=cond)

    ours = sample_edm(model_fn, noise.transpose(1, 2), (text, mask, cond),
                      (torch.zeros_like(text), mask, torch.zeros_like(cond)), karras_sigmas(steps, 0.002, 700.0),
                      frame_guidance(1.0, 2.5, F), progress=False)
    torch.testing.assert_close(ours.transpose(1, 2), reference, rtol=1e-4, atol=1e-4)
