"""The other components of the diffusers pipeline a pretrained transformer comes from.

A CogVideoX pipeline folder holds `transformer/`, `text_encoder/` + `tokenizer/`, `vae/` and
`scheduler/`. When `model.pretrained` names such a folder (or its `transformer/`), settings left
empty take the pipeline's own components: `data.t5_model` (text encoder "t5" or "t5+llm"),
`data.vae`, and `diffusion.scheduler` (objective "v-prediction"). A pretrained transformer must
meet the text encoder, VAE and noise schedule it was trained with, so an empty setting with no
pipeline to take it from is an error naming the setting.
"""

import copy
from pathlib import Path

from ..errors import UserError
from ..fileio import read_json


def pipeline_root(pretrained):
    """The pipeline folder `pretrained` names or lies in (its parent, for a `transformer/` folder)."""
    folder = Path(pretrained)
    return folder if (folder / "transformer").is_dir() else folder.parent


def _component(root, setting, parts, hint):
    """`root` when it holds every one of `parts`; else an error naming `setting`."""
    if root is None:
        raise UserError(f"{setting} is not set and model.pretrained names no pipeline folder to take it from; "
                        f"set model.pretrained to a local diffusers pipeline folder, or {setting} {hint}")
    if not all((root / part).exists() for part in parts):
        raise UserError(f"{setting} is not set and the pipeline folder {root} has no {' and '.join(parts)}; "
                        f"set {setting} {hint}")
    return root


def fill_from_pipeline(cfg):
    """A copy of `cfg` whose empty text-encoder, VAE and scheduler settings name the components of
    the pipeline `cfg.model.pretrained` lies in."""
    cfg = copy.deepcopy(cfg)
    d, diffusion = cfg.data, cfg.diffusion
    root = pipeline_root(cfg.model.pretrained) if cfg.model.pretrained else None
    if d.text_encoder in ("t5", "t5+llm") and not d.t5_model:
        d.t5_model = str(_component(root, "data.t5_model", ["text_encoder/config.json", "tokenizer"],
                                    "to a local T5 folder"))
    if not d.vae:
        d.vae = str(_component(root, "data.vae", ["vae/config.json"],
                               "to a local VAE folder, 'identity' or 'external'") / "vae")
    if diffusion.objective == "v-prediction" and not diffusion.scheduler and root is not None:
        if (root / "scheduler" / "scheduler_config.json").is_file():
            diffusion.scheduler = str(root / "scheduler")
    return cfg


def spatial_compression(block_out_channels):
    """How much a diffusers VAE shrinks height and width: by 2 in every encoder block but the last."""
    return 2 ** (len(block_out_channels) - 1)


def resolution_factor(vae_folder, transformer_folder):
    """What a CogVideoX video's height and width must divide by: the VAE's spatial compression times
    the transformer's patch size, read from their config.json files."""
    vae = read_json(Path(vae_folder) / "config.json", "VAE config")
    patch = read_json(Path(transformer_folder) / "config.json", "transformer config").get("patch_size", 2)
    return spatial_compression(vae.get("block_out_channels", (0,))) * patch


def check_resolution(height, width, factor, prefix=""):
    """Height and width must be positive multiples of `factor`; the error names the nearest allowed
    values (`prefix` names the settings, e.g. "data.")."""
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % factor:
            low = max(factor, value // factor * factor)
            raise UserError(f"{prefix}{name} {value} must be a positive multiple of {factor} (VAE x patch size); "
                            f"nearest allowed: {low} or {low + factor}")
