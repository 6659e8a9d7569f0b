"""CogVideoX-5B with and without TTT on one GPU: random weights, bf16, one run, ratios.

Rows (B = 1 unless stated, `--batch` for the long-video rows; 480x720, 13 latent frames per 3 s
segment, 226 text tokens each):
- 3 s forward: this package's CogVideoX (TTT off) against diffusers' `CogVideoXTransformer3DModel`
  called the way `CogVideoXPipeline` calls it (its 3D RoPE tables precomputed once, as there).
- 3 s sampling step with guidance (batch 2, conditional and unconditional): both models, and
  50 such steps; the scheduler's arithmetic is not timed (microseconds against seconds).
- 63 s (21 segments, 253 latent frames) forward and forward+backward (gradient checkpointing,
  the training setting) of `--layers` blocks: TTT off, TTT-Linear, TTT-MLP. Every block costs
  the same, so the ratios hold for the 42-block model; its time is the per-block time x 42
  (printed beside it). Each block's checkpointed input is 351,168 tokens x 3072 x 2 bytes =
  2.2 GB at 63 s, and recomputing one block holds ~50 GB (TTT off) to ~100 GB (TTT on) of
  activations: `--offload` and `--checkpoint-parts` time the training step as the long-video
  presets run it (`train.offload_checkpoints` from 30 s, `train.checkpoint_parts` at 63 s).
Peak memory is `torch.cuda.max_memory_allocated` of each row; a row that runs out of memory is
reported as such. `--profile` adds, under each long-video row, one more run's GPU time by kernel kind
(`KERNEL_KINDS`) and its `TOP_KERNELS` longest kernels by name (the JSON has every kernel name over
0.5 ms): where the TTT layer's extra time goes. The TTT-MLP backward's two kernels run side by
side on two streams, so a row's kernel times can add up to more than its time.
"""

import json
import statistics
import time

import torch

from ..errors import ArgumentParser, check_positive
from ..models.cogvideox_ttt import CogVideoXTTT, CogVideoXTTTConfig

COGVIDEOX_5B = dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
LATENT_H, LATENT_W, TEXT_LEN, FRAMES_PER_SEGMENT = 60, 90, 226, 13
DEPTH_5B = 42


def _time_s(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


KERNEL_KINDS = (  # (kind, substrings of the kernel's name, lower case), first match wins; the rest is "other"
    ("ttt-mlp kernels", ("_mlp_",)),
    ("ttt-linear kernels", ("_linear_",)),
    ("ttt layer kernels", ("_inputs_", "_merge_")),
    ("attention", ("sdpa", "flash", "fmha")),
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass")),
    ("layer norms", ("layer_norm", "gammabeta", "_modulated_")),
    ("host copies", ("memcpy htod", "memcpy dtoh")),
)


TOP_KERNELS = 10  # kernel names printed under a profiled row


def kernel_kind(name):
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in low for key in keys)), "other")


def kernel_ms(fn):
    """GPU time of one run of fn in ms: by kernel kind, largest first; and by kernel name (cut at 100
    characters) where a name took at least 0.5 ms, largest first, as [kind, ms, launches]."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds, names = {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kind, ms = kernel_kind(e.name), e.device_time / 1e3
            kinds[kind] = kinds.get(kind, 0.0) + ms
            entry = names.setdefault(e.name[:100], [kind, 0.0, 0])
            entry[1] += ms
            entry[2] += 1
    names = {name: entry for name, entry in sorted(names.items(), key=lambda kv: -kv[1][1]) if entry[1] >= 0.5}
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1])), names


def _peak_gb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def ours(ttt, layers, device):
    with torch.device(device):
        model = CogVideoXTTT(CogVideoXTTTConfig(**{**COGVIDEOX_5B, "num_layers": layers}, ttt=ttt))
    return model.to(torch.bfloat16).eval()


def diffusers_model(layers, device):
    from diffusers import CogVideoXTransformer3DModel

    with torch.device(device):
        model = CogVideoXTransformer3DModel(**{**COGVIDEOX_5B, "num_layers": layers})
    return model.to(torch.bfloat16).eval()


def pipeline_rope(frames, device):
    """The RoPE tables as diffusers' CogVideoXPipeline builds them at 480x720."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    gh, gw = LATENT_H // 2, LATENT_W // 2
    crops = get_resize_crop_region_for_grid((gh, gw), gw, gh)
    return tuple(t.to(device) for t in get_3d_rotary_pos_embed(64, crops, (gh, gw), frames))


