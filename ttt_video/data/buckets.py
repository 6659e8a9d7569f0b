"""Buckets and the bucket-aware batch sampler.

A bucket is (height, width, segments): a clip goes to the resolution whose aspect ratio is
nearest its own, and each window of consecutive segments is one item of `segments` segments.
Every batch holds items of one bucket, so videos stack without padding.

The sampler is deterministic in (seed, batch number), so batch i is the same whichever process
asks for it, and a resumed run continues exactly. It yields *draw indices*
`epoch * num_items + item`; datasets take the item modulo their length and seed per-draw
randomness (the i2v choice, the latent sample) with the full draw index.
"""

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int
    segments: int

    def __str__(self):
        return f"{self.height}x{self.width}x{self.segments}"


def parse_size(text, what="bucket"):
    """"576x1024" -> (576, 1024) as (height, width); another form raises `UserError` naming `what`."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m[1]) == 0 or int(m[2]) == 0:
        raise UserError(f"{what} {text.strip()!r} is not HEIGHTxWIDTH (e.g. 576x1024)")
    return int(m[1]), int(m[2])


def parse_resolutions(text, default):
    """"576x1024,1024x576" -> [(576, 1024), (1024, 576)] as (height, width); empty -> [default]."""
    if not text.strip():
        return [tuple(default)]
    return [parse_size(part) for part in text.split(",")]


def nearest_resolution(height, width, resolutions):
    """The resolution whose aspect ratio is nearest (in log ratio) to height x width; ties go to
    the first listed."""
    aspect = math.log(width / height)
    return min(resolutions, key=lambda r: abs(math.log(r[1] / r[0]) - aspect))


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches `start` ... `stop - 1` of an endless sequence of epochs. In each epoch every bucket's
    items are shuffled and cut into batches, the last one filled up by wrapping around its bucket
    (a bucket smaller than a batch repeats items), and the batch order is shuffled. Process `rank`
    of `world` takes global batches micro * world + rank, as the trainer's `StepBatches` does."""

    def __init__(self, buckets, batch_size, start, stop, seed=0, rank=0, world=1):
        if not buckets:
            raise UserError("no usable items: every clip was skipped (see the warnings above)")
        self.num_items, self.batch_size = len(buckets), batch_size
        self.start, self.stop, self.seed = start, stop, seed
        self.rank, self.world = rank, world
        groups = {}
        for i, b in enumerate(buckets):
            groups.setdefault(b, []).append(i)
        self.groups = [np.array(groups[b]) for b in sorted(groups)]
        self.batches_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / world)
        self._epoch = (None, None)

    def __len__(self):
        return max(0, self.stop - self.start)

    def epoch_batches(self, epoch):
        if self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for items in self.groups:
                n = math.ceil(len(items) / self.batch_size) * self.batch_size
                order = np.resize(rng.permutation(items), n)
                batches.extend(order.reshape(-1, self.batch_size))
            batches = [batches[j] for j in rng.permutation(len(batches))]
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def indices(self, micro):
        epoch, j = divmod(micro * self.world + self.rank, self.batches_per_epoch)
        return [int(epoch * self.num_items + i) for i in self.epoch_batches(epoch)[j]]

    def __iter__(self):
        for micro in range(self.start, self.stop):
            yield self.indices(micro)
