"""The training loop: data -> objective -> model -> loss -> AdamW -> checkpoints, logs, samples.

Launch plainly or with `accelerate launch` (DDP, FSDP2 through the configs in configs/accelerate/);
the model knows nothing of Accelerate. Runs are exactly resumable and independent of how the global
batch is split: micro-batch m of process r holds dataset items [(m*P + r)*B, (m*P + r + 1)*B),
and each item's noise, time and caption dropout come from a generator seeded by its index.
"""

import math
import resource
import signal
import time
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from tqdm.auto import tqdm

from .. import config as config_lib
from ..data.buckets import parse_resolutions
from ..data.cache import cached_text
from ..data.dataset import EpochReport, collate, task_for
from ..data.synthetic import SyntheticStoryboards
from ..diffusion import build_objective
from ..encoders.pipeline import check_resolution, fill_from_pipeline, resolution_factor
from ..encoders.text import build_text_encoder
from ..encoders.vae import item_generator, vae_from_config
from ..errors import UserError
from ..fileio import open_safetensors, read_json
from ..layers.dit import condition_input
from ..models import build_model
from . import checkpoint as ckpt
from .adapters import apply_adapter, cast_frozen
from .metrics import MetricSinks

NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase)
ITEM_SEED_STRIDE = 1_000_003


class TrainingError(RuntimeError):
    pass


def resolve_device(name, key="device"):
    """"auto": cuda where PyTorch sees a CUDA device, else cpu. An unknown name, or a CUDA device
    this machine lacks, raises `UserError` naming `key`."""
    config_lib.check_device(name, key)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        found = torch.cuda.device_count()
        if int(name.partition(":")[2] or 0) >= found:
            raise UserError(f"{key} {name}: PyTorch sees {found or 'no'} CUDA device{'' if found == 1 else 's'} "
                            "on this machine")
    return name


def stored_dtypes(cfg):
    """{file: dtypes} of the weights a run starts from (`model.pretrained`, `train.init_from`), read
    from the safetensors headers; a diffusers config.json that declares `torch_dtype` counts too."""
    found, files = {}, []
    if cfg.model.arch == "cogvideox-ttt" and cfg.model.pretrained:
        from ..models.cogvideox_ttt import CONFIG_FILE, diffusers_weight_files, transformer_folder

        folder = transformer_folder(cfg.model.pretrained)
        files += diffusers_weight_files(folder)
        if (folder / CONFIG_FILE).is_file():
            declared = read_json(folder / CONFIG_FILE, "model config").get("torch_dtype")
            found[str(folder / CONFIG_FILE)] = {"BF16"} if declared == "bfloat16" else set()
    if cfg.train.init_from:
        files.append(ckpt.resolve(cfg.train.init_from) / ckpt.MODEL_FILE)
    for file in files:
        with open_safetensors(file, "model weights") as f:
            found[str(file)] = {f.get_slice(k).get_dtype() for k in f.keys()}
    return found


def check_video_sizes(cfg):
    """A CogVideoX run's sizes (data.height x data.width, or each of data.buckets) must divide by the
    VAE's spatial compression times the patch size; checked from the configs before anything loads."""
    if cfg.model.arch != "cogvideox-ttt" or not cfg.model.pretrained or cfg.data.vae in ("identity", "external"):
        return
    from ..models.cogvideox_ttt import transformer_folder

    factor = resolution_factor(cfg.data.vae, transformer_folder(cfg.model.pretrained))
    prefix = "data.buckets entry " if cfg.data.buckets.strip() else "data."
    for height, width in parse_resolutions(cfg.data.buckets, (cfg.data.height, cfg.data.width)):
        check_resolution(height, width, factor, prefix)


def warn_fp16_on_bf16(cfg):
    """fp16 autocast on weights trained in bf16 overflows where bf16's wider range was used."""
    if cfg.train.mixed_precision != "fp16":
        return
    for file, dtypes in stored_dtypes(cfg).items():
        if "BF16" in dtypes:
            warnings.warn(f"train.mixed_precision=fp16, but the starting weights in {file} are bf16: activations "
                          "beyond fp16's range will overflow; train.mixed_precision=bf16 keeps their range",
                          stacklevel=2)
            return