def inputs(segments, batch, device):
    frames = segments * (FRAMES_PER_SEGMENT - 1) + 1
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, frames, 16, LATENT_H, LATENT_W, device=device, generator=g, dtype=torch.bfloat16)
    text = torch.randn(batch, segments, TEXT_LEN, 4096, device=device, generator=g, dtype=torch.bfloat16)
    return x, (text[:, 0] if segments == 1 else text), torch.full((batch,), 500.0, device=device)


def report(rows, name, row):
    rows[name] = row
    extra = "".join(f"  {k} {v:.2f}" for k, v in row.items()
                    if k not in ("s", "oom", "kernels_ms", "kernel_names_ms"))
    print(f"{name:<52} " + ("out of memory" if row.get("oom") else f"{row['s'] * 1000:>10.1f} ms") + extra, flush=True)
    for kind, ms in row.get("kernels_ms", {}).items():
        print(f"    {kind:<48} {ms:>10.1f} ms", flush=True)
    for name, (kind, ms, launches) in list(row.get("kernel_names_ms", {}).items())[:TOP_KERNELS]:
        print(f"      {ms:>8.1f} ms {launches:>5}x  [{kind}] {name[:70]}", flush=True)


def short_rows(reps, device, sampling_steps):
    rows = {}
    x, text, t = inputs(1, 1, device)
    x2, text2, t2 = inputs(1, 2, device)
    rope = pipeline_rope(FRAMES_PER_SEGMENT, device)
    makers = {"diffusers": lambda: diffusers_model(DEPTH_5B, device), "ours": lambda: ours(None, DEPTH_5B, device)}
    for name, make in makers.items():
        model = make()
        if name == "diffusers":
            def fwd(x, text, t):
                return model(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                             return_dict=False)[0]
        else:
            def fwd(x, text, t):
                return model(x, text, t)
        with torch.no_grad():
            report(rows, f"3s forward, {name}", {"s": _time_s(lambda: fwd(x, text, t), reps),
                                                 "peak_gb": _peak_gb(lambda: fwd(x, text, t))})
            step = _time_s(lambda: fwd(x2, text2, t2), reps)
            report(rows, f"3s sampling step (batch 2), {name}", {"s": step})
            report(rows, f"3s {sampling_steps}-step sampling, {name}", {"s": step * sampling_steps})
        model = None  # free it before the next one is built
        torch.cuda.empty_cache()
    return rows


def train_row(model, x, text, t, reps, layers, parts=False, offload=False, profile=False):
    """A training step with gradient checkpointing per block: time, peak memory (and kernel times), or out
    of memory."""
    model.train().enable_gradient_checkpointing(parts=parts, offload=offload)

    def train_step():
        model(x, text, t).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    try:
        both = _time_s(train_step, max(1, reps - 1))
        row = {"s": both, "peak_gb": _peak_gb(train_step), "s_42_blocks": both / layers * DEPTH_5B}
        if profile:
            row["kernels_ms"], row["kernel_names_ms"] = kernel_ms(train_step)
        return row
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return {"s": float("nan"), "oom": True}


def long_label(segments, batch):
    return f"{segments * 3}s" + (f" batch {batch}" if batch > 1 else "")


