"""Rectified-flow (flow-matching) objective and its Euler sampler with classifier-free guidance.

x_t = (1 - t) x_0 + t * noise, t in [0, 1]; the model predicts the velocity noise - x_0 and is
called with timestep 1000 t. Latents `[B, C, F, h, w]`.
"""

import torch
from tqdm.auto import tqdm


def shift_time(t, shift):
    """Spend more steps at high noise for shift > 1 (as in SD3's resolution shift)."""
    return shift * t / (1 + (shift - 1) * t)


class FlowMatching:
    def __init__(self, timestep_shift=1.0):
        self.shift = timestep_shift

    @classmethod
    def from_config(cls, diffusion_cfg):
        return cls(diffusion_cfg.timestep_shift)

    def sample_time(self, batch, generator=None, device=None):
        """Logit-normal times: most weight in the middle of the path."""
        u = torch.randn(batch, generator=generator, device=device)
        return shift_time(torch.sigmoid(u), self.shift)

    def training_pair(self, x0, t, noise):
        """Noisy input and velocity target for clean `x0` at times `t` `[B]`."""
        tt = t.view(-1, *[1] * (x0.dim() - 1))
        return (1 - tt) * x0 + tt * noise, noise - x0

    def model_timestep(self, t):
        return t * 1000

    def loss(self, model_out, target, t=None):
        return torch.mean((model_out.float() - target.float()) ** 2)


def guidance_schedule(scale, steps, kind="constant"):
    """Guidance scale per sampler *step* (index), never per timestep value."""
    if kind == "constant":
        return [float(scale)] * steps
    if kind == "linear":  # strong early, fading to 1 at the end
        return [1.0 + (scale - 1.0) * (1 - i / max(steps - 1, 1)) for i in range(steps)]
    raise ValueError(f"unknown guidance schedule {kind!r}; choose constant or linear")


@torch.no_grad()
def sample_euler(model_fn, noise, cond, uncond, steps=20, guidance_scale=4.0, shift=1.0, schedule="constant",
                 progress=True, known=None, known_frames=None):
    """Integrate from t=1 (noise) to t=0. `model_fn(x, timestep, text)` -> velocity;
    cond/uncond are the text inputs, each a tuple passed on after the timestep.
    `known` `[B, C, F, h, w]` with `known_frames` `[F]` bool: those frames are held on the
    straight path from their noise to the known clean frames, so the rest is sampled to fit them."""
    ts = shift_time(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    scales = guidance_schedule(guidance_scale, steps, schedule)

    def pin(x, t):
        if known is not None:
            x[:, :, known_frames] = ((1 - t) * known + t * noise)[:, :, known_frames]
        return x

    x = pin(noise.clone(), ts[0])
    B = x.shape[0]
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t = torch.full((B,), ts[i] * 1000.0, device=x.device)
        if scales[i] == 1.0:
            v = model_fn(x, t, *cond)
        else:
            both = [torch.cat([c, u]) for c, u in zip(cond, uncond)]
            v_c, v_u = model_fn(torch.cat([x, x]), torch.cat([t, t]), *both).chunk(2)
            v = v_u + scales[i] * (v_c - v_u)
        x = pin(x + (ts[i + 1] - ts[i]) * v, ts[i + 1])
    return x
