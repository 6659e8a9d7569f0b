"""The training loop: data -> objective -> model -> loss -> AdamW -> checkpoints and a loss log.

Runs are exactly resumable: batch i always holds dataset items [i*B, (i+1)*B) and the noise
and times of step i come from a generator seeded by (seed, i), so the data position is the step.
"""

import json
import math
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.synthetic import SyntheticStoryboards, collate
from ..diffusion.flow import FlowMatching
from ..encoders.text import build_text_encoder
from ..models import build_model
from . import checkpoint as ckpt

NO_DECAY = ("bias", "norm", "gate", "embed", "ln_")


class TrainingError(RuntimeError):
    pass


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_dataset(data_cfg):
    if data_cfg.source != "synthetic":
        raise ValueError(f"unknown data source {data_cfg.source!r}; available: synthetic")
    return SyntheticStoryboards(data_cfg.num_scenes, data_cfg.frames_per_scene, data_cfg.height, data_cfg.width,
                                seed=data_cfg.seed, size=10**8)


class StepBatches(torch.utils.data.Sampler):
    """Batch i is dataset items [i*B, (i+1)*B): the data position of a run is its step."""

    def __init__(self, start, stop, batch_size):
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        for s in range(self.start, self.stop):
            yield list(range(s * self.batch_size, (s + 1) * self.batch_size))


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms, gates, embeddings and the inner LN."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(train_cfg):
    """Linear warmup, then cosine decay to min_lr_ratio at max_steps."""
    def f(step):
        if step < train_cfg.warmup_steps:
            return (step + 1) / train_cfg.warmup_steps
        progress = (step - train_cfg.warmup_steps) / max(1, train_cfg.max_steps - train_cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return train_cfg.min_lr_ratio + (1 - train_cfg.min_lr_ratio) * cosine
    return f


def encode_captions(encoder, captions, drop=None):
    """captions: B lists of S strings -> text `[B, S, L, D]`, mask `[B, S, L]`. `drop` `[B, S]` bool
    replaces those captions by the empty caption (the unconditional input for guidance)."""
    B, S = len(captions), len(captions[0])
    flat = [c for row in captions for c in row]
    if drop is not None:
        flat = ["" if d else c for c, d in zip(flat, drop.flatten().tolist())]
    emb, mask = encoder.encode(flat)
    return emb.view(B, S, *emb.shape[1:]), mask.view(B, S, -1)


def train(cfg, output_dir, resume=None, progress=True, text_cache=None):
    """Train `cfg` into `output_dir`; returns the last checkpoint's path.
    `text_cache`: optional file of precomputed caption embeddings (`ttt-video cache-text`)."""
    tc = cfg.train
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    step = 0
    if resume is not None:
        path, state = ckpt.load_training_state(resume)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path / ckpt.MODEL_FILE))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
    dataset = build_dataset(cfg.data)
    encoder = build_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, device,
                                 cache=text_cache)
    objective = FlowMatching(cfg.diffusion.timestep_shift)
    log_path = out / "loss.jsonl"
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=StepBatches(step, tc.max_steps, tc.batch_size),
                                         collate_fn=collate, num_workers=tc.num_workers)

    def save():
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
        return ckpt.save_checkpoint(out, step, model, cfg, state, tc.save_limit)

    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    last = None
    t0 = time.perf_counter()
    try:
        with open(log_path, "a") as log:
            for batch in loader:
                x0 = batch["video"].to(device)  # [B, C, F, H, W]
                B = x0.shape[0]
                g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
                drop = torch.rand(B, cfg.data.num_scenes, generator=g) < tc.caption_dropout
                text, mask = encode_captions(encoder, batch["captions"], drop)
                t = objective.sample_time(B, generator=g)
                noise = torch.randn(x0.shape, generator=g)
                xt, target = objective.training_pair(x0, t.to(device), noise.to(device))
                pred = model(xt, t.to(device) * 1000, text.to(device), mask.to(device))
                loss = objective.loss(pred, target)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at step {step + 1}; "
                                        f"last good checkpoint: {last or 'none'}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.max_steps:
                    rec = {"step": step, "loss": round(loss.item(), 6), "grad_norm": round(grad_norm.item(), 4),
                           "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - t0, 2)}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if step % tc.save_every == 0:
                    last = save()
                if interrupted:  # stop before asking the loader (and its workers) for more
                    break
        if last is None or not last.name.endswith(f"-{step}"):
            last = save()
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        print(f"interrupted at step {step}; saved {last}")
    return last
