"""`ttt-video prepare`: the VAE posterior (mean and std) and the caption embeddings of every item
of a manifest, in sharded safetensors with an index; `CachedDataset` trains from them.

The cache folder:
    index.json               settings, one entry per item (in the manifest dataset's order),
                             and the data skipped while preparing
    empty_text.safetensors   the empty caption's embedding (the unconditional input)
    shard-00000.safetensors  for slot n of the shard: n.mean, n.std [C, f, h, w];
                             n.cond_mean, n.cond_std [C, 1, h, w] (the i2v condition);
                             n.text [S, L, D], n.text_mask [S, L] (one row per segment);
                             a std that is zero everywhere (the identity VAE) is not stored
Items are keyed by their content (the video's size and mtime, captions, window, bucket), so a
re-run skips what is done and a changed video or caption is prepared again. The index is
rewritten after every shard: an interrupted run loses at most one shard of work.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import check_recorded
from ..encoders.text import build_text_encoder, text_settings
from ..encoders.vae import item_generator, vae_from_config
from ..errors import UserError
from ..fileio import atomic_file, open_safetensors, read_json, read_safetensors, write_text_atomic
from .buckets import Bucket, BucketBatchSampler, parse_resolutions
from .dataset import ManifestDataset, Skipped, checked_i2v_ratio, task_for
from .manifest import TASKS
from .report import KINDS, DataError, Skip, SkipReport

INDEX = "index.json"
EMPTY_TEXT = "empty_text.safetensors"
TEXT_BATCH = 256
STORED = ("mean", "cond_mean", "text", "text_mask")  # of every item (a std of zeros is left out)
# the fields of an index's entries that prepare and CachedDataset read: {key: (form, test)}
ITEM_FORMS = {
    "key": ("a string", lambda v: isinstance(v, str)),
    "shard": ("a file name", lambda v: isinstance(v, str)),
    "slot": ("an integer", lambda v: isinstance(v, int)),
    "bucket": ("[height, width, segments]", lambda v: isinstance(v, list) and len(v) == 3
               and all(isinstance(x, int) for x in v)),
    "captions": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
    "task": (f"{' or '.join(TASKS)} or null", lambda v: v is None or v in TASKS),
}
SKIP_FORMS = {
    "kind": (f"one of {', '.join(KINDS)}", lambda v: isinstance(v, str) and v in KINDS),
    "where": ("a string", lambda v: isinstance(v, str)),
    "reason": ("a string", lambda v: isinstance(v, str)),
}


def cache_settings(data_cfg):
    """What a cache depends on; a cache is read only by a config with the same settings (scene
    markers recorded only when on, so that caches made before the setting existed still match)."""
    settings = {
        "fps": data_cfg.fps,
        "frames_per_scene": data_cfg.frames_per_scene,
        "segment_overlap": data_cfg.segment_overlap,
        "num_scenes": data_cfg.num_scenes,
        "buckets": ["x".join(map(str, r)) for r in parse_resolutions(data_cfg.buckets, (data_cfg.height,
                                                                                         data_cfg.width))],
        **text_settings(data_cfg),
        "vae": data_cfg.vae if data_cfg.vae != "external" else [data_cfg.vae_module, data_cfg.vae_class,
                                                                data_cfg.vae_init_json],
    }
    if data_cfg.scene_markers:
        settings["scene_markers"] = True
    return settings


def _check_settings(index, data_cfg, where):
    check_recorded(index.get("settings", {}), cache_settings(data_cfg), f"cache {where}",
                   "prepare a new cache or use the same settings")


def _read_index(folder):
    path = Path(folder) / INDEX
    index = read_json(path, "cache index")
    wrong = _index_misfit(index)
    if wrong:
        raise UserError(f"{path} is not a `ttt-video prepare` index ({wrong})")
    return index


def _index_misfit(index):
    """What keeps a parsed index from being read, or None: no list of items, settings that are not
    an object, or an entry of "items" or "skipped" that lacks a field or holds it in another form."""
    if not isinstance(index, dict) or not isinstance(index.get("items"), list):
        return "no list of items"
    if not isinstance(index.get("settings", {}), dict):
        return "its settings are not an object"
    if not isinstance(index.get("skipped", []), list):
        return "its skipped data are not a list"
    for field, forms in (("items", ITEM_FORMS), ("skipped", SKIP_FORMS)):
        for n, entry in enumerate(index.get(field, [])):
            if not isinstance(entry, dict):
                return f"{field}[{n}] is not an object"
            for key, (form, fits) in forms.items():
                if key not in entry:
                    return f"{field}[{n}] lacks {key!r}"
                if not fits(entry[key]):
                    return f"{field}[{n}][{key!r}] is {entry[key]!r}, not {form}"
    return None


class _Decoded(Dataset):
    """Decoded items (video, condition, captions) of `indices`, or the Skip that replaced one."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        try:
            return self.dataset.decode_item(self.indices[k])
        except Skipped as e:
            return e.skip


