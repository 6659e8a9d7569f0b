"""Benchmark TTT-MLP / TTT-Linear against local SDPA attention at CogVideoX-5B video lengths.

Workload per 3 s segment: 13 latent frames x 30 x 45 patches plus text give 18,008 attention
tokens per segment; TTT runs over T = 351,168 tokens at 63 s (21 segments) and proportionally
fewer for shorter videos (about 16,722 per segment). TTT runs both
directions (forward and reversed sequence) as one call with the two directions stacked on the
batch dim; attention runs `scaled_dot_product_attention` over `[segments, heads, 18008, head_dim]`.

FLOPs counted (matrix products only, per chain and mini-batch of b tokens, hidden F = 4D):
TTT-MLP forward 14 b D F + 4 b^2 F + 4 b^2 D, TTT-Linear forward 6 b D^2 + 4 b^2 D, attention
forward 4 S^2 D per segment and head; forward+backward counts 3x the TTT forward (no recompute)
and 3.5x the attention forward.

`--against REV` also times the Triton kernels as of git revision REV of this checkout (impl
`@REV`), loaded beside the current ones: a same-process comparison of two kernel versions.
`--train-forward` adds a TTT row `fwd-train`: the forward as a training step runs it (its inputs
need gradients, so the kernels store the inner state every 16 mini-batches), without the backward.
"""

import atexit
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ArgumentParser, UserError

TTT_TOKENS_63S = 351_168
SEGMENTS_63S = 21
ATTN_TOKENS_PER_SEGMENT = 18_008
SECONDS_PER_SEGMENT = 3


def ttt_flops(op, T, chains, head_dim, mini_batch_size):
    """Forward matrix-product FLOPs of one TTT call over `chains` (batch x heads) sequences."""
    b, d = mini_batch_size, head_dim
    full, tail = divmod(T, b)
    sizes = [b] * full + ([tail] if tail else [])
    if op == "mlp":
        f = 4 * d
        per = sum(14 * s * d * f + 4 * s * s * f + 4 * s * s * d for s in sizes)
    else:
        per = sum(6 * s * d * d + 4 * s * s * d for s in sizes)
    return chains * per


def attention_flops(segments, heads, head_dim):
    return 4 * segments * heads * ATTN_TOKENS_PER_SEGMENT**2 * head_dim


