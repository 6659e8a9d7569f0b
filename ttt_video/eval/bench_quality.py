"""Long-context quality of the sequence mixers, in miniature, on the synthetic storyboards.

Each mixer (local attention only, sliding-window attention, TTT-Linear, TTT-MLP, Titans memory)
is trained from the `shapes-tiny` recipe with the same steps and data, its MLP width set so that
every variant has the parameter count of the TTT-MLP model. Each is scored on held-out
storyboards at the training length (3 scenes), then fine-tuned briefly at 3x the length
(9 scenes, starting from its 3-scene checkpoint, as in the staged 3 s -> 9 s recipe) and scored
at that length. Results (mean and std over seeds) go to `<out>/results.json` and
`<out>/README.md`, with a plot of consistency against length when matplotlib is installed.

Each run writes `<out>/runs/<mixer>-<seed>/scores.json` after each phase. A phase that has its
scores is not trained again: a run whose training-length phase is scored goes on with the
extension from that phase's last checkpoint; a phase without scores is trained again from scratch.
So an interrupted benchmark resumes, and the two phases of a run can run in separate sessions.
`--jobs N` trains N runs at once, each in its own process (one GPU holds many of these tiny
models), then tabulates them all.
"""

import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..config import apply_overrides
from ..errors import ArgumentParser, UserError, check_positive, int_list
from ..fileio import write_text_atomic
from ..models import build_model
from ..presets import get_preset
from ..train.trainer import train
from .evaluate import evaluate
from .scorer import CHANCE

MIXERS = {
    "attention": ["model.seq_mixer=attention"],
    "swa": ["model.seq_mixer=swa"],
    "ttt-linear": ["model.seq_mixer=ttt-linear"],
    "ttt-mlp": ["model.seq_mixer=ttt-mlp"],
    "titans": ["model.arch=titans-dit"],
}
METRICS = ("color", "shape", "motion", "consistency")


def num_params(model_cfg):
    return sum(p.numel() for p in build_model(model_cfg).parameters())


def match_parameters(model_cfg, target):
    """Set `mlp_ratio` so the model's parameter count is as close to `target` as the MLP width allows."""
    lo, hi = 1, 64 * model_cfg.dim
    while lo < hi:  # smallest hidden width reaching the target
        mid = (lo + hi) // 2
        model_cfg.mlp_ratio = mid / model_cfg.dim
        lo, hi = (mid + 1, hi) if num_params(model_cfg) < target else (lo, mid)
    model_cfg.mlp_ratio = lo / model_cfg.dim
    return num_params(model_cfg)


def read_scores(run_dir):
    """The scores a run has so far: {str(num_scenes): {metric: value}}."""
    done = Path(run_dir) / "scores.json"
    return json.loads(done.read_text()) if done.is_file() else {}


def train_and_score(cfg, run_dir, extend_steps, num_videos, text_cache, progress):
    """Train at the recipe's length, score; extend to 3x the scenes from that checkpoint, score.
    Each phase's scores are saved as soon as they exist; a scored phase is not trained again."""
    run_dir = Path(run_dir)
    scores = read_scores(run_dir)
    long_cfg = apply_overrides(copy.deepcopy(cfg), [f"data.num_scenes={3 * cfg.data.num_scenes}",
                                                    f"train.max_steps={extend_steps}", f"train.init_from={run_dir}",
                                                    f"train.warmup_steps={min(cfg.train.warmup_steps, extend_steps)}"])
    for phase_cfg, folder in ((cfg, run_dir), (long_cfg, Path(f"{run_dir}-long"))):
        key = str(phase_cfg.data.num_scenes)
        if key in scores:
            continue
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished phase starts again from scratch
        last = train(phase_cfg, folder, progress=progress, text_cache=text_cache)
        scores[key] = {m: v for m, v in evaluate(last, num_videos, text_cache=text_cache, progress=False).items()
                       if m in METRICS}
        write_text_atomic(run_dir / "scores.json", json.dumps(scores, indent=2) + "\n")
    return scores


