"""Video datasets behind one interface: manifest clips decoded on the fly (here), latents read from
a `ttt-video prepare` cache (`cache.py`), and the synthetic storyboards (`synthetic.py`).

A clip is cut into segments of `frames_per_scene` frames at `fps` (3 s in the real presets),
each with its own caption, and the segments into windows of at most `num_scenes`: one item
per window, in the bucket (nearest resolution, number of segments). Neighbouring segments share
`segment_overlap` frames (CogVideoX: one, the frame its causal VAE encodes alone, so S segments of
49 frames are 48 S + 1 frames and 12 S + 1 latent frames). A clip shorter than one segment is
skipped as too short. Items:
    video       float32 [3, F, H, W] in [-1, 1], F = segments * (frames_per_scene - overlap) + overlap
    captions    list[str], one per segment
    task        "t2v" or "i2v"
    cond_image  float32 [3, 1, H, W]: the condition of an i2v item (the cond_image of the manifest
                line, else the first frame); zeros for t2v
    skipped     list[Skip]: items that failed to decode and were replaced by the next item of
                the same bucket (so a batch never shrinks and the run never stops)
"""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import UserError
from .buckets import Bucket, BucketBatchSampler, nearest_resolution, parse_resolutions
from .manifest import mark_scenes, read_manifest
from .report import DataError, Skip, SkipReport
from .video import EPS, VideoError, decode, probe, read_image, to_tensor


@dataclass(frozen=True)
class Window:
    clip: int
    first: int  # first segment of the clip
    bucket: Bucket
    key: str  # identifies the item's content (file state, captions, window) for the cache


class Skipped(Exception):
    def __init__(self, skip):
        super().__init__(str(skip))
        self.skip = skip


def checked_i2v_ratio(value):
    if not 0.0 <= value <= 1.0:
        raise UserError(f"data.i2v_ratio must be between 0 and 1, got {value}")
    return value


def task_for(record_task, i2v_ratio, seed, draw):
    """The manifest's task, else i2v with probability `i2v_ratio`, fixed by (seed, draw)."""
    if record_task is not None:
        return record_task
    if i2v_ratio <= 0:
        return "t2v"
    return "i2v" if np.random.default_rng([seed, draw, 1]).random() < i2v_ratio else "t2v"


def segment_count(duration, fps, frames_per_scene, overlap=0):
    return max(0, int((duration * fps - overlap) / (frames_per_scene - overlap) + EPS))


def clip_frames(segments, frames_per_scene, overlap=0):
    """Frames of `segments` consecutive segments that share `overlap` frames with their neighbours."""
    return segments * (frames_per_scene - overlap) + overlap


def checked_overlap(data_cfg):
    if not 0 <= data_cfg.segment_overlap < data_cfg.frames_per_scene:
        raise UserError(f"data.segment_overlap must be at least 0 and below data.frames_per_scene "
                        f"({data_cfg.frames_per_scene}), got {data_cfg.segment_overlap}")
    return data_cfg.segment_overlap