def long_rows(layers, reps, device, segments, forward_only=False, parts=False, offload=False, batch=1,
              profile=False):
    rows = {}
    x, text, t = inputs(segments, batch, device)
    length = long_label(segments, batch)
    for ttt in (None, "linear", "mlp"):
        name = f"ttt-{ttt}" if ttt else "ttt off"
        model = ours(ttt, layers, device)
        with torch.no_grad():
            fwd = _time_s(lambda: model(x, text, t), reps)
            row = {"s": fwd, "peak_gb": _peak_gb(lambda: model(x, text, t)), "s_42_blocks": fwd / layers * DEPTH_5B}
            if profile:
                row["kernels_ms"], row["kernel_names_ms"] = kernel_ms(lambda: model(x, text, t))
            report(rows, f"{length} forward, {layers} blocks, {name}", row)
        if not forward_only:
            report(rows, f"{length} forward+backward, {layers} blocks, {name}",
                   train_row(model, x, text, t, reps, layers, parts, offload, profile))
        model = None  # free it before the next one is built
        torch.cuda.empty_cache()
    return rows


def ratios(rows, segments, layers, sampling_steps, batch=1):
    out = {}
    if "3s forward, ours" in rows:
        out["3s forward: ours / diffusers (target <= 1.1)"] = \
            rows["3s forward, ours"]["s"] / rows["3s forward, diffusers"]["s"]
        sampling = f"3s {sampling_steps}-step sampling"
        out[f"{sampling}: ours / diffusers"] = rows[f"{sampling}, ours"]["s"] / rows[f"{sampling}, diffusers"]["s"]
    s = long_label(segments, batch)
    for kind, target in (("forward", 1.3), ("forward+backward", 1.6)):
        if f"{s} {kind}, {layers} blocks, ttt off" not in rows:
            continue
        off = rows[f"{s} {kind}, {layers} blocks, ttt off"]["s"]
        for ttt in ("linear", "mlp"):
            out[f"{s} {kind}: ttt-{ttt} / ttt off (target <= {target})"] = \
                rows[f"{s} {kind}, {layers} blocks, ttt-{ttt}"]["s"] / off
    return out


def main(argv=None):
    p = ArgumentParser(prog="ttt-video bench cogvideox", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="blocks in the long-video rows (every block costs the same)")
    p.add_argument("--segments", type=int, default=21, help="3 s segments in the long-video rows (21: 63 s)")
    p.add_argument("--batch", type=int, default=1,
                   help="videos in the long-video rows (2: a guided sampling step, conditional and unconditional)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--skip-diffusers", action="store_true", help="only the long-video rows")
    p.add_argument("--forward-only", action="store_true", help="no forward+backward rows")
    p.add_argument("--checkpoint-parts", action="store_true",
                   help="forward+backward rows recompute each block part by part (train.checkpoint_parts)")
    p.add_argument("--offload", action="store_true",
                   help="forward+backward rows keep the blocks' inputs in host memory (train.offload_checkpoints)")
    p.add_argument("--profile", action="store_true",
                   help="also print each long-video row's GPU time by kernel kind (one more run each)")
    p.add_argument("--json", default=None, help="also write the rows and ratios to this file")
    a = p.parse_args(argv)
    check_positive(a, "layers", "segments", "batch", "reps", "sampling_steps")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    device = "cuda"
    training = "".join(f", {flag}" for flag, on in (("--checkpoint-parts", a.checkpoint_parts),
                                                     ("--offload", a.offload)) if on)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, random weights{training}")
    rows = {} if a.skip_diffusers else short_rows(a.reps, device, a.sampling_steps)
    rows.update(long_rows(a.layers, a.reps, device, a.segments, a.forward_only, a.checkpoint_parts, a.offload,
                          a.batch, a.profile))
    result = {"rows": rows, "ratios": ratios(rows, a.segments, a.layers, a.sampling_steps, a.batch)}
    for name, v in result["ratios"].items():
        print(f"{name:<60} {v:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
