"""Bad data is skipped with one warning each and counted; with `strict`, the first one is an error."""

import sys
from collections import Counter
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..errors import UserError

KINDS = {
    "bad_line": "malformed manifest line",
    "missing": "missing file",
    "corrupt": "corrupt video",
    "truncated": "truncated video",
    "too_short": "clip too short",
    "bad_image": "unreadable image",
}


class DataError(UserError):
    """Bad data under `strict`, or no usable data at all."""


@dataclass(frozen=True)
class Skip:
    kind: str  # a key of KINDS
    where: str  # a file, or "manifest.jsonl:12"
    reason: str

    def __str__(self):
        return f"{KINDS[self.kind]}: {self.where}: {self.reason}"


class SkipReport:
    """Skips counted once per (kind, where). Reports made by `child()` share the set of warned
    files, so a file is warned about once per run but counted in every epoch it is missing from."""

    def __init__(self, strict=False, warned=None, stream=None):
        self.strict = strict
        self.skips = {}
        self._warned = set() if warned is None else warned
        self._stream = stream

    def add(self, skip):
        if self.strict:
            raise DataError(f"{skip} (strict mode)")
        key = (skip.kind, skip.where)
        if key not in self._warned:
            self._warned.add(key)
            tqdm.write(f"warning: skipped {skip}", file=self._stream or sys.stderr)
        self.skips.setdefault(key, skip)

    def child(self):
        """A report that starts with these skips and warns only about new files."""
        report = SkipReport(self.strict, self._warned, self._stream)
        report.skips = dict(self.skips)
        return report

    def counts(self):
        return Counter(skip.kind for skip in self.skips.values())

    def __len__(self):
        return len(self.skips)

    def summary(self):
        counts = self.counts()
        if not counts:
            return "skipped 0"
        parts = ", ".join(f"{counts[k]} {KINDS[k]}" for k in KINDS if counts[k])
        return f"skipped {len(self.skips)} ({parts})"