def build_dataset(data_cfg):
    """Synthetic storyboards, or a manifest's clips: decoded on the fly, or from `data.cache_dir`."""
    if data_cfg.source == "manifest":
        from ..data.cache import CachedDataset
        from ..data.dataset import ManifestDataset

        return CachedDataset(data_cfg) if data_cfg.cache_dir else ManifestDataset(data_cfg)
    if data_cfg.source != "synthetic":
        raise UserError(f"unknown data source {data_cfg.source!r}; available: synthetic, manifest")
    if data_cfg.segment_overlap:
        raise UserError("data.segment_overlap needs data.source=manifest (synthetic storyboards do not overlap)")
    return SyntheticStoryboards(data_cfg.num_scenes, data_cfg.frames_per_scene, data_cfg.height, data_cfg.width,
                                seed=data_cfg.seed, size=10**8)


class StepBatches(torch.utils.data.Sampler):
    """Index lists of this process's micro-batches `start .. stop-1` (see the module docstring)."""

    def __init__(self, start, stop, batch_size, rank=0, world=1):
        self.start, self.stop, self.batch_size, self.rank, self.world = start, stop, batch_size, rank, world

    def __len__(self):
        return self.stop - self.start

    def indices(self, micro):
        first = (micro * self.world + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self):
        for m in range(self.start, self.stop):
            yield self.indices(m)


def enable_checkpointing(model, tc, enabled):
    """Gradient checkpointing on or off; when on, with the part-wise recompute and the offloading
    that `tc` (the train config) asks for (cogvideox-ttt)."""
    if enabled and (tc.checkpoint_parts or tc.offload_checkpoints):
        model.enable_gradient_checkpointing(True, parts=tc.checkpoint_parts, offload=tc.offload_checkpoints)
    else:
        model.enable_gradient_checkpointing(enabled)


def param_groups(model, weight_decay, lr, ttt_lr=0.0):
    """AdamW groups: weight decay on weight matrices only, not on biases, normalisation layers, 1-D
    parameters (gates) or what a module names in `no_weight_decay` (a TTT layer's inner biases and
    LayerNorm); TTT parameters at their own learning rate when `ttt_lr` is set. Only trainable
    parameters."""
    groups, seen = {}, set()
    for prefix, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            decay = (p.dim() >= 2 and leaf != "bias" and not isinstance(module, NORMS)
                     and leaf not in getattr(module, "no_weight_decay", ()))
            ttt = bool(ttt_lr) and ".ttt." in f".{prefix}.{leaf}"
            key = ("ttt" if ttt else "base") + ("" if decay else "_no_decay")
            groups.setdefault(key, {"name": key, "params": [], "weight_decay": weight_decay if decay else 0.0,
                                    "lr": ttt_lr if ttt else lr})["params"].append(p)
    return list(groups.values())


def lr_lambda(train_cfg):
    """Linear warmup, then cosine decay to min_lr_ratio at max_steps (or constant)."""
    def f(step):
        if step < train_cfg.warmup_steps:
            return (step + 1) / train_cfg.warmup_steps
        if train_cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - train_cfg.warmup_steps) / max(1, train_cfg.max_steps - train_cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return train_cfg.min_lr_ratio + (1 - train_cfg.min_lr_ratio) * cosine
    if train_cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown lr_schedule {train_cfg.lr_schedule!r}; choose cosine or constant")
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


def item_randomness(indices, shape, num_segments, caption_dropout, objective, seed):
    """Per-item time `[B]`, noise `[B, ...shape]` and caption-dropout mask `[B, S]`, each drawn
    from a generator seeded by the item's index, so any split of a batch draws the same."""
    ts, noises, drops = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed * ITEM_SEED_STRIDE + i)
        ts.append(objective.sample_time(1, generator=g))
        noises.append(torch.randn(shape, generator=g))
        drops.append(torch.rand(num_segments, generator=g) < caption_dropout)
    return torch.cat(ts), torch.stack(noises), torch.stack(drops)


