"""Check data-parallel training against one device: the same preset at the same global batch for
the same steps on one GPU, with DDP on N GPUs and with FSDP on N GPUs (the Accelerate configs in
`configs/accelerate/`), then a table of the loss at every step, the largest loss difference from
the one-device run, seconds per step, samples per second, speed-up, scaling efficiency
(speed-up / N) and peak memory.

Each item's noise, time and caption dropout are seeded by its index (train/trainer.py), so the
runs see the same numbers and their losses differ only by floating-point reduction order:
expect differences around 1e-5 in float32, more with bf16 autocast.

    ttt-video bench parallel --preset shapes-tiny --steps 20 --global-batch 8 \
        --text-cache .cache/shapes-text.safetensors

`--device cpu` runs the one-device and DDP runs on CPU processes (gloo); Accelerate runs FSDP on
GPUs only, so there it is skipped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import ArgumentParser, UserError, check_positive
from ..train.trainer import resolve_device

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
MODES = ("single", "ddp", "fsdp")


def run_command(mode, args, out):
    """The command line of one run: `python -m ttt_video.cli train`, through `accelerate launch` for DDP/FSDP."""
    per_process = args.global_batch if mode == "single" else args.global_batch // args.num_processes
    sets = [*args.set, f"train.batch_size={per_process}", "train.grad_accum_steps=1",
            f"train.max_steps={args.steps}", "train.log_every=1", f"train.save_every={args.steps}",
            "train.tensorboard=false", "train.validate_every=0", f"train.device={args.device}"]
    train = ["-m", "ttt_video.cli", "train", "--preset", args.preset, *[a for s in sets for a in ("--set", s)],
             "--output-dir", str(out), "--no-progress"]
    if args.text_cache:
        train += ["--text-cache", args.text_cache]
    if mode == "single":
        return [sys.executable, *train]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(args.config_dir / f"{mode}.yaml"),
            "--num_processes", str(args.num_processes), *train]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "loss.jsonl").read_text().splitlines()]


def summarise(logs, num_processes):
    """{mode: summary} from each mode's loss.jsonl records; timings skip the first (warm-up) step."""
    base = logs["single"]
    rows = {}
    for mode, recs in logs.items():
        steps = len(recs)
        per_step = (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]) / max(1, steps - 1)
        rows[mode] = {"losses": [r["loss"] for r in recs], "seconds_per_step": per_step,
                      "samples_per_s": sum(r["samples_per_s"] for r in recs[1:]) / max(1, steps - 1),
                      "peak_memory_gb": max(r["peak_memory_gb"] for r in recs),
                      "max_abs_loss_diff": max(abs(r["loss"] - b["loss"]) for r, b in zip(recs, base))}
    one = rows["single"]["seconds_per_step"]
    for mode, row in rows.items():
        row["speedup"] = one / row["seconds_per_step"] if row["seconds_per_step"] else float("nan")
        row["efficiency"] = row["speedup"] / (1 if mode == "single" else num_processes)
    return rows


def format_table(rows, num_processes):
    modes = list(rows)
    names = {"single": "1 device", "ddp": f"DDP x{num_processes}", "fsdp": f"FSDP x{num_processes}"}
    lines = ["step  " + "  ".join(f"{names[m]:>12}" for m in modes)]
    for i in range(len(rows["single"]["losses"])):
        lines.append(f"{i + 1:>4}  " + "  ".join(f"{rows[m]['losses'][i]:>12.6f}" for m in modes))
    lines.append("")
    lines.append(f"{'run':<10}{'max |dloss|':>12}{'s/step':>10}{'samples/s':>11}{'speed-up':>10}"
                 f"{'efficiency':>12}{'peak GB':>9}")
    for m in modes:
        r = rows[m]
        lines.append(f"{names[m]:<10}{r['max_abs_loss_diff']:>12.2e}{r['seconds_per_step']:>10.4f}"
                     f"{r['samples_per_s']:>11.1f}{r['speedup']:>10.2f}{r['efficiency']:>12.0%}"
                     f"{r['peak_memory_gb']:>9.3f}")
    return "\n".join(lines)


def main(argv=None):
    p = ArgumentParser(prog="ttt-video bench parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="shapes-tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=8, help="items per step, split over the processes")
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto (CUDA when present) or cpu")
    p.add_argument("--text-cache", help="precomputed caption embeddings (`ttt-video cache-text`)")
    p.add_argument("--config-dir", type=Path, default=CONFIG_DIR,
                   help="folder with ddp.yaml and fsdp.yaml (default: the repository's configs/accelerate)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated, from {', '.join(MODES)} (the one-device run always runs)")
    p.add_argument("--out", type=Path, default=Path("runs/parallel-check"))
    p.add_argument("--json", help="also write the summary to this file")
    args = p.parse_args(argv)
    check_positive(args, "global_batch", "num_processes")
    resolve_device(args.device, "--device")  # the runs' train.device, checked before any starts
    if args.global_batch % args.num_processes:
        raise UserError(f"--global-batch {args.global_batch} does not split over {args.num_processes} processes")
    if args.steps < 2:
        raise UserError("--steps must be at least 2 (the first step is the warm-up)")
    modes = ["single", *[m for m in args.modes.split(",") if m != "single"]]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"--modes: unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if args.device == "cpu" and "fsdp" in modes:
        print("FSDP runs on GPUs only (Accelerate): skipped on --device cpu")
        modes.remove("fsdp")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    logs = {}
    for mode in modes:
        out = args.out / mode
        if (out / "loss.jsonl").exists():
            (out / "loss.jsonl").unlink()  # a fresh log: the trainer appends
        print(f"{mode}: {' '.join(run_command(mode, args, out))}", flush=True)
        done = subprocess.run(run_command(mode, args, out), env=env, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            raise UserError(f"the {mode} run failed (exit status {done.returncode}); its output is above")
        logs[mode] = read_log(out)
    rows = summarise(logs, args.num_processes)
    print(format_table(rows, args.num_processes))
    if args.json:
        from ..fileio import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    return 0
