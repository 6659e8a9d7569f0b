import torch

from ttt_video.diffusion.flow import FlowMatching, guidance_schedule, sample_euler


def test_exact_velocity_integrates_back_to_the_data():
    fm = FlowMatching()
    x0 = torch.randn(2, 3, 4, 5, 5)
    noise = torch.randn_like(x0)
    xt, target = fm.training_pair(x0, torch.tensor([0.3, 0.9]), noise)
    torch.testing.assert_close(xt[0], 0.7 * x0[0] + 0.3 * noise[0])
    torch.testing.assert_close(target, noise - x0)
    # On the straight path the true velocity is constant, so Euler lands exactly on x0.
    out = sample_euler(lambda x, t, c: noise - x0[: x.shape[0]], noise, (torch.zeros(2),), (torch.zeros(2),),
                       steps=7, guidance_scale=1.0, shift=3.0, progress=False)
    torch.testing.assert_close(out, x0)


def test_guidance_mixes_conditional_and_unconditional():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return c.view(-1, 1).expand_as(x)

    x = torch.zeros(1, 4)
    out = sample_euler(model, x, (torch.ones(1),), (torch.zeros(1),), steps=1, guidance_scale=3.0, progress=False)
    assert calls == [2]  # one batched call for both branches
    torch.testing.assert_close(out, torch.full((1, 4), -3.0))  # dt = -1, v = 0 + 3 * (1 - 0)


def test_guidance_schedule_is_indexed_by_step():
    assert guidance_schedule(5.0, 3) == [5.0] * 3
    assert guidance_schedule(5.0, 3, "linear") == [5.0, 3.0, 1.0]
    assert 0 < FlowMatching().sample_time(1000).min() and FlowMatching().sample_time(1000).max() < 1
