import dataclasses
import json

import pytest
import torch

from ttt_video.cli import main
from ttt_video.config import Config, apply_overrides
from ttt_video.errors import UserError
from ttt_video.models.cogvideox_ttt import CogVideoXTTTConfig
from ttt_video.presets import RTX4090_SECONDS, get_preset
from ttt_video.train import plan

from .test_trainer import TINY

DEEP = TINY + ["model.depth=3", "train.batch_size=4"]


def tiny(*overrides):
    return apply_overrides(Config(), DEEP + list(overrides))


def test_parse_memory():
    assert plan.parse_memory("24GB") == plan.parse_memory("24GiB") == plan.parse_memory("24") == 24 * 2**30
    assert plan.parse_memory("24000MB") == 24000 * 2**20 and plan.parse_memory("0.5TB") == 2**39
    for bad in ("lots", "24XB", "-3GB", "0"):
        with pytest.raises(UserError, match="--gpu-memory must be a size"):
            plan.parse_memory(bad)


def test_static_memory_follows_the_adapter_precision_and_ema():
    full = plan.estimate(tiny(), 1, False)
    weights, trainable, depth = plan.parameter_counts(tiny())
    assert (full.weights, full.optimizer, full.ema) == (weights, 8 * trainable, 0)
    assert weights == 4 * trainable and depth == 3
    for adapter in ("lora", "ttt-only"):
        small = plan.estimate(tiny(f"train.adapter={adapter}"), 1, False)
        assert small.weights >= full.weights and 0 < small.optimizer < full.optimizer / 2
    extras = plan.estimate(tiny("train.ema_decay=0.99"), 1, False)
    assert extras.ema == 4 * trainable and extras.total == full.total + extras.ema
    lora, half = (plan.estimate(tiny("train.adapter=lora", "train.mixed_precision=bf16", *frozen), 1, False)
                  for frozen in ([], ["train.frozen_dtype=bfloat16"]))
    frozen = lora.weights - lora.optimizer // 2  # all but the trainable parameters' float32 weights
    assert frozen / 2 < half.weights - half.optimizer // 2 < frozen * 0.6
    with pytest.raises(UserError, match="frozen_dtype=bfloat16 needs train.mixed_precision"):
        plan.estimate(tiny("train.frozen_dtype=bfloat16"), 1, False)


def test_the_step_counts_the_gradients_where_they_are_live(tmp_path):
    """Every gradient is live at the end of backward, so the step's peak holds at least them; in a
    deep checkpointed model the blocks' saved inputs are freed as the gradients land, so a block adds
    the larger of the two to the peak, not their sum (the 9 s stage on CogVideoX-2B's dimensions)."""
    _, trainable, _ = plan.parameter_counts(tiny())
    assert plan.estimate(tiny(), 1, True).step >= 4 * trainable
    cfg = apply_overrides(get_preset("cogvideox-5b-ttt-9s"), [f"model.pretrained={_cogvideox_2b(tmp_path)}"])
    _, trainable, depth = plan.parameter_counts(cfg)
    saved = (37 * 1350 + 3 * 226) * 1920 * 2  # a block's input: 3 segments of 12 latent frames + 1, 30 x 45 patches
    grads = 4 * trainable / depth  # a block's gradients
    step = plan.step_model(cfg, True, depth)
    per_block = step(1, 3)[0] - step(1, 2)[0]
    assert grads < saved and abs(per_block - saved) < 0.01 * saved


def test_activations_grow_with_batch_and_shrink_with_checkpointing():
    cfg = tiny()
    rows, proposal = plan.plan(cfg, 2**30)
    by = {(r.batch_size, r.checkpointing): r for r in rows}
    assert sorted(by) == [(b, c) for b in (1, 2, 4) for c in (False, True)]
    for ckpt in (False, True):
        acts = [by[b, ckpt].step for b in (1, 2, 4)]
        assert 0 < acts[0] < acts[1] < acts[2]
    assert all(by[b, True].step < by[b, False].step for b in (1, 2, 4))
    assert proposal == by[4, False]  # everything fits in 1 GiB: the whole batch, no recompute
    tight = (by[1, True].total + min(by[1, False].total, by[2, True].total)) / 2 / plan.HEADROOM
    _, proposal = plan.plan(cfg, tight)
    assert (proposal.batch_size, proposal.checkpointing) == (1, True)
    assert plan.plan(cfg, 1000)[1] is None


