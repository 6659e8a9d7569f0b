"""Manifest formats: which videos to train on and their captions.

JSONL, one object a line:
    {"video": "clips/a.mp4", "caption": "one caption for every segment"}
    {"video": "clips/b.mp4", "captions": ["segment 1", "segment 2", ...], "task": "i2v", "cond_image": "b.png"}
metadata.json, a list of objects:
    [{"video_path": "clips/a.mp4", "caption": "..."}, ...]
Either key ("video" or "video_path") and either caption form are accepted in both formats.
`task` ("t2v" or "i2v") fixes an item's task instead of drawing it with the i2v ratio;
`cond_image` is the condition of an i2v item (default: the clip's first frame). Paths are
relative to the data root. A malformed line is reported with its line number and skipped.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .report import Skip

TASKS = ("t2v", "i2v")


@dataclass(frozen=True)
class Record:
    video: str
    captions: tuple  # one per segment when `per_segment`, else one for every segment
    per_segment: bool
    task: str | None
    cond_image: str | None
    where: str  # "manifest.jsonl:12", for messages

    def caption(self, segment):
        return self.captions[segment] if self.per_segment else self.captions[0]


def parse_entry(obj, where):
    """A manifest object -> Record; raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object, got {type(obj).__name__}")
    video = obj.get("video", obj.get("video_path"))
    if not isinstance(video, str) or not video:
        raise ValueError('no "video" (or "video_path") string')
    if ("caption" in obj) == ("captions" in obj):
        raise ValueError('needs exactly one of "caption" and "captions"')
    if "caption" in obj:
        if not isinstance(obj["caption"], str):
            raise ValueError('"caption" must be a string')
        captions, per_segment = (obj["caption"],), False
    else:
        captions = obj["captions"]
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError('"captions" must be a non-empty list of strings')
        captions, per_segment = tuple(captions), True
    task = obj.get("task")
    if task is not None and task not in TASKS:
        raise ValueError(f'"task" must be "t2v" or "i2v", got {task!r}')
    cond = obj.get("cond_image")
    if cond is not None and (not isinstance(cond, str) or not cond):
        raise ValueError('"cond_image" must be a path string')
    return Record(video, captions, per_segment, task, cond, where)


def read_manifest(path, report):
    """Records of a .jsonl manifest or a .json list; malformed entries go to `report`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read manifest {path}: {e}") from None
    records = []
    if path.suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(entries, list):
            raise UserError(f"{path} must hold a list of objects")
        numbered = [(f"{path.name}[{i}]", obj, None) for i, obj in enumerate(entries)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path.name}:{n}", json.loads(line), None))
            except json.JSONDecodeError as e:
                numbered.append((f"{path.name}:{n}", None, f"not JSON ({e.msg})"))
    for where, obj, error in numbered:
        if error is None:
            try:
                records.append(parse_entry(obj, where))
                continue
            except ValueError as e:
                error = str(e)
        report.add(Skip("bad_line", where, error))
    return records