def train_in_parallel(out, pending, jobs, steps, extend_steps, num_videos, overrides, text_cache):
    """Train the (mixer, seed) runs of `pending`, `jobs` processes at a time (one run each, output
    in `<out>/runs/<mixer>-<seed>.log`): the tiny models leave a GPU mostly idle."""
    common = ["--steps", str(steps), "--extend-steps", str(extend_steps), "--num-videos", str(num_videos),
              "--out", str(out), "--no-progress", *[a for o in overrides for a in ("--set", o)],
              *(["--text-cache", str(text_cache)] if text_cache else [])]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    queue, running, failed = list(pending), [], []
    while queue or running:
        while queue and len(running) < jobs:
            mixer, seed = queue.pop(0)
            log = out / "runs" / f"{mixer}-{seed}.log"
            cmd = [sys.executable, "-m", "ttt_video.cli", "bench", "quality", "--mixers", mixer, "--seeds", str(seed)]
            with open(log, "w") as f:
                running.append((subprocess.Popen([*cmd, *common], stdout=f, stderr=subprocess.STDOUT), log))
        time.sleep(0.5)
        for proc, log in [r for r in running if r[0].poll() is not None]:
            running.remove((proc, log))
            if proc.returncode:
                failed.append(str(log))
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark run(s) failed; see {', '.join(failed)}")


def run(out, mixers=tuple(MIXERS), seeds=(0, 1, 2), steps=2000, extend_steps=300, num_videos=32, overrides=(),
        progress=True, text_cache=None, jobs=1):
    out = Path(out)
    pending = [(m, s) for m in mixers for s in seeds if len(read_scores(out / "runs" / f"{m}-{s}")) < 2]
    if jobs > 1 and pending:
        train_in_parallel(out, pending, jobs, steps, extend_steps, num_videos, overrides, text_cache)
    target = num_params(apply_overrides(get_preset("shapes-tiny"), [*overrides, "model.seq_mixer=ttt-mlp"]).model)
    results = {}
    for mixer in mixers:
        for seed in seeds:
            cfg = apply_overrides(get_preset("shapes-tiny"),
                                  [*overrides, f"train.max_steps={steps}", f"train.seed={seed}", *MIXERS[mixer]])
            params = match_parameters(cfg.model, target)
            scores = train_and_score(cfg, out / "runs" / f"{mixer}-{seed}", extend_steps, num_videos, text_cache,
                                     progress)
            results.setdefault(mixer, {"params": params, "runs": []})["runs"].append({"seed": seed, "scores": scores})
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = summary_table(results)
    write_text_atomic(out / "README.md", table)
    plot(results, out / "consistency.png")
    return results, table


def summary_table(results):
    lengths = sorted({k for r in results.values() for run in r["runs"] for k in run["scores"]}, key=int)
    head = "| mixer | params | scenes | " + " | ".join(METRICS) + " |\n" + "| --- " * (3 + len(METRICS)) + "|\n"
    rows = []
    for mixer, r in results.items():
        for n in lengths:
            cells = []
            for m in METRICS:
                vals = np.array([run["scores"][n][m] for run in r["runs"]], float)
                cells.append(f"{np.nanmean(vals):.3f} ± {np.nanstd(vals):.3f}")
            rows.append(f"| {mixer} | {r['params']:,} | {n} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for mixer, r in results.items():
        lengths = sorted(r["runs"][0]["scores"], key=int)
        vals = [[run["scores"][n]["consistency"] for run in r["runs"]] for n in lengths]
        ax.errorbar([int(n) for n in lengths], np.nanmean(vals, 1), yerr=np.nanstd(vals, 1), marker="o", capsize=3,
                    label=mixer)
    ax.axhline(CHANCE["consistency"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("scenes per video")
    ax.set_ylabel("cross-scene consistency")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the axes: lines cross the whole range
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = ArgumentParser(prog="ttt-video bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", default=",".join(MIXERS), help=f"comma-separated, from {', '.join(MIXERS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--extend-steps", type=int, default=300)
    p.add_argument("--num-videos", type=int, default=32)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe")
    p.add_argument("--text-cache", default=None, help="caption embeddings from `ttt-video cache-text`")
    p.add_argument("--jobs", type=int, default=1, help="runs (mixer, seed) trained at once, each in its own process")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="docs/benchmarks/quality")
    a = p.parse_args(argv)
    check_positive(a, "steps", "extend_steps", "num_videos", "jobs")
    mixers = a.mixers.split(",")
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise UserError(f"--mixers: unknown mixer {unknown[0]!r}; choose from {', '.join(MIXERS)}")
    _, table = run(a.out, mixers, int_list(a, "seeds"), a.steps, a.extend_steps, a.num_videos, a.set,
                   progress=not a.no_progress, text_cache=a.text_cache, jobs=a.jobs)
    print(table)
