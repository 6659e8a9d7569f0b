import pytest
import torch
from diffusers import CogVideoXDDIMScheduler

from ttt_video.config import DiffusionConfig
from ttt_video.diffusion import build_objective
from ttt_video.diffusion.vpred import VPrediction
from ttt_video.errors import UserError


def _scheduler(**kw):
    return CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing", **kw)


def _batch(objective, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = objective.sample_time(n, generator=g)
    x0 = torch.randn(n, 4, 5, 3, 3, generator=g)
    return x0, t, torch.randn(x0.shape, generator=g)


@pytest.mark.parametrize("from_file", [False, True])
def test_noisy_sample_and_target_match_diffusers(tmp_path, from_file):
    if from_file:  # CogVideoX-2B's shift and a non-default beta range, read from the pipeline's file
        ref = _scheduler(snr_shift_scale=3.0, beta_end=0.02)
        ref.save_pretrained(tmp_path / "scheduler")
        objective = build_objective(DiffusionConfig(objective="v-prediction", scheduler=str(tmp_path / "scheduler")))
    else:  # no file: CogVideoX-5B's values
        ref = _scheduler(snr_shift_scale=1.0)
        objective = build_objective(DiffusionConfig(objective="v-prediction"))
    assert isinstance(objective, VPrediction)
    torch.testing.assert_close(objective.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-12)
    x0, t, noise = _batch(objective)
    k = objective.model_timestep(t)
    assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= 999
    noisy, target = objective.training_pair(x0, t, noise)
    torch.testing.assert_close(noisy, ref.add_noise(x0, noise, k.long()), rtol=0, atol=1e-6)
    torch.testing.assert_close(target, ref.get_velocity(x0, noise, k.long()), rtol=0, atol=1e-6)


def test_times_are_uniform_integer_timesteps_and_t1_is_pure_noise():
    objective = VPrediction()
    k = objective.model_timestep(objective.sample_time(20000, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(k.long(), minlength=1000)
    assert counts.numel() == 1000 and counts.min() > 0 and abs(k.mean().item() - 499.5) < 6
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    noisy, target = objective.training_pair(x0, torch.ones(1), noise)
    assert objective.alphas_cumprod[-1] == 0 and torch.equal(noisy, noise) and torch.equal(target, -x0)


def test_loss_is_cogvideox_weighted_x0_loss_and_zero_for_a_perfect_prediction():
    objective = VPrediction()
    x0, t, noise = _batch(objective)
    noisy, v = objective.training_pair(x0, t, noise)
    assert objective.loss(v, v, t) == 0
    pred = v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    # CogVideoX fine-tuning: x0 from the v prediction, squared error weighted by 1 / (1 - ab), mean per item
    ref = _scheduler(snr_shift_scale=1.0)
    k = objective.model_timestep(t).long()
    x0_pred = ref.get_velocity(pred, noisy, k)  # sqrt(ab) x_k - sqrt(1 - ab) v = x0
    weights = (1 / (1 - ref.alphas_cumprod[k])).float().view(-1, 1, 1, 1, 1)
    expected = (weights * (x0_pred - x0) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(objective.loss(pred, v, t), expected, rtol=1e-4, atol=0)


def test_scheduler_config_errors(tmp_path):
    with pytest.raises(UserError, match="scheduler config not found"):
        build_objective(DiffusionConfig(objective="v-prediction", scheduler=str(tmp_path)))
    CogVideoXDDIMScheduler(prediction_type="epsilon").save_pretrained(tmp_path)
    with pytest.raises(UserError, match="prediction_type is 'epsilon'"):
        build_objective(DiffusionConfig(objective="v-prediction", scheduler=str(tmp_path)))