def test_step_estimate_against_a_real_cpu_step(monkeypatch):
    """The same live-tensor count over real ops on the CPU (its attention takes the masked math
    path, which keeps the attention matrix; the TTT op keeps a little more than the kernels, and
    none of the kernels' backward scratch, so the estimate leaves that out here)."""
    cfg = tiny()
    monkeypatch.setattr(plan, "_ttt_backward_scratch", lambda *args: [])
    estimated = plan.estimate(cfg, 4, False).step
    model = plan.build_untrained(cfg, device="cpu")
    loss_of = plan.step_inputs(cfg, model, 4, device="cpu")
    tracker = plan._LiveBytes()
    for t in model.parameters():
        tracker.ignore(t)
    with tracker:
        loss_of(model).backward()
    assert 0.6 < estimated / tracker.peak < 1.2


def _cogvideox_2b(folder, **changes):
    config = {k: v for k, v in dataclasses.asdict(CogVideoXTTTConfig(**changes)).items()
              if k not in ("ttt", "ttt_mini_batch_size", "ttt_base_lr", "gate_init", "ttt_impl", "segment_frames")}
    (folder / "config.json").write_text(json.dumps(config))  # the defaults are CogVideoX-2B's dimensions
    return folder


def test_cogvideox_2b_presets_fit_24gb(tmp_path):
    _cogvideox_2b(tmp_path)
    for seconds in RTX4090_SECONDS:
        cfg = apply_overrides(get_preset(f"rtx4090-{seconds}s"), [f"model.pretrained={tmp_path}"])
        assert cfg.data.num_scenes * (cfg.data.frames_per_scene - cfg.data.segment_overlap) == 8 * seconds
        weights, trainable, depth = plan.parameter_counts(cfg)
        assert depth == 30 and 2.0e9 < trainable + (weights - 4 * trainable) / 2 < 2.3e9  # frozen in bf16
        assert trainable < 0.25e9 * 2
        proposal = plan.estimate(cfg, cfg.train.batch_size, cfg.train.grad_checkpointing)
        assert proposal.total < plan.HEADROOM * 24 * 2**30


def test_offloaded_block_inputs_move_to_host_memory_and_parts_lower_the_rest(tmp_path):
    """The 30 s stage on CogVideoX-2B's dimensions cut to 4 blocks: the blocks' inputs (bf16 under
    autocast, TTT's gates included) leave the GPU count for host memory, and recomputing each block
    part by part lowers what is left."""
    folder = _cogvideox_2b(tmp_path, num_layers=4)

    def stage(*overrides):
        return apply_overrides(get_preset("cogvideox-5b-ttt-30s"), [f"model.pretrained={folder}", *overrides])

    lean = plan.estimate(stage("train.checkpoint_parts=true"), 1, True)
    offload = plan.estimate(stage(), 1, True)  # the preset's setting
    whole = plan.estimate(stage("train.offload_checkpoints=false"), 1, True)
    tokens = 121 * 1350 + 10 * 226  # 10 segments of 12 latent frames + 1, 30 x 45 patches; 226 caption tokens each
    assert lean.host == offload.host == 4 * tokens * 1920 * 2 and whole.host == 0
    assert offload.step < whole.step - 2 * tokens * 1920 * 2
    assert lean.step < 0.5 * offload.step
    table = plan.format_plan(stage(), [lean], lean, 80 * 2**30)
    assert "on+parts+offload" in table and "host" in table