def _time_ms(fn, budget_ms=1500.0, max_reps=50):
    """Median of CUDA-event timings after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    total = 0.0
    while len(times) < 3 or (total < budget_ms and len(times) < max_reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        total += times[-1]
    return statistics.median(times)


def _ttt_inputs(op, T, heads, head_dim, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    q, k, v = (r(2, heads, T, head_dim, dtype=torch.bfloat16) for _ in range(3))  # both directions
    eta = (torch.rand(2, heads, T, generator=g, device=device) * 0.02).to(torch.bfloat16)
    d, f = head_dim, 4 * head_dim
    if op == "mlp":
        weights = [r(heads, d, f, scale=0.02), r(heads, 1, f, scale=0.02), r(heads, f, d, scale=0.02),
                   r(heads, 1, d, scale=0.02)]
    else:
        weights = [r(heads, d, d, scale=0.02), r(heads, 1, d, scale=0.02)]
    return [q, k, v, eta, *weights, 1 + r(heads, d, scale=0.1), r(heads, d, scale=0.1)]


KERNELS = "ttt_video/ops/ttt/triton.py"


def kernels_at(rev):
    """The Triton kernel module (`KERNELS`) as of git revision `rev` of the checkout this package
    runs from, loaded as a module of its own beside the current one, in a package of its own that
    holds that revision's other modules of the folder and of the folder above (what its relative
    imports take): `<package>.ttt.triton`."""
    root = Path(__file__).resolve().parents[2]

    def show(path):
        return subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True, text=True)

    try:
        git = show(KERNELS)
    except OSError as e:
        raise UserError(f"--against {rev}: git could not run ({e})") from e
    if git.returncode:
        raise UserError(f"--against {rev}: no {KERNELS} at that revision of {root} "
                        f"({git.stderr.strip().splitlines()[-1] if git.stderr.strip() else 'git failed'})")
    folder = tempfile.mkdtemp(prefix="ttt-kernels-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # Triton reads the source until it compiles
    package = f"ttt_kernels_{''.join(c if c.isalnum() else '_' for c in rev)}"
    kernels = Path(KERNELS).parent
    for name, source in ((package, kernels.parent), (f"{package}.ttt", kernels)):
        home = Path(folder, *name.split("."))
        home.mkdir()
        (home / "__init__.py").write_text("")
        for path in subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", rev, f"{source}/"],
                                   capture_output=True, text=True).stdout.split():
            if path.endswith(".py") and not path.endswith("__init__.py"):
                (home / Path(path).name).write_text(git.stdout if path == KERNELS else show(path).stdout)
        spec = importlib.util.spec_from_file_location(name, home / "__init__.py", submodule_search_locations=[str(home)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
    spec = importlib.util.spec_from_file_location(f"{package}.ttt.triton", home / "triton.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _ttt_fn(op, impl, args, mini_batch_size, mode):
    """`impl`: "triton" or "torch" through the ops' dispatch, or a kernel module (`kernels_at`); `mode`:
    "fwd" (no gradients), "fwd-train" (inputs needing gradients, no backward) or "fwd+bwd"."""
    from ttt_video import ops

    if isinstance(impl, str):
        fn, kwargs = getattr(ops, f"ttt_{op}"), dict(mini_batch_size=mini_batch_size, impl=impl)
    else:
        fn, kwargs = getattr(impl, f"ttt_{op}"), dict(mini_batch_size=mini_batch_size)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*args, **kwargs)
        return run
    leaves = [a.requires_grad_() for a in args]
    if mode == "fwd-train":
        def run():
            fn(*leaves, **kwargs)
        return run
    grad = torch.randn_like(args[0])

    def run():
        out = fn(*leaves, **kwargs)
        torch.autograd.grad(out, leaves, grad)
    return run


def _attn_fn(segments, heads, head_dim, device, backward):
    q, k, v = (torch.randn(segments, heads, ATTN_TOKENS_PER_SEGMENT, head_dim, device=device,
                           dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    if not backward:
        def run():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)
        return run
    grad = torch.randn_like(q)

    def run():
        out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)
    return run


def run(seconds=(3, 18, 63), heads=48, head_dim=64, mini_batch_size=64, impls=("triton", "torch"), device="cuda",
        max_estimate_s=2.0, on_row=None, against=None, train_forward=False):
    """Time every (length, op, impl, mode); rows carry ms, TFLOP/s and the ratio to attention (its
    forward for `fwd-train`, the TTT forward of a training step, timed with `train_forward`).
    `against`: {impl name: kernel module (`kernels_at`)} timed beside `impls`.

    A torch-path case whose time, extrapolated from the previous length, exceeds `max_estimate_s`
    per call is skipped and reported with that estimate. `on_row(row)` sees each row as it is done.
    """
    rows = _Rows(on_row)
    kernels = {**{name: name for name in impls}, **(against or {})}
    last = {}
    for sec in seconds:
        segments = max(1, round(sec / SECONDS_PER_SEGMENT))
        T = round(TTT_TOKENS_63S * segments / SEGMENTS_63S)
        attn = {}
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            ms = _time_ms(_attn_fn(segments, heads, head_dim, device, backward))
            flops = attention_flops(segments, heads, head_dim) * (3.5 if backward else 1.0)
            attn[mode] = ms
            rows.append(dict(seconds=sec, T=T, op="attention", impl="sdpa", mode=mode, ms=ms,
                             tflops=flops / ms / 1e9, ratio=1.0))
            torch.cuda.empty_cache()
        for op in ("mlp", "linear"):
            for impl, kernel in kernels.items():
                for mode in ("fwd", "fwd-train", "fwd+bwd") if train_forward else ("fwd", "fwd+bwd"):
                    key = (op, impl, mode)
                    row = dict(seconds=sec, T=T, op=f"ttt-{op}", impl=impl, mode=mode)
                    prev = last.get(key)
                    estimate = None if prev is None else prev[1] * T / prev[0] / 1e3
                    if impl == "torch" and estimate is not None and estimate > max_estimate_s:
                        rows.append(dict(row, ms=None, tflops=None, ratio=None, skipped=estimate))
                        continue
                    args = _ttt_inputs(op, T, heads, head_dim, device)
                    ms = _time_ms(_ttt_fn(op, kernel, args, mini_batch_size, mode),
                                  budget_ms=300.0 if impl == "torch" else 1500.0)
                    del args
                    torch.cuda.empty_cache()
                    flops = ttt_flops(op, T, 2 * heads, head_dim, mini_batch_size) * (3.0 if mode == "fwd+bwd" else 1.0)
                    last[key] = (T, ms)
                    ratio = ms / attn["fwd" if mode == "fwd-train" else mode]
                    rows.append(dict(row, ms=ms, tflops=flops / ms / 1e9, ratio=ratio))
    return rows


class _Rows(list):
    def __init__(self, on_row):
        super().__init__()
        self.on_row = on_row

    def append(self, row):
        super().append(row)
        if self.on_row is not None:
            self.on_row(row)


HEADER = f"{'len':>4} {'T':>8} {'op':<11} {'impl':<7} {'mode':<9} {'ms':>10} {'TFLOP/s':>8} {'x attn':>7}"


def format_row(r):
    head = f"{r['seconds']:>3}s {r['T']:>8} {r['op']:<11} {r['impl']:<7} {r['mode']:<9}"
    if r.get("skipped") is not None:
        return f"{head} skipped (est. {r['skipped']:.1f} s)"
    return f"{head} {r['ms']:>10.2f} {r['tflops']:>8.1f} {r['ratio']:>7.3f}"


def format_table(rows):
    return "\n".join([HEADER, *map(format_row, rows)])


def main(argv=None):
    p = ArgumentParser(prog="ttt-video bench ttt", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, nargs="+", default=[3, 18, 63], help="video lengths (multiples of 3)")
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--mini-batch-size", type=int, default=64)
    p.add_argument("--impls", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    p.add_argument("--max-estimate-s", type=float, default=2.0,
                   help="skip a torch-path case whose extrapolated time per call exceeds this")
    p.add_argument("--against", nargs="+", default=[], metavar="REV",
                   help="also time the Triton kernels of these git revisions of this checkout (impl @REV)")
    p.add_argument("--train-forward", action="store_true",
                   help="also time the TTT forward as a training step runs it (checkpoints stored, no backward)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.exit(2, "ttt-video bench ttt: needs a CUDA device\n")
    if any(s % SECONDS_PER_SEGMENT for s in args.seconds):
        p.exit(2, f"ttt-video bench ttt: --seconds must be multiples of {SECONDS_PER_SEGMENT}\n")
    try:
        against = {f"@{rev}": kernels_at(rev) for rev in args.against}
    except UserError as e:
        p.exit(2, f"ttt-video bench ttt: {e}\n")
    print(f"device: {torch.cuda.get_device_name()}, heads {args.heads} x {args.head_dim}, "
          f"mini-batch {args.mini_batch_size}, TTT both directions in one call, bf16")
    print(HEADER, flush=True)
    run(tuple(args.seconds), args.heads, args.head_dim, args.mini_batch_size, tuple(args.impls),
        max_estimate_s=args.max_estimate_s, on_row=lambda row: print(format_row(row), flush=True), against=against,
        train_forward=args.train_forward)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
