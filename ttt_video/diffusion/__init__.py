"""Schedules, objectives and samplers; they know nothing of model internals.

An objective turns clean latents into one training example and scores the prediction:
`sample_time(n, generator)` -> times `[n]` in [0, 1] (1 = pure noise);
`training_pair(x0, t, noise)` -> (noisy input, target); `model_timestep(t)` -> the timestep the
model is called with; `loss(prediction, target, t)` -> scalar.
"""

from ..errors import UserError
from .edm import EDM
from .flow import FlowMatching
from .vpred import VPrediction

OBJECTIVES = {"flow": FlowMatching, "v-prediction": VPrediction, "edm": EDM}


def build_objective(diffusion_cfg):
    try:
        cls = OBJECTIVES[diffusion_cfg.objective]
    except KeyError:
        raise UserError(f"unknown diffusion objective {diffusion_cfg.objective!r}; "
                         f"available: {', '.join(OBJECTIVES)}") from None
    return cls.from_config(diffusion_cfg)