class ManifestDataset(Dataset):
    """Clips of a manifest, probed (not decoded) at construction; unusable ones are skipped there
    and counted in `report`. A manifest with no usable clip raises `DataError`."""

    def __init__(self, data_cfg, report=None, probe_workers=8):
        if not data_cfg.manifest:
            raise UserError("data.manifest is not set (a .jsonl manifest or a metadata.json list)")
        self.manifest = manifest = Path(data_cfg.manifest)
        if not manifest.is_file():
            raise UserError(f"manifest not found: {manifest}")
        self.root = Path(data_cfg.data_root) if data_cfg.data_root else manifest.parent
        if not self.root.is_dir():
            raise UserError(f"data root not found: {self.root}")
        self.fps, self.frames_per_scene = data_cfg.fps, data_cfg.frames_per_scene
        self.overlap = checked_overlap(data_cfg)
        self.max_segments = data_cfg.num_scenes
        self.scene_markers = data_cfg.scene_markers
        self.resolutions = parse_resolutions(data_cfg.buckets, (data_cfg.height, data_cfg.width))
        self.i2v_ratio, self.seed = checked_i2v_ratio(data_cfg.i2v_ratio), data_cfg.seed
        self.report = report if report is not None else SkipReport(data_cfg.strict)
        self.records = read_manifest(manifest, self.report)
        with ThreadPoolExecutor(max(1, probe_workers)) as pool:
            checked = list(pool.map(self._check, self.records))
        self.items = []
        for clip, (record, result) in enumerate(zip(self.records, checked)):
            if isinstance(result, Skip):
                self.report.add(result)
                continue
            info, stamp = result
            segments = segment_count(info.duration, self.fps, self.frames_per_scene, self.overlap)
            if record.per_segment:
                segments = min(segments, len(record.captions))
            if segments == 0:
                need = self.frames_per_scene / self.fps
                self.report.add(Skip("too_short", record.video, f"{info.duration:.2f} s, a segment needs {need:.2f} s"))
                continue
            height, width = nearest_resolution(info.height, info.width, self.resolutions)
            for first in range(0, segments, self.max_segments):
                bucket = Bucket(height, width, min(self.max_segments, segments - first))
                key = hashlib.sha1(json.dumps([record.video, stamp, record.captions, record.per_segment,
                                               record.task, record.cond_image, first, str(bucket),
                                               *([record.transitions] if record.transitions else [])])
                                   .encode()).hexdigest()[:20]
                self.items.append(Window(clip, first, bucket, key))
        if not self.items:
            raise self.unusable()
        self.buckets = [w.bucket for w in self.items]
        self._same_bucket, self._position = {}, []
        for i, b in enumerate(self.buckets):
            self._position.append(len(self._same_bucket.setdefault(b, [])))
            self._same_bucket[b].append(i)
        self._bad = {}

    def unusable(self):
        """The `DataError` of a manifest none of whose clips can be used, with the skip counts."""
        return DataError(f"manifest {self.manifest} has no usable clip: {len(self.records)} listed, "
                         f"{self.report.summary()}")

    def path(self, name):
        return self.root / name

    def _check(self, record):
        """(VideoInfo, file stamp) of a record's video, or the Skip that rules it out."""
        try:
            info = probe(self.path(record.video))
        except VideoError as e:
            return Skip(e.kind, record.video, str(e))
        if record.cond_image:
            try:
                read_image(self.path(record.cond_image))
            except VideoError as e:
                return Skip("missing" if e.kind == "missing" else "bad_image", record.cond_image, str(e))
        st = self.path(record.video).stat()
        return info, [st.st_size, st.st_mtime_ns]

    def __len__(self):
        return len(self.items)

    def segment_seconds(self):
        """Time from one segment's start to the next's."""
        return (self.frames_per_scene - self.overlap) / self.fps

    def decode_item(self, i):
        """(video `[3, F, H, W]`, condition `[3, 1, H, W]`, captions) of item i; raises Skipped."""
        w = self.items[i]
        record = self.records[w.clip]
        size = (w.bucket.height, w.bucket.width)
        try:
            frames = decode(self.path(record.video), self.fps,
                            clip_frames(w.bucket.segments, self.frames_per_scene, self.overlap),
                            start=w.first * self.segment_seconds(), size=size)
        except VideoError as e:
            raise Skipped(Skip(e.kind, record.video, str(e))) from None
        video = to_tensor(frames)
        if record.cond_image:
            try:
                cond = to_tensor(read_image(self.path(record.cond_image), size)[None])
            except VideoError as e:
                raise Skipped(Skip("missing" if e.kind == "missing" else "bad_image", record.cond_image,
                                   str(e))) from None
        else:
            cond = video[:, :1].clone()
        return video, cond, self.captions(i)

    def captions(self, i):
        """One per segment; with `data.scene_markers` the window's scenes are delimited (`mark_scenes`),
        the window's first segment opening one as a sampled video's does."""
        w, record = self.items[i], self.records[self.items[i].clip]
        segments = range(w.first, w.first + w.bucket.segments)
        captions = [record.caption(s) for s in segments]
        return mark_scenes(captions, [record.starts_scene(s) for s in segments]) if self.scene_markers else captions

    def task(self, i, draw):
        return task_for(self.records[self.items[i].clip].task, self.i2v_ratio, self.seed, draw)

    def __getitem__(self, draw):
        i = draw % len(self.items)
        skipped = []
        same = self._same_bucket[self.items[i].bucket]
        start = self._position[i]
        for j in same[start:] + same[:start]:
            if j in self._bad:
                skipped.append(self._bad[j])
                continue
            try:
                video, cond, captions = self.decode_item(j)
            except Skipped as e:
                self._bad[j] = e.skip
                skipped.append(e.skip)
                continue
            task = self.task(j, draw)
            return {"video": video, "captions": captions, "task": task,
                    "cond_image": cond if task == "i2v" else torch.zeros_like(cond), "skipped": skipped}
        raise DataError(f"no clip of bucket {self.items[i].bucket} could be decoded; last: {skipped[-1]}")

    def batch_sampler(self, start, stop, batch_size, rank=0, world=1):
        return BucketBatchSampler(self.buckets, batch_size, start, stop, self.seed, rank, world)


def collate(items):
    """Stack tensors (videos, latents, conditions, text) to `[B, ...]`; other values become lists
    (captions: B lists of one caption per segment); `skipped` lists are joined."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "skipped":
            batch[key] = [s for v in values for s in v]
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class EpochReport:
    """Counts the skips that batches carry and prints a summary at the end of every epoch of a
    bucket sampler (the skips found when the dataset was built count in every epoch)."""

    def __init__(self, dataset, sampler):
        self.base = getattr(dataset, "report", None)
        self.steps = getattr(sampler, "steps_per_epoch", None)
        self.size = len(dataset)
        self.current = self.base.child() if self.base is not None else None

    def update(self, step, batch):
        if self.current is None:
            return
        for skip in batch.get("skipped", []):
            self.current.add(skip)
        if self.steps and step % self.steps == 0:
            tqdm.write(f"epoch {step // self.steps}: {self.size} items, {self.current.summary()}")
            self.current = self.base.child()

    def close(self, step):
        if self.current is not None and self.steps and step % self.steps:
            tqdm.write(f"epoch {step // self.steps + 1} (stopped at step {step}): {self.size} items, "
                       f"{self.current.summary()}")
