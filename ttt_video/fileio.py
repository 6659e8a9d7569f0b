"""Users' files: atomic writes (beside the destination under a temporary name, then renamed), and
reads of JSON and safetensors files that name the file in one line when it cannot be used."""

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import UserError


def _mode(base):
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def atomic_file(path, write):
    """Call `write(tmp_path)`, then move the result to `path`; a failure leaves `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_json(path, what, error=UserError):
    """Parse a user's JSON file; a missing or malformed file raises `error` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from None


def write_text_atomic(path, text):
    return atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def temp_dir_beside(path):
    """An empty folder beside `path` (same file system) to assemble a directory in."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(tmp, _mode(0o777))
    return tmp


def safetensors_files(folder, name):
    """The weight files of a model folder: `name` (e.g. model.safetensors), or the shards that
    `name`.index.json lists; a missing file raises `UserError` naming it."""
    folder = Path(folder)
    if (folder / name).is_file():
        return [folder / name]
    index = name + ".index.json"
    if not (folder / index).is_file():
        raise UserError(f"model folder {folder} is missing {name} (or {index})")
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{folder / index} is not a safetensors index (no weight_map)") from None
    files = [folder / shard for shard in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise UserError(f"model folder {folder} is missing {file.name} (listed in {index})")
    return files


def open_safetensors(path, what):
    """`safe_open` a safetensors file (its header is checked, the tensors are read on demand); a
    missing, truncated or non-safetensors file raises `UserError` naming `what` and the file."""
    try:
        return safe_open(str(path), "pt")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable safetensors file ({e})") from None


def read_safetensors(path, what):
    """Every tensor of a safetensors file, as `open_safetensors` checks it."""
    with open_safetensors(path, what) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_state_dict(state, expected, path):
    """Refuse weights `state` read from `path` that do not fit a model whose state dict is
    `expected`: the first tensor whose shape differs (with how many do), else the first missing
    or unknown name."""
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path} does not fit the model: {k} has shape {tuple(state[k].shape)}, the model's is "
                        f"{tuple(expected[k].shape)} ({len(wrong)} of {len(expected)} tensors differ in shape)")
    if missing:
        raise UserError(f"{path} does not fit the model: it lacks {missing[0]} ({len(missing)} of {len(expected)} "
                        "tensors missing)")
    if unknown:
        raise UserError(f"{path} does not fit the model: it has {unknown[0]}, which the model lacks ({len(unknown)} "
                        "unknown tensors)")
