"""Checkpoints: `checkpoint-<step>/` with model.safetensors, config.json, training_state.pt and,
with EMA on, ema.safetensors (the averaged trainable weights).

Writes are atomic: a checkpoint is assembled in a temporary folder and renamed into place, and
the `last` pointer is replaced only after that, so an interrupted save never becomes "latest".
"""

import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import config as config_lib
from ..errors import UserError, first_sentence
from ..fileio import check_state_dict, read_safetensors, temp_dir_beside, write_text_atomic

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.pt"
EMA_FILE = "ema.safetensors"
LAST = "last"


class CheckpointError(UserError):
    """A checkpoint path that does not hold what it should."""


def save_checkpoint(run_dir, step, model, cfg, training_state=None, save_limit=None, ema=None):
    """Write `run_dir/checkpoint-<step>` atomically, point `last` at it, prune old ones. `model` is
    a module or its state dict (the trainer passes one gathered from every process)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = temp_dir_beside(final)
    try:
        state = model if isinstance(model, dict) else model.state_dict()
        weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(weights, tmp / MODEL_FILE, metadata={"step": str(step)})
        config_lib.save(cfg, tmp / CONFIG_FILE)
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, tmp / EMA_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(run_dir / LAST, final.name + "\n")
    if save_limit:
        for old in list_checkpoints(run_dir)[:-save_limit]:
            shutil.rmtree(old)
    return final


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if (p / MODEL_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve(path):
    """A checkpoint folder, or a run folder (its `last` checkpoint)."""
    path = Path(path)
    if (path / LAST).is_file():
        path = path / (path / LAST).read_text().strip()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
    return path


def load_weights(model, path, ema=False):
    """Load a checkpoint's weights into `model` (built with its config and adapter);
    `ema=True` then overwrites the trained parameters (those the adapter left trainable) with their
    moving average. Weights that do not fit the model raise `UserError` naming the file and the
    first misfit."""
    model.load_state_dict(_read_weights(path / MODEL_FILE, "checkpoint weights", model.state_dict()))
    if ema:
        apply_ema(model, path)


def apply_ema(model, path):
    """Overwrite `model`'s trainable parameters (its run's adapter applied) with the moving average
    the checkpoint at `path` keeps of them."""
    params = dict(model.named_parameters())
    averaged = load_ema(path, {n: p for n, p in params.items() if p.requires_grad})
    with torch.no_grad():
        for n, v in averaged.items():
            params[n].copy_(v)


def load_ema(path, expected):
    """The EMA weights of a checkpoint, checked against `expected` (the averaged parameters by
    name: the run's trainable ones)."""
    if not (Path(path) / EMA_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} has no {EMA_FILE}")
    return _read_weights(Path(path) / EMA_FILE, "EMA weights", expected)


def _read_weights(path, what, expected):
    """The tensors of a weights file that fit `expected` (a state dict), else `UserError`. A
    checkpoint without image conditioning fits a model with it: its `cond_embed` keeps the model's
    (zero) values."""
    state = read_safetensors(path, what)
    for name, value in expected.items():
        if ".cond_embed." in f".{name}" and name not in state:
            state[name] = value
    check_state_dict(state, expected, path)
    return state


def load_config(path):
    """The config a checkpoint (or a run folder's last one) was trained with, read without its weights."""
    return config_lib.load(resolve(path) / CONFIG_FILE)


def load_model(path, device="cpu", ema=False):
    """Rebuild the model a checkpoint was trained with; returns (model, cfg)."""
    from ..models import build_model
    from .adapters import apply_adapter

    path = resolve(path)
    cfg = load_config(path)
    model = apply_adapter(build_model(cfg.model), cfg.train.adapter, cfg.train.lora_rank, cfg.train.lora_alpha)
    load_weights(model, path, ema)
    return model.to(device).eval(), cfg


def load_training_state(path):
    path = resolve(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE} to resume from")
    try:
        return path, torch.load(path / STATE_FILE, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is corrupt or truncated ({first_sentence(e)})") from None