def _as_is(item):
    return item


@dataclass
class PrepareResult:
    out: Path
    items: int
    new: int
    report: SkipReport


def prepare(data_cfg, out, workers=0, shard_size=64, device="cpu", progress=True, vae=None, text_encoder=None):
    """Cache every item of `data_cfg.manifest` into folder `out` (made with its first file, after
    the manifest is checked); `workers` decoding processes. `vae`, `text_encoder`: already loaded
    ones (default: built from `data_cfg`). A manifest none of whose clips decodes raises `DataError`
    and writes nothing."""
    out = Path(out)
    if (out / INDEX).is_file():
        index = _read_index(out)
        _check_settings(index, data_cfg, out)
    else:
        index = {"settings": cache_settings(data_cfg), "items": []}
    vae = vae or vae_from_config(data_cfg, device)
    report = SkipReport(data_cfg.strict)
    dataset = ManifestDataset(data_cfg, report)
    done = {entry["key"]: entry for entry in index["items"] if (out / entry["shard"]).is_file()}
    todo = [i for i, w in enumerate(dataset.items) if w.key not in done]
    shard_numbers = [int(m[1]) for p in out.glob("shard-*.safetensors") if (m := re.fullmatch(r"shard-(\d+)", p.stem))]
    next_shard = max(shard_numbers, default=-1) + 1
    encoder = text_encoder
    if todo or not (out / EMPTY_TEXT).is_file():
        encoder = encoder or build_text_encoder(data_cfg.text_encoder, data_cfg.text_max_length, device,
                                                data_cfg=data_cfg)
        emb, mask = encoder.encode([""])
        captions = list(dict.fromkeys(c for i in todo for c in dataset.captions(i)))
        for k in range(0, len(captions), TEXT_BATCH):  # the encoder keeps them: one batched pass
            encoder.encode(captions[k:k + TEXT_BATCH])

    def write_index():
        """Write the index (the empty caption's file first, once); an index of no items is no cache."""
        index["items"] = [done[w.key] for w in dataset.items if w.key in done]
        if not index["items"]:  # every clip passed the probe but failed while decoding
            raise dataset.unusable()
        if not (out / EMPTY_TEXT).is_file():
            atomic_file(out / EMPTY_TEXT, lambda tmp: save_file({"text": emb[0].contiguous(),
                                                                 "text_mask": mask[0].to(torch.uint8)}, tmp))
        index["skipped"] = [vars(s) for s in report.skips.values()]
        write_text_atomic(out / INDEX, json.dumps(index, indent=1) + "\n")

    tensors, pending = {}, []

    def flush():
        nonlocal next_shard
        if pending:
            name = f"shard-{next_shard:05d}.safetensors"
            atomic_file(out / name, lambda tmp: save_file(tensors, tmp))
            for entry in pending:
                entry["shard"] = name
                done[entry["key"]] = entry
            next_shard += 1
            tensors.clear()
            pending.clear()
        write_index()

    loader = DataLoader(_Decoded(dataset, todo), batch_size=None, collate_fn=_as_is, num_workers=workers)
    bar = tqdm(total=len(todo), desc="prepare", unit="clip", disable=not progress, dynamic_ncols=True)
    try:
        for i, result in zip(todo, loader):
            bar.update(1)
            if isinstance(result, Skip):
                report.add(result)
                continue
            video, cond, captions = result
            w = dataset.items[i]
            mean, std = vae.encode(video[None])
            cond_mean, cond_std = vae.encode(cond[None])
            text, text_mask = encoder.encode(captions)
            slot = len(pending)
            stored = {"mean": mean[0], "std": std[0], "cond_mean": cond_mean[0], "cond_std": cond_std[0],
                      "text": text, "text_mask": text_mask.to(torch.uint8)}
            tensors.update({f"{slot}.{k}": v.cpu().contiguous() for k, v in stored.items()
                            if k not in ("std", "cond_std") or v.any()})
            record = dataset.records[w.clip]
            pending.append({"key": w.key, "slot": slot, "bucket": [w.bucket.height, w.bucket.width, w.bucket.segments],
                            "captions": captions, "task": record.task, "clip": record.video})
            if len(pending) == shard_size:
                flush()
        flush()
    finally:
        bar.close()
    return PrepareResult(out, len(index["items"]), sum(dataset.items[i].key in done for i in todo), report)


