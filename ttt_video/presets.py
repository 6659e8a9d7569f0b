"""Named recipes: each a function returning a full `Config`."""

from .config import Config, ConfigError


def shapes_tiny():
    """The bundled demo: a ~2M-parameter TTT-MLP video DiT on synthetic shape storyboards, 32x32 pixels,
    3 scenes of 8 frames (one segment each), MiniLM captions. Runs on a CPU; the bundled model
    was trained on one GPU with these settings (README, "The bundled model")."""
    cfg = Config()
    cfg.train.max_steps = 2500
    cfg.train.batch_size = 32
    cfg.train.warmup_steps = 100
    return cfg


PRESETS = {
    "shapes-tiny": shapes_tiny,
}


def get_preset(name):
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None