def test_part_wise_recompute_counts_the_results_kept_between_a_parts_runs(tmp_path, monkeypatch):
    """With `train.checkpoint_parts` the TTT op's results (output, inner-state checkpoints) are kept from
    a pass's run in its block's recompute for the pass's own recompute, and each segment's attention output
    and log-sum-exp for its part's (`ops.memo`): the step's peak holds one pass's worth and the block's
    attention outputs more (30 s on CogVideoX-2B's dimensions cut to 4 blocks)."""
    from ttt_video.ops import memo

    cfg = apply_overrides(get_preset("cogvideox-5b-ttt-30s"), [
        f"model.pretrained={_cogvideox_2b(tmp_path, num_layers=4)}", "train.checkpoint_parts=true"])
    kept = plan.estimate(cfg, 1, True).step
    monkeypatch.setattr(memo, "_in_backward", lambda: False)
    recomputed = plan.estimate(cfg, 1, True).step
    tokens, heads, dh = 121 * 1350 + 10 * 226, 30, 64
    groups = -(-tokens // (64 * plan.TTT_CHECKPOINT_GROUP))
    one_pass = tokens * heads * dh * 2 + groups * heads * (8 * dh * dh + 5 * dh) * 4  # bf16 output, fp32 states
    attention = 10 * (226 + 13 * 1350) * heads * (dh * 2 + 4)  # each segment's bf16 output, fp32 log-sum-exp
    assert one_pass + attention < kept - recomputed < 1.1 * (one_pass + attention)


def test_cogvideox_plans_compare_offload_and_parts_and_propose_the_least_recompute_that_fits(tmp_path):
    """The 9 s stage on CogVideoX-2B's dimensions cut to 4 blocks: plan compares whole blocks,
    offloaded inputs and part-wise recompute, each needing less memory than the one before, and
    proposes the fastest that fits."""
    cfg = apply_overrides(get_preset("cogvideox-5b-ttt-9s"), [f"model.pretrained={_cogvideox_2b(tmp_path, num_layers=4)}"])
    rows, proposal = plan.plan(cfg, 2**50)
    by = {r.recompute: r for r in rows}
    assert list(by) == list(plan.RECOMPUTE) and proposal is by[False, False, False]
    totals = [by[s].total for s in plan.RECOMPUTE]
    assert totals == sorted(totals, reverse=True) and by[True, True, True].host > 0 == by[True, False, False].host
    for fastest in plan.RECOMPUTE[1:]:
        budget = by[fastest].total / plan.HEADROOM * (1 + 1e-12)  # no less than the total through rounding
        assert plan.propose(rows, budget) is by[fastest]
    table = plan.format_plan(cfg, rows, by[True, False, True], 2**40)
    assert all(name in table for name in ("off", "on", "on+offload", "on+parts+offload"))
    assert ("--set train.grad_checkpointing=true --set train.checkpoint_parts=false "
            "--set train.offload_checkpoints=true") in table


def test_plan_command_prints_the_table_and_proposal(capsys):
    sets = [a for s in DEEP for a in ("--set", s)]
    assert main(["plan", *sets, "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "checkpointing" in out
    assert ("proposal: --set train.batch_size=4 --set train.grad_accum_steps=1 "
            "--set train.grad_checkpointing=false") in out


@pytest.mark.parametrize("args,msg", [
    (["plan", "--preset", "nope", "--gpu-memory", "24GB"], "unknown preset 'nope'"),
    (["plan", "--gpu-memory", "plenty"], "--gpu-memory must be a size"),
    (["plan", "--gpu-memory", "24GB", "--measure", "--device", "cpu"], "--measure reads the CUDA allocator's peak"),
])
def test_plan_user_errors(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_measured_peak_is_near_the_estimate(tmp_path, checkpointing):
    """rtx4090-3s on CogVideoX-2B's dimensions cut to two blocks (random weights), with the TTT
    kernels and layer kernels the plan models."""
    cfg = apply_overrides(get_preset("rtx4090-3s"), [f"model.pretrained={_cogvideox_2b(tmp_path, num_layers=2)}"])
    measured, _ = plan.measure(cfg, 1, checkpointing, "cuda")
    assert abs(plan.estimate(cfg, 1, checkpointing).total - measured) < 0.2 * measured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mlp,heads,length", [(True, 48, 2048), (True, 200, 1000), (False, 48, 2048)])
def test_ttt_stand_in_counts_what_the_kernels_backward_allocates(mlp, heads, length):
    """The memory the Triton TTT backward takes (its gradients and its scratch: recomputed states, the
    queries' results on two programs a chain at 48 chains and one at 200, the padding of 1,000 tokens
    to 1,008) is what the plan's stand-in counts (on an H100: 297.8 / 520.1 / 52.3 MB counted against
    300.8 / 522.1 / 52.7 MB allocated; the primal form's buffers at both MLP sizes)."""
    from ttt_video.ops import ttt_linear, ttt_mlp

    D, hidden = 64, 256 if mlp else 64

    def inputs(device):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.nn.functional.normalize(torch.randn(1, heads, length, D, generator=g), dim=-1)
                   for _ in range(3))
        eta = torch.full((1, heads, length), 0.01)
        shapes = [(D, hidden), (1, hidden), (hidden, D), (1, D)] if mlp else [(D, D), (1, D)]
        weights = [torch.randn(heads, *s, generator=g) * 0.02 for s in shapes]
        tokens = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, k, v, eta)]
        ln = [torch.ones(heads, D, device=device), torch.zeros(heads, D, device=device)]
        return tokens, [w.to(device).requires_grad_() for w in weights], ln

    tokens, weights, ln = inputs("cuda")
    out = (ttt_mlp if mlp else ttt_linear)(*tokens, *weights, *ln, impl="triton")
    grad = torch.randn_like(out)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out.backward(grad)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before

    tracker = plan._LiveBytes()  # everything made inside it, so views are not counted as new storage
    with tracker:
        tokens, weights, ln = inputs("meta")
        out = plan._ttt_scan(*tokens, *weights, *ln, mini_batch_size=64)
        grad = torch.empty_like(out)
        before = tracker.peak = tracker.live
        out.backward(grad)
    counted = tracker.peak - before
    assert abs(counted - measured) < 0.02 * measured, (counted, measured)