def image_condition(batch, x0, vae, indices, data_cfg):
    """The i2v condition `[B, C + 1, F, h, w]` of a batch. Items whose task is i2v (the dataset's,
    or for the synthetic source drawn with `data.i2v_ratio` from (data seed, item index)) are
    conditioned on their `cond_latents`, their encoded `cond_image`, or else their first latent frame.
    An encoded condition's sample is the cache's: item i's generator draws its latents, then it."""
    tasks = batch.get("task") or [task_for(None, data_cfg.i2v_ratio, data_cfg.seed, i) for i in indices]
    active = torch.tensor([task == "i2v" for task in tasks], device=x0.device)
    if "cond_latents" in batch:
        first = batch["cond_latents"].to(x0.device)
    elif "cond_image" in batch:
        mean, std = vae.encode(batch["cond_image"].to(x0.device))
        noise = []
        for i in indices:
            g = item_generator([data_cfg.seed, i])
            torch.randn(x0.shape[1:], generator=g)
            noise.append(torch.randn(mean.shape[1:], generator=g))
        first = mean + std * torch.stack(noise).to(mean.device)
    else:
        first = x0[:, :, :1]
    return condition_input(first, x0.shape[2], active)


def svd_image_encoder(cfg, dataset, vae, device):
    """The image encoder of an SVD run (`encoders.svd_image`), after checking the run's settings."""
    from ..encoders.svd_image import SVDImageEncoder
    from ..models.svd import pipeline_folder

    if getattr(dataset, "has_text", False):
        raise UserError("arch svd needs the condition frame's pixels (its CLIP embedding), which a latent "
                        "cache does not hold; train without data.cache_dir")
    if cfg.train.validate_every:
        raise UserError("train.validate_every is not supported for arch svd; sample with generate --image")
    folder = pipeline_folder(cfg.model.pretrained)
    return SVDImageEncoder(folder, vae, cfg.model.noise_aug_strength, device)


class EMA:
    """Exponential moving average of the trainable parameters. Under FSDP2 the parameters, and so
    the averages, are DTensor shards: each process averages its own shard."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model):
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def full(self):
        """The whole averages, gathered from the shards (every process must call this)."""
        return {n: _full(v).cpu() for n, v in self.shadow.items()}

    @torch.no_grad()
    def load(self, full):
        for n, v in self.shadow.items():
            v.copy_(_like(full[n], v))


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full, target):
    """`full` where `target` lives: on its device, or sharded like it when it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.device_mesh.device_type), target.device_mesh, target.placements)
    return full.to(target.device)


def _optimizer_state_options(accelerator, loading=False):
    """Optimizer state is saved whole and keyed by parameter name, whatever the parallelism, so a
    checkpoint resumes on any number of processes; under FSDP each process loads it into its shard."""
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    sharded = accelerator.distributed_type == DistributedType.FSDP
    return StateDictOptions(full_state_dict=sharded or not loading, cpu_offload=not loading)


