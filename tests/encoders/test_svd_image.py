import pytest
import torch

from ttt_video.encoders.svd_image import SVDImageEncoder
from ttt_video.encoders.vae import IdentityVAE, build_vae
from ttt_video.errors import UserError


@pytest.fixture(scope="module")
def encoder(svd_pipeline):
    folder = svd_pipeline[0]
    return SVDImageEncoder(folder, build_vae(str(folder / "vae")), noise_aug_strength=0.05)


def test_embedding_and_latents_equal_the_pipelines(svd_pipeline, encoder):
    pipe = svd_pipeline[1]
    g = torch.Generator().manual_seed(0)
    # at the CLIP input size the pipeline resizes nothing, so its tensor path is the reference
    image = torch.rand(2, 3, 224, 224, generator=g)
    reference = pipe._encode_image(image, "cpu", 1, False)  # [B, 1, D]
    torch.testing.assert_close(encoder.embed(image[:, :, None] * 2 - 1), reference[:, None], rtol=1e-4, atol=1e-5)

    image, noise = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1, torch.randn(2, 3, 16, 24, generator=g)
    reference = pipe._encode_vae_image(image + 0.05 * noise, "cpu", 1, False)  # the posterior's mode, unscaled
    torch.testing.assert_close(encoder.latents(image[:, :, None], noise[:, :, None]), reference[:, :, None])


def test_inputs_of_a_batch_and_the_unconditional_zeros(encoder):
    g = torch.Generator().manual_seed(1)
    image, noise = torch.rand(3, 3, 1, 16, 24, generator=g) * 2 - 1, torch.randn(3, 3, 1, 16, 24, generator=g)
    text, mask, cond = encoder(image, 5, noise, torch.tensor([True, False, True]))
    assert text.shape == (3, 1, 1, 32) and mask.shape == (3, 1, 1) and mask.all()
    assert cond.shape == (3, 5, 5, 8, 12)
    torch.testing.assert_close(cond[:, :4, 0], encoder.latents(image, noise)[:, :, 0] * torch.tensor([1., 0, 1])
                               .view(3, 1, 1, 1))
    assert cond[:, :, 1:].abs().max() == 0 and cond[:, 4, 0].tolist() == [[[1.0] * 12] * 8, [[0.0] * 12] * 8,
                                                                           [[1.0] * 12] * 8]
    assert text[1].abs().max() == 0 and text[0].abs().max() > 0

    video = torch.rand(3, 3, 5, 16, 24, generator=g) * 2 - 1
    given = torch.rand(3, 3, 1, 16, 24, generator=g) * 2 - 1
    batch = {"video": video, "task": ["i2v", "t2v", "i2v"], "cond_image": given}
    drop = torch.tensor([[False], [False], [True]])
    text, _, cond = encoder.training_inputs(batch, 5, [0, 1, 2], drop, seed=0)
    again = encoder.training_inputs({"video": video[1:2]}, 5, [1], drop[1:2], seed=0)
    torch.testing.assert_close(again[0], text[1:2])  # item 1: its first frame, the same noise alone
    torch.testing.assert_close(again[2], cond[1:2])
    assert text[2].abs().max() == 0 and cond[2].abs().max() == 0  # a dropped caption drops the image
    torch.testing.assert_close(text[0], encoder.embed(given[:1])[0])  # the manifest's condition image


def test_missing_files_and_a_pixel_vae_are_user_errors(svd_pipeline, tmp_path):
    with pytest.raises(UserError, match="Stable Video Diffusion files missing: .*image_encoder/config.json"):
        SVDImageEncoder(tmp_path, IdentityVAE(), 0.02)
    with pytest.raises(UserError, match="set data.vae to its vae/ folder"):
        SVDImageEncoder(svd_pipeline[0], IdentityVAE(), 0.02)


def test_temporal_decoder_vae_decodes_like_the_pipeline(svd_pipeline):
    folder, pipe = svd_pipeline
    vae = build_vae(str(folder / "vae"))
    assert (vae.latent_channels, vae.spatial_compression, vae.temporal_compression) == (4, 2, 1)
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    mean, std = vae.encode(video)
    assert mean.shape == std.shape == (2, 4, 5, 8, 12)
    vae.frames_per_chunk = 3  # chunks of 3 and 2 frames, each decoded with its own num_frames
    decoded = vae.decode(mean)
    assert decoded.shape == video.shape
    for b in range(2):  # decode_latents takes [B, F, C, h, w] in the VAE's units
        reference = pipe.decode_latents(mean[b:b + 1].transpose(1, 2), num_frames=5, decode_chunk_size=3)
        torch.testing.assert_close(decoded[b:b + 1], reference)
