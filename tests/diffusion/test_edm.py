import pytest
import torch
from diffusers import EulerDiscreteScheduler

from ttt_video.config import DiffusionConfig
from ttt_video.diffusion import build_objective
from ttt_video.diffusion.edm import EDM, denoised, frame_guidance, karras_sigmas, sample_edm, scale_input

SVD_SCHEDULER = dict(prediction_type="v_prediction", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0,
                     timestep_type="continuous", timestep_spacing="leading", steps_offset=1,
                     beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_pair_target_and_loss_are_consistent():
    edm = build_objective(DiffusionConfig(objective="edm", p_mean=0.5, p_std=1.2))
    assert isinstance(edm, EDM) and (edm.p_mean, edm.p_std) == (0.5, 1.2)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 6, 7, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 6, 7, generator=g)
    t = torch.tensor([0.02, 0.5, 0.97])
    inp, target = edm.training_pair(x0.float(), t, noise)
    s = edm.sigma(t).view(-1, 1, 1, 1, 1)
    x = x0.float() + s * noise
    torch.testing.assert_close(inp, x / (s**2 + 1).sqrt())
    torch.testing.assert_close(denoised(x, target, s), x0.float(), rtol=1e-5, atol=1e-5 * float(s.max()))
    assert edm.loss(target, target, t) == 0
    pred = target + 0.1 * torch.randn(target.shape, generator=g)
    weighted = ((s**2 + 1) / s**2 * (denoised(x, pred, s) - denoised(x, target, s)) ** 2).mean()
    torch.testing.assert_close(edm.loss(pred, target, t), weighted, rtol=1e-4, atol=0)
    torch.testing.assert_close(edm.model_timestep(t), 0.25 * edm.sigma(t).log())


def test_training_sigmas_are_log_normal():
    edm = EDM(p_mean=0.7, p_std=1.6)
    t = edm.sample_time(200_000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    log_sigma = edm.sigma(t).log()
    assert log_sigma.mean().item() == pytest.approx(0.7, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.6, abs=0.02)
    assert torch.all(edm.sigma(torch.tensor([0.1, 0.5, 0.9])).diff() > 0)  # t = 1 is pure noise


def test_schedule_and_step_match_diffusers_euler_scheduler():
    sched = EulerDiscreteScheduler(**SVD_SCHEDULER)
    sched.set_timesteps(7)
    sigmas = karras_sigmas(7, 0.002, 700.0)
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(0.25 * sigmas[:-1].log(), sched.timesteps)
    x, f = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    for i, t in enumerate(sched.timesteps):
        s = sigmas[i]
        torch.testing.assert_close(scale_input(x, s), sched.scale_model_input(x, t))
        ours = x + (x - denoised(x, f, s)) / s * (sigmas[i + 1] - s)
        torch.testing.assert_close(ours, sched.step(f, t, x).prev_sample, rtol=1e-5, atol=1e-5)


def test_guided_sampler_matches_the_svd_pipeline_loop():
    """The loop of diffusers' StableVideoDiffusionPipeline (scale_model_input, [uncond, cond]
    batch, guidance rising over frames, scheduler.step) with a stand-in model."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g) * 0.3

    def model(x, t, text, image):
        return torch.einsum("dc,bcfhw->bdfhw", weight, x) * t.view(-1, 1, 1, 1, 1).cos() + text + image

    B, F, steps = 2, 5, 6
    noise = torch.randn(B, 4, F, 3, 3, generator=g)
    text, image = torch.randn(B, 1, 1, 1, 1, generator=g), torch.randn(B, 4, F, 3, 3, generator=g)
    guidance = frame_guidance(1.0, 3.0, F)
    ours = sample_edm(model, noise, (text, image), (torch.zeros_like(text), torch.zeros_like(image)),
                      karras_sigmas(steps, 0.002, 700.0), guidance, progress=False)

    sched = EulerDiscreteScheduler(**SVD_SCHEDULER)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    scale = torch.linspace(1.0, 3.0, F).view(1, 1, F, 1, 1)
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        out = model(inp, t.expand(2 * B), torch.cat([torch.zeros_like(text), text]),
                    torch.cat([torch.zeros_like(image), image]))
        uncond, cond = out.chunk(2)
        x = sched.step(uncond + scale * (cond - uncond), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
