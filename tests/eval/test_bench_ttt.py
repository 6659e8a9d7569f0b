from pathlib import Path

import pytest

from ttt_video.errors import UserError
from ttt_video.eval import bench_ttt
from ttt_video.eval.bench_ttt import (HEADER, _Rows, _ttt_fn, _ttt_inputs, attention_flops, format_table, kernels_at,
                                      ttt_flops)


def test_flop_counts_match_the_documented_formulas():
    assert ttt_flops("mlp", 64, 1, 64, 64) == 14 * 64 * 64 * 256 + 4 * 64 * 64 * 256 + 4 * 64 * 64 * 64  # 19.9 M
    assert ttt_flops("linear", 64, 1, 64, 64) == 6 * 64 * 64 * 64 + 4 * 64 * 64 * 64
    assert attention_flops(1, 1, 64) == 4 * 18008**2 * 64


def test_rows_are_reported_as_they_are_measured():
    seen = []
    rows = _Rows(seen.append)
    row = dict(seconds=3, T=16722, op="ttt-mlp", impl="triton", mode="fwd", ms=16.5, tflops=30.2, ratio=1.79)
    rows.append(row)
    rows.append(dict(row, impl="torch", ms=None, tflops=None, ratio=None, skipped=12.5))
    assert seen == list(rows)
    lines = format_table(rows).splitlines()
    assert lines[0] == HEADER and "16.50" in lines[1] and "1.790" in lines[1] and "skipped (est. 12.5 s)" in lines[2]


def test_kernels_of_a_git_revision_load_as_a_module_of_their_own():
    root = Path(bench_ttt.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("the package does not run from a git checkout")
    module = kernels_at("HEAD")
    assert module.__name__ == "ttt_kernels_HEAD.ttt.triton" and callable(module.ttt_mlp) and callable(module.ttt_linear)
    assert module.mlp_backward_scratch.__module__ == "ttt_kernels_HEAD.ttt.buffers"  # that revision's sibling module
    assert module.memo.__name__ == "ttt_kernels_HEAD.memo"  # and a module of the folder above
    with pytest.raises(UserError, match="--against no-such-rev: no ttt_video/ops/ttt/triton.py at that revision"):
        kernels_at("no-such-rev")


def test_kernels_of_a_revision_without_git_is_a_user_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="--against HEAD: git could not run"):
        kernels_at("HEAD")


def test_modes_run_the_forward_without_and_with_gradients_and_the_backward(monkeypatch):
    """`fwd` runs without autograd, `fwd-train` with inputs that need gradients (as a training step's
    forward, where the kernels store checkpoints) and no backward, `fwd+bwd` both passes."""
    from ttt_video import ops

    seen = []
    real = ops.ttt_mlp

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.grad_fn is not None)
        return out

    monkeypatch.setattr(ops, "ttt_mlp", spy)
    for mode in ("fwd", "fwd-train", "fwd+bwd"):
        args = _ttt_inputs("mlp", 32, 1, 16, "cpu")
        run = _ttt_fn("mlp", "torch", args, 16, mode)
        grads = []
        if args[0].requires_grad:
            args[0].register_hook(grads.append)
        run()
        seen.append(len(grads))
    assert seen == [False, 0, True, 0, True, 1]