def _load_optimizer_state(model, optimizer, saved, accelerator, path):
    """Each trainable parameter's AdamW moments from a checkpoint, by name. The groups and their
    settings (learning rate, weight decay) stay this run's, so a run resumes under a changed config
    or grouping; a parameter trainable now without saved moments is refused."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # this run's groups, with parameter names: read from the local state (no gather under FSDP)
    groups = get_optimizer_state_dict(model, optimizer, options=StateDictOptions())["param_groups"]
    missing = [name for group in groups for name in group["params"] if name not in saved["state"]]
    if missing:
        raise UserError(f"{path}: no optimizer state for {len(missing)} parameter(s) trainable in this config "
                        f"(first: {missing[0]}); resume with the trainable parameters of the run that wrote it, "
                        f"or start from its weights with train.init_from={path}")
    set_optimizer_state_dict(model, optimizer, {"state": saved["state"], "param_groups": groups},
                             options=_optimizer_state_options(accelerator, loading=True))


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def write_validation_samples(model, cfg, encoder, out_dir, step, num_videos, write=True):
    """Sample held-out storyboards; `write=False` only samples (FSDP: every process must run the model)."""
    from ..data.synthetic import held_out
    from ..sample.export import contact_sheet, video_to_uint8, write_video
    from ..sample.sampler import sample_batch

    boards = [held_out(i, cfg.data.num_scenes) for i in range(num_videos)]
    model.eval()
    x = sample_batch(model, cfg, encoder, [b.captions for b in boards], progress=False)
    model.train()
    if not write:
        return
    for i, video in enumerate(x):
        frames = video_to_uint8(video.cpu().clamp(-1, 1))
        path = Path(out_dir) / "samples" / f"step-{step}-{i}.mp4"
        write_video(frames, path, fps=cfg.data.fps)
        contact_sheet(frames, path.with_suffix(".png"), columns=cfg.data.frames_per_scene)


def train(cfg, output_dir, resume=None, progress=True, text_cache=None):
    """Train `cfg` into `output_dir`; returns the last checkpoint's path.
    `text_cache`: optional file of precomputed caption embeddings (`ttt-video cache-text`).
    Empty text-encoder, VAE and scheduler settings are filled from the pipeline folder of
    `model.pretrained` (`encoders/pipeline.py`); checkpoints record the filled config."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    cfg = fill_from_pipeline(config_lib.validate(cfg))
    check_video_sizes(cfg)
    tc = cfg.train
    if tc.validate_every and cfg.diffusion.objective == "v-prediction":
        raise UserError("train.validate_every has no v-prediction sampler; set it to 0 and sample checkpoints "
                        "with `ttt-video generate --model PIPELINE --ttt-checkpoint CHECKPOINT`")
    warn_fp16_on_bf16(cfg)
    out = Path(output_dir)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum_steps,
                              cpu=resolve_device(tc.device, "train.device") == "cpu")
    device, main = accelerator.device, accelerator.is_main_process
    sharded = accelerator.distributed_type == DistributedType.FSDP  # every process holds part of the model
    dataset = build_dataset(cfg.data)  # the data and a text cache are checked before the model loads
    svd = cfg.model.arch == "svd"  # conditioned on an image alone, which takes the captions' place
    encoder = None if svd else build_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, device,
                                                  cache=text_cache, data_cfg=cfg.data)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model)
    if tc.init_from:
        ckpt.load_weights(model, ckpt.resolve(tc.init_from))
    model = apply_adapter(model, tc.adapter, tc.lora_rank, tc.lora_alpha)
    model = cast_frozen(model, tc.frozen_dtype, tc.mixed_precision).to(device).train()
    enable_checkpointing(model, tc, tc.grad_checkpointing)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr, tc.ttt_lr), betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    step, state = 0, None
    if resume is not None:  # weights before `prepare` (FSDP then shards them), optimizer state after
        path, state = ckpt.load_training_state(resume)
        ckpt.load_weights(model, path)
        scheduler.load_state_dict({**state["scheduler"], "base_lrs": scheduler.base_lrs})  # this config's rates
        step = state["step"]
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, tc.ema_decay) if tc.ema_decay else None
    if state is not None:
        _load_optimizer_state(model, optimizer.optimizer, state["optimizer"], accelerator, path)
        schedule = lr_lambda(tc)
        for group, base in zip(optimizer.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * schedule(scheduler.last_epoch)
        if ema is not None:
            ema.load(ckpt.load_ema(path, ema.shadow))

    if not svd and encoder.dim != unwrapped.text_dim:
        if cfg.model.pretrained:
            raise UserError(f"the pretrained model takes text embeddings of width {unwrapped.text_dim} but the "
                            f"text encoder gives {encoder.dim}; use the encoder it was trained with (data.t5_model)")
        raise UserError(f"model.text_dim is {cfg.model.text_dim} but the text encoder gives {encoder.dim}; "
                        f"set model.text_dim={encoder.dim}")
    objective = build_objective(cfg.diffusion)
    A = tc.grad_accum_steps
    make_sampler = getattr(dataset, "batch_sampler", StepBatches)  # bucketed datasets bring their own
    sampler = make_sampler(step * A, tc.max_steps * A, tc.batch_size, accelerator.process_index,
                           accelerator.num_processes)
    epochs = EpochReport(dataset, sampler)
    vae = None if getattr(dataset, "has_text", False) else vae_from_config(cfg.data, device)
    image_encoder = svd_image_encoder(cfg, dataset, vae, device) if svd else None
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=tc.num_workers)
    def save():
        """Every process gathers (FSDP shards are collected), the main process writes."""
        weights = accelerator.get_state_dict(model)
        state = {"optimizer": get_optimizer_state_dict(model, optimizer.optimizer,
                                                       options=_optimizer_state_options(accelerator)),
                 "scheduler": scheduler.state_dict(), "step": step}
        averages = None if ema is None else ema.full()
        if main:
            return ckpt.save_checkpoint(out, step, weights, cfg, state, tc.save_limit, ema=averages)
        return None

    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", disable=not (progress and main), dynamic_ncols=True)
    last, saved_step, losses, seen = None, None, [], 0
    t0 = t_log = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)  # only now: a run refused while loading leaves no folder behind
    sinks = MetricSinks(out, cfg) if main else None
    try:
        for micro, batch in enumerate(loader, start=step * A):
            if main:
                epochs.update(micro + 1, batch)
            if "latents" in batch:
                x0 = batch["latents"].to(device)  # [B, C, F, h, w]
            else:
                x0 = vae.sample(batch["video"].to(device), [[cfg.data.seed, i] for i in sampler.indices(micro)])
            t, noise, drop = item_randomness(sampler.indices(micro), x0.shape[1:], len(batch["captions"][0]),
                                             tc.caption_dropout, objective, tc.seed)
            cond = None
            if image_encoder is not None:
                text, mask, cond = image_encoder.training_inputs(batch, x0.shape[2], sampler.indices(micro), drop,
                                                                 tc.seed)
            elif "text" in batch:
                text, mask = cached_text(batch, dataset.empty_text, drop)
            else:
                text, mask = encode_captions(encoder, batch["captions"], drop)
            xt, target = objective.training_pair(x0, t.to(device), noise.to(device))
            inputs = (xt, objective.model_timestep(t.to(device)), text.to(device), mask.to(device))
            with accelerator.accumulate(model):
                with accelerator.autocast():  # backward runs outside: autocast's weight copies go first
                    if cfg.model.condition_frames:
                        if cond is None:
                            cond = image_condition(batch, x0, vae, sampler.indices(micro), cfg.data)
                        pred = model(*inputs, cond=cond)
                    else:
                        pred = model(*inputs)
                    loss = objective.loss(pred, target, t.to(device))
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at step {step + 1}; "
                                        f"last good checkpoint: {last or 'none'}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            seen += x0.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema is not None:
                ema.update(unwrapped)
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
                now = time.perf_counter()
                rec = {"step": step, "loss": round(mean_loss, 6), "grad_norm": round(float(grad_norm), 4),
                       "lr": scheduler.get_last_lr()[0], "samples_per_s": round(seen / (now - t_log), 2),
                       "peak_memory_gb": round(peak_memory_gb(device), 3), "elapsed_s": round(now - t0, 2)}
                losses, seen, t_log = [], 0, now
                if main:
                    sinks.log(rec, {g["name"]: lr for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr())})
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            if tc.validate_every and step % tc.validate_every == 0 and (main or sharded):
                write_validation_samples(unwrapped, cfg, encoder, out, step, tc.validation_videos, write=main)
            if step % tc.save_every == 0:
                last, saved_step = save(), step
            if interrupted:  # stop before asking the loader (and its workers) for more
                break
        if saved_step != step:
            last = save()
        if main:
            epochs.close(step * A)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
        if main:
            sinks.close()
        accelerator.end_training()
    if interrupted and main:
        print(f"interrupted at step {step}; saved {last}")
    return last