def cached_text(batch, empty_text, drop):
    """Text `[B, S, L, D]` and mask `[B, S, L]` of a cached batch, with the captions of `drop`
    `[B, S]` replaced by the empty caption."""
    emb, mask = empty_text  # [L, D], [L]
    d = drop[..., None]  # [B, S, 1]
    return torch.where(d[..., None], emb, batch["text"]), torch.where(d, mask, batch["text_mask"])


class CachedDataset(Dataset):
    """Items of a `prepare` cache: latents drawn from the stored posterior, seeded by
    (seed, draw), so with the identity VAE a cached item equals the decoded one. Items hold
    `latents` `[C, f, h, w]`, `cond_latents` `[C, 1, h, w]` (zeros for t2v), `text`, `text_mask`,
    `captions`, `task`."""

    has_text = True

    def __init__(self, data_cfg):
        root = Path(data_cfg.cache_dir)
        if not (root / INDEX).is_file():
            raise UserError(f"cache index not found: {root / INDEX} (run `ttt-video prepare` first)")
        index = _read_index(root)
        _check_settings(index, data_cfg, root)
        self.root, self.entries = root, index["items"]
        self._shards = {}
        for n, entry in enumerate(self.entries):  # every header and item checked before training starts
            keys = self._shard(entry["shard"])[1]
            lacking = [name for name in STORED if f"{entry['slot']}.{name}" not in keys]
            if lacking:
                raise UserError(f"cache file {root / entry['shard']} lacks {entry['slot']}.{lacking[0]} "
                                f"(items[{n}] of {root / INDEX})")
        self.report = SkipReport(data_cfg.strict)
        for skip in index.get("skipped", []):
            self.report.add(Skip(skip["kind"], skip["where"], skip["reason"]))
        if not self.entries:
            raise DataError(f"cache {root} holds no items")
        self.buckets = [Bucket(*e["bucket"]) for e in self.entries]
        empty = read_safetensors(root / EMPTY_TEXT, "cache file")
        self.empty_text = (empty["text"], empty["text_mask"].bool())
        self.i2v_ratio, self.seed = checked_i2v_ratio(data_cfg.i2v_ratio), data_cfg.seed

    def __getstate__(self):
        return {**self.__dict__, "_shards": {}}

    def __len__(self):
        return len(self.entries)

    def _shard(self, name):
        """(handle, keys) of a shard, opened once per process (`__getstate__` leaves the handles behind)."""
        if name not in self._shards:
            handle = open_safetensors(self.root / name, "cache file")
            self._shards[name] = (handle, set(handle.keys()))
        return self._shards[name]

    def _get(self, entry, name, like=None):
        """A stored tensor; a missing std reads as zeros `like` the mean."""
        handle, keys = self._shard(entry["shard"])
        key = f"{entry['slot']}.{name}"
        return handle.get_tensor(key) if like is None or key in keys else torch.zeros_like(like)

    def __getitem__(self, draw):
        entry = self.entries[draw % len(self.entries)]
        g = item_generator([self.seed, draw])
        mean = self._get(entry, "mean")
        latents = mean + self._get(entry, "std", like=mean) * torch.randn(mean.shape, generator=g)
        task = task_for(entry["task"], self.i2v_ratio, self.seed, draw)
        cond_mean = self._get(entry, "cond_mean")
        cond = cond_mean + self._get(entry, "cond_std", like=cond_mean) * torch.randn(cond_mean.shape, generator=g)
        return {"latents": latents, "captions": list(entry["captions"]), "task": task,
                "cond_latents": cond if task == "i2v" else torch.zeros_like(cond),
                "text": self._get(entry, "text"), "text_mask": self._get(entry, "text_mask").bool(), "skipped": []}

    def batch_sampler(self, start, stop, batch_size, rank=0, world=1):
        return BucketBatchSampler(self.buckets, batch_size, start, stop, self.seed, rank, world)
