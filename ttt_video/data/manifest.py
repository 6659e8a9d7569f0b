"""Manifest formats: which videos to train on and their captions.

JSONL, one object a line:
    {"video": "clips/a.mp4", "caption": "one caption for every segment"}
    {"video": "clips/b.mp4", "captions": ["segment 1", "segment 2", ...], "task": "i2v", "cond_image": "b.png"}
    {"video": "clips/c.mp4", "captions": ["segment 1", "segment 2", ...], "transitions": [false, true, ...]}
metadata.json, a list of objects:
    [{"video_path": "clips/a.mp4", "caption": "..."}, ...]
Either key ("video" or "video_path") and either caption form are accepted in both formats.
`task` ("t2v" or "i2v") fixes an item's task instead of drawing it with the i2v ratio;
`cond_image` is the condition of an i2v item (default: the clip's first frame); `transitions`
(with `captions`, one each) marks the segments where a new scene starts, for `data.scene_markers`
(`mark_scenes`). Paths are relative to the data root. A malformed line is reported with its line
number and skipped.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .report import Skip

TASKS = ("t2v", "i2v")
SCENE_START, SCENE_END = "<start_scene>", "<end_scene>"


def mark_scenes(captions, starts):
    """Captions with scene delimiters, as TTT-Video writes storyboards: `<start_scene>` opens the
    first caption of every scene (the first caption, and each where `starts` is true) and
    `<end_scene>` closes the last."""
    starts = [i == 0 or bool(start) for i, start in enumerate(starts)]
    ends = starts[1:] + [True]
    return [f"{SCENE_START + ' ' if a else ''}{c}{' ' + SCENE_END if b else ''}"
            for c, a, b in zip(captions, starts, ends)]


@dataclass(frozen=True)
class Record:
    video: str
    captions: tuple  # one per segment when `per_segment`, else one for every segment
    per_segment: bool
    task: str | None
    cond_image: str | None
    where: str  # "manifest.jsonl:12", for messages
    transitions: tuple = ()  # per segment (with `per_segment`): a new scene starts there

    def caption(self, segment):
        return self.captions[segment] if self.per_segment else self.captions[0]

    def starts_scene(self, segment):
        return bool(self.transitions) and self.transitions[segment]


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
    transitions = obj.get("transitions", [])
    if not isinstance(transitions, list) or not all(isinstance(t, bool) for t in transitions):
        raise ValueError('"transitions" must be a list of true/false, one per caption')
    if transitions and (not per_segment or len(transitions) != len(captions)):
        raise ValueError('"transitions" needs "captions" and one entry per caption')
    return Record(video, captions, per_segment, task, cond, where, tuple(transitions))


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
