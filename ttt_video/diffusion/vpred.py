"""CogVideoX's training objective: DDPM with v-prediction over integer timesteps.

The noise schedule is the one diffusers' `CogVideoXDDIMScheduler` defines: betas (scaled-linear
from 0.00085 to 0.012 over 1000 steps), their cumulative product ab, CogVideoX's SNR shift
ab / (s + (1 - s) ab) (s = `snr_shift_scale`: 1.0 for CogVideoX-5B, 3.0 for 2B), then the
zero-terminal-SNR rescaling, so the last timestep is pure noise. A diffusers scheduler config
(`scheduler_config.json` of a CogVideoX pipeline) supplies these values; without one,
CogVideoX-5B's are used.

Timestep k is drawn uniformly from {0, ..., N - 1}; x_k = sqrt(ab_k) x0 + sqrt(1 - ab_k) noise,
and the model, called with k, predicts v = sqrt(ab_k) noise - sqrt(1 - ab_k) x0. Times t in
[0, 1] (the objective interface) are k / (N - 1): t = 1 is pure noise.

CogVideoX fine-tuning scores the predicted x0 = sqrt(ab) x_k - sqrt(1 - ab) v_pred with weight
1 / (1 - ab). Since x0_pred - x0 = -sqrt(1 - ab) (v_pred - v), that weighted loss is exactly the
mean squared error of v, which is what `loss` computes (no division by 1 - ab near k = 0).
Latents any layout `[B, ...]`.
"""

from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import read_json

SCHEDULER_FILE = "scheduler_config.json"
# CogVideoX-5B's scheduler config (the values a pipeline folder's file would give)
COGVIDEOX_5B = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "snr_shift_scale": 1.0, "rescale_betas_zero_snr": True,
                "prediction_type": "v_prediction", "trained_betas": None}


def rescale_zero_terminal_snr(alphas_cumprod):
    """Shift and scale sqrt(ab) so the last value is 0 and the first is unchanged."""
    s = alphas_cumprod.sqrt()
    first, last = s[0].clone(), s[-1].clone()
    return ((s - last) * first / (first - last)) ** 2


def cogvideox_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", snr_shift_scale=1.0, rescale_betas_zero_snr=True):
    """ab `[N]`, float64 for scaled-linear betas (and float32 for linear ones), as diffusers computes them."""
    N = num_train_timesteps
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, N, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, N, dtype=torch.float32)
    else:
        raise UserError(f"unsupported beta_schedule {beta_schedule!r} for v-prediction; "
                        "supported: scaled_linear, linear")
    ab = torch.cumprod(1.0 - betas, 0)
    ab = ab / (snr_shift_scale + (1 - snr_shift_scale) * ab)
    return rescale_zero_terminal_snr(ab) if rescale_betas_zero_snr else ab


def read_scheduler_config(path):
    """The schedule values of a diffusers scheduler config (the file or its folder); keys it does
    not set keep CogVideoX-5B's values."""
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULER_FILE
    data = read_json(path, "scheduler config")
    values = {**COGVIDEOX_5B, **{k: v for k, v in data.items() if k in COGVIDEOX_5B}}
    if values["prediction_type"] != "v_prediction":
        raise UserError(f"{path}: prediction_type is {values['prediction_type']!r}; "
                        "diffusion.objective v-prediction needs v_prediction")
    if values["trained_betas"] is not None:
        raise UserError(f"{path}: trained_betas are not supported; give beta_start, beta_end and beta_schedule")
    return values


class VPrediction:
    def __init__(self, **schedule):
        values = {**COGVIDEOX_5B, **schedule}
        self.num_train_timesteps = values["num_train_timesteps"]
        self.alphas_cumprod = cogvideox_alphas_cumprod(
            values["num_train_timesteps"], values["beta_start"], values["beta_end"], values["beta_schedule"],
            values["snr_shift_scale"], values["rescale_betas_zero_snr"])

    @classmethod
    def from_config(cls, diffusion_cfg):
        if not diffusion_cfg.scheduler:
            return cls()
        return cls(**read_scheduler_config(diffusion_cfg.scheduler))

    def sample_time(self, batch, generator=None, device=None):
        k = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)
        return k / (self.num_train_timesteps - 1)

    def timestep_index(self, t):
        return torch.round(t.double() * (self.num_train_timesteps - 1)).long()

    def _coefficients(self, t, like):
        """sqrt(ab), sqrt(1 - ab) at times `t` `[B]`, shaped to broadcast over `like` `[B, ...]`."""
        ab = self.alphas_cumprod.to(like.device, like.dtype)[self.timestep_index(t).to(like.device)]
        shape = (-1, *[1] * (like.dim() - 1))
        return ab.sqrt().view(shape), (1 - ab).sqrt().view(shape)

    def training_pair(self, x0, t, noise):
        """Noisy input x_k and the v target for clean `x0` at times `t` `[B]`."""
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise, a * noise - s * x0

    def model_timestep(self, t):
        return self.timestep_index(t).float()

    def loss(self, model_out, target, t=None):
        return torch.mean((model_out.float() - target.float()) ** 2)
