"""EDM preconditioning (Karras et al., 2022) with v-prediction, as Stable Video Diffusion uses it,
and its Euler sampler over Karras sigmas with per-frame classifier-free guidance.

Noisy latents x = x_0 + σ n (σ_data = 1). The network F sees c_in x with c_in = 1 / √(σ² + 1)
and timestep c_noise = ¼ ln σ, and predicts v = (n − σ x_0) / √(σ² + 1), so that the denoised
latents are D = c_skip x + c_out F with c_skip = 1 / (σ² + 1), c_out = −σ / √(σ² + 1). This is
diffusers' `EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")`;
EDM's own F is the same with the opposite sign. c_in is applied here (`training_pair` returns
the model's input, and the sampler scales x before every call), so the model is called exactly
as the pretrained UNet was, like diffusers' `scheduler.scale_model_input`.

Objective time t ∈ (0, 1) (1 = pure noise) maps to σ = exp(P_mean + P_std · logit(t)); drawing
logit(t) ~ N(0, 1) makes ln σ ~ N(P_mean, P_std²), EDM's training distribution. Latents `[B, C, F, h, w]`.
"""

import torch
from tqdm.auto import tqdm


def scale_input(x, sigma):
    """c_in x."""
    return x / (sigma**2 + 1).sqrt()


def c_noise(sigma):
    return 0.25 * sigma.log()


def denoised(x, model_out, sigma):
    """D = c_skip x + c_out F for noisy latents `x` (not scaled by c_in) and σ broadcastable to x."""
    return model_out * (-sigma / (sigma**2 + 1).sqrt()) + x / (sigma**2 + 1)


def karras_sigmas(steps, sigma_min, sigma_max, rho=7.0):
    """`steps` noise levels from sigma_max down to sigma_min, evenly spaced in σ^(1/ρ), then 0.
    Computed in float64, as diffusers does before casting to float32."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


class EDM:
    def __init__(self, p_mean=0.7, p_std=1.6):
        self.p_mean, self.p_std = p_mean, p_std

    @classmethod
    def from_config(cls, diffusion_cfg):
        return cls(diffusion_cfg.p_mean, diffusion_cfg.p_std)

    def sample_time(self, batch, generator=None, device=None):
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))

    def sigma(self, t):
        return torch.exp(self.p_mean + self.p_std * torch.logit(t.double())).float()

    def training_pair(self, x0, t, noise):
        """Model input c_in (x_0 + σ n) and v target for clean `x0` at times `t` `[B]`."""
        s = self.sigma(t).to(x0.device).view(-1, *[1] * (x0.dim() - 1))
        return scale_input(x0 + s * noise, s), scale_input(noise - s * x0, s)

    def model_timestep(self, t):
        return c_noise(self.sigma(t))

    def loss(self, model_out, target, t=None):
        """EDM's weighted denoising loss λ(σ) ‖D − x_0‖² with λ = (σ² + 1) / σ²: since
        D − x_0 = c_out (F − v) and λ c_out² = 1, it is the plain mean squared error of v."""
        return torch.mean((model_out.float() - target.float()) ** 2)


def frame_guidance(min_scale, max_scale, num_frames):
    """Guidance scale per latent frame `[F]`, rising linearly from the first frame to the last, as
    SVD samples: the first frames stay near the conditioning image, later ones follow it more."""
    return torch.linspace(min_scale, max_scale, num_frames)


@torch.no_grad()
def sample_edm(model_fn, noise, cond, uncond, sigmas, guidance, progress=True):
    """Euler steps over `sigmas` (descending, ending at 0). `model_fn(x, timestep, *inputs)` -> F;
    cond/uncond are tuples of inputs for the conditional and unconditional call. `guidance`: one
    scale, or one per latent frame `[F]`. Noise `[B, C, F, h, w]` is scaled to the first level's
    marginal std √(σ² + 1) (unit-variance latents plus noise)."""
    guidance = torch.as_tensor(guidance, dtype=torch.float32, device=noise.device).view(1, 1, -1, 1, 1)
    guided = bool((guidance != 1).any())
    sigmas = sigmas.to(noise.device)
    x = noise * (sigmas[0] ** 2 + 1).sqrt()
    B = x.shape[0]
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False):
        s = sigmas[i]
        t = c_noise(s).expand(B)
        inp = scale_input(x, s)
        if guided:
            both = [torch.cat([c, u]) for c, u in zip(cond, uncond)]
            f_c, f_u = model_fn(torch.cat([inp, inp]), torch.cat([t, t]), *both).float().chunk(2)
            f = f_u + guidance * (f_c - f_u)
        else:
            f = model_fn(inp, t, *cond).float()
        x = x + (x - denoised(x, f, s)) / s * (sigmas[i + 1] - s)
    return x

