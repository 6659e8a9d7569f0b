"""`ttt-video` command line: parses, builds a config, calls one function per subcommand.

A user's mistake ends with one line on stderr and exit status 2, never a traceback.
"""

import os
import sys
import tempfile
from pathlib import Path

from .errors import UserError as UsageError
from .errors import ArgumentParser, check_positive, flag

EXIT_USAGE = 2
TEXT_SHORTCUTS = ("t5_model", "llm_model", "llm_dtype", "llm_max_length", "llm_hidden_size")


VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")
MODEL_FLAGS = ("ttt_checkpoint", "ttt", "sampler", "height", "width", "dynamic_cfg", "vae_tiling")  # generate --model
BUILT_IN_FLAGS = ("text_cache", "window", "overlap", "image")  # generate without --model, beside --checkpoint


def _check_writable(path, folder=False, suffixes=()):
    """Fail now, not after an hour of work, if `path` (a file, or with `folder` a folder) cannot be
    written; a file's name must end in one of `suffixes` where given. Nothing is created (folders
    appear when the output is written): the nearest existing folder must take new files."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} is a file")
    if not folder and path.is_dir():
        raise UsageError(f"output path {path} is a directory")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"output path {path} must end in {' or '.join(suffixes)}")
    where = path if folder else path.parent
    existing = next(p for p in (where, *where.parents) if p.exists())  # where the missing folders will be made
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {path}: {e.strerror or e}") from None


def _load_config(args, shortcuts=()):
    """The preset (or `--config` file) with `shortcuts`, then `--set` overrides, applied."""
    from . import config as config_lib
    from .presets import get_preset

    cfg = config_lib.load(args.config) if getattr(args, "config", None) else get_preset(args.preset)
    return config_lib.validate(config_lib.apply_overrides(cfg, [*shortcuts, *args.set]))


def _refuse_flags(args, names, reason):
    """A flag given where it has no effect is refused, not ignored."""
    for name in names:
        if getattr(args, name) not in (None, False):
            raise UsageError(f"{flag(name)} {reason}")


def _check_captions(captions):
    for i, caption in enumerate(captions, 1):
        if not caption.strip():
            raise UsageError(f"caption {i} is empty")


def cmd_train(args):
    from .train.checkpoint import resolve
    from .train.trainer import train

    shortcuts = [f"data.{name}={getattr(args, name)}" for name in TEXT_SHORTCUTS if getattr(args, name) is not None]
    cfg = _load_config(args, shortcuts)
    _set_external_vae(cfg.data, args)
    out = Path(args.output_dir or f"runs/{args.preset}")
    resume = None
    if args.resume == "auto":
        resume = out if (out / "last").is_file() else None
    elif args.resume:
        resume = resolve(args.resume)
    _check_writable(out, folder=True)
    last = train(cfg, out, resume=resume, progress=not args.no_progress, text_cache=args.text_cache)
    if last is not None:  # the main process of a distributed run
        print(f"checkpoint: {last}")
        print(f"loss log: {out / 'loss.jsonl'}")


def cmd_plan(args):
    from .train.plan import format_plan, measure, parse_memory, plan, with_recompute
    from .train.trainer import resolve_device

    budget = parse_memory(args.gpu_memory)
    cfg = _load_config(args)
    device = resolve_device(args.device, "--device")
    if args.measure and not device.startswith("cuda"):
        raise UsageError("--measure reads the CUDA allocator's peak: it needs a CUDA device")
    rows, proposal = plan(cfg, budget)
    measured = None
    if args.measure:
        import torch

        free = torch.cuda.mem_get_info(torch.device(device))[0]
        measured = {}
        for r in rows:  # only what the estimate says this card holds: an out-of-memory error proves nothing
            if r.total <= 0.9 * free:
                measured[r.batch_size, *r.recompute] = measure(with_recompute(cfg, r.parts, r.offload), r.batch_size,
                                                               r.checkpointing, device)[0]
                torch.cuda.empty_cache()
    print(format_plan(cfg, rows, proposal, budget, measured))


def cmd_export_lora(args):
    from .train.lora_export import export_lora

    _check_writable(args.out, folder=True)
    print(f"LoRA weights: {export_lora(args.checkpoint, args.out)}")


def cmd_generate_cogvideox(args):
    from .sample.cogvideox import generate

    if args.prompts or not args.storyboard:
        raise UsageError("--model takes its captions from --storyboard FILE.json (one entry per 3 s segment)")
    if args.checkpoint or args.num_frames is not None:
        raise UsageError("with --model, use --ttt-checkpoint and --seconds (not --checkpoint or --num-frames)")
    _refuse_flags(args, BUILT_IN_FLAGS, "applies to the built-in models, not with --model")
    if args.ttt_checkpoint:
        _refuse_flags(args, ("ttt",), "picks the kind of fresh TTT layers; a --ttt-checkpoint brings its own")
    else:
        _refuse_flags(args, ("ema",), "needs a --ttt-checkpoint from `ttt-video train` (the average is the run's)")
    check_positive(args, "seconds", "fps")
    if args.ttt_checkpoint and not Path(args.ttt_checkpoint).exists():
        raise UsageError(f"TTT checkpoint not found: {args.ttt_checkpoint}")
    device = _check_sampling(args)
    _check_writable(args.out, suffixes=VIDEO_SUFFIXES)
    result = generate(args.model, args.storyboard, seconds=args.seconds, out=args.out,
                      ttt_checkpoint=args.ttt_checkpoint, ttt=None if args.ttt == "none" else args.ttt or "mlp",
                      sampler=args.sampler, steps=args.steps or 50,
                      guidance_scale=6.0 if args.guidance_scale is None else args.guidance_scale,
                      dynamic_cfg=args.dynamic_cfg, height=args.height, width=args.width, fps=args.fps or 16,
                      seed=args.seed, device=device, progress=not args.no_progress,
                      vae_tiling=args.vae_tiling, ema=args.ema)
    _report(result)


def cmd_generate(args):
    from .sample.pipeline import generate, read_storyboard

    if args.model:
        return cmd_generate_cogvideox(args)
    _refuse_flags(args, MODEL_FLAGS, "applies only with --model (a CogVideoX folder)")
    captions = list(args.prompts)
    _check_captions(captions)
    if args.storyboard:
        if captions:
            raise UsageError("give prompts or --storyboard, not both")
        captions = read_storyboard(args.storyboard)
    if not captions and not args.image:
        raise UsageError("no prompts: give one caption per scene, or --storyboard FILE.json "
                         "(a Stable Video Diffusion model takes --image alone)")
    if args.num_frames is not None and args.seconds is not None:
        raise UsageError("give --num-frames or --seconds, not both")
    check_positive(args, "seconds", "fps", "num_frames")
    if args.image and not Path(args.image).is_file():
        raise UsageError(f"image not found: {args.image}")
    device = _check_sampling(args)
    _check_writable(args.out, suffixes=VIDEO_SUFFIXES)
    result = generate(captions, checkpoint=args.checkpoint, num_frames=args.num_frames, seconds=args.seconds,
                      fps=args.fps, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                      out=args.out, device=device, progress=not args.no_progress,
                      text_cache=args.text_cache, window=args.window, overlap=args.overlap, image=args.image,
                      ema=args.ema)
    _report(result)


def _report(result):
    print(f"video: {result.video}")
    print(f"contact sheet: {result.sheet}")


def cmd_extend(args):
    from .sample.pipeline import extend

    if not Path(args.video).is_file():
        raise UsageError(f"video not found: {args.video}")
    if not args.prompts:
        raise UsageError("no prompts: give one caption per new scene")
    _check_captions(args.prompts)
    check_positive(args, "seconds", "num_frames")
    device = _check_sampling(args)
    _check_writable(args.out, suffixes=VIDEO_SUFFIXES)
    _report(extend(args.video, args.prompts, checkpoint=args.checkpoint, num_frames=args.num_frames,
                   seconds=args.seconds, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                   out=args.out, window=args.window, overlap=args.overlap, device=device,
                   progress=not args.no_progress, text_cache=args.text_cache, ema=args.ema))


def cmd_cache_text(args):
    from .data.synthetic import all_captions
    from .encoders.text import build_text_encoder, save_text_cache, text_settings

    cfg = _load_config(args)
    if cfg.data.source != "synthetic":
        raise UsageError("cache-text enumerates captions of the synthetic source only")
    _check_writable(args.out, suffixes=(".safetensors",))
    encoder = build_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, data_cfg=cfg.data)
    path = save_text_cache(encoder, all_captions(), args.out, text_settings(cfg.data))
    print(f"text cache: {path}")


def cmd_prepare(args):
    from .data.cache import prepare
    from .encoders.pipeline import fill_from_pipeline
    from .train.trainer import resolve_device

    device = resolve_device(args.device, "--device")
    cfg = _load_config(args)
    data = cfg.data
    data.source = "manifest"
    for key in ("data_root", "manifest", "buckets", "vae"):
        if getattr(args, key) is not None:
            setattr(data, key, getattr(args, key))
    _set_external_vae(data, args)
    data.strict = data.strict or args.strict
    data = fill_from_pipeline(cfg).data  # the T5 and VAE of model.pretrained's pipeline, as `train` takes them
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    _check_writable(args.out, folder=True)
    result = prepare(data, args.out, workers=args.workers, device=device,
                     progress=not args.no_progress)
    print(result.report.summary())
    print(f"cache: {result.out} ({result.items} items, {result.new} new)")


def _set_external_vae(data, args):
    """--vae-module, --vae-class, --vae-init-json: an external VAE (docs/vae.md)."""
    given = {k: getattr(args, k) for k in ("vae_module", "vae_class", "vae_init_json") if getattr(args, k)}
    if given:
        data.vae = "external"
        for key, value in given.items():
            setattr(data, key, value)


def _vae_args(p):
    p.add_argument("--vae-module", help="external VAE: import path of its module (docs/vae.md)")
    p.add_argument("--vae-class", help="external VAE: the class in that module")
    p.add_argument("--vae-init-json", help="external VAE: its keyword arguments, a JSON object or file")


def cmd_evaluate(args):
    import json

    from .eval.evaluate import evaluate, format_scores
    from .fileio import write_text_atomic

    device = _check_sampling(args)
    if args.num_videos < 1:
        raise UsageError(f"--num-videos must be at least 1, got {args.num_videos}")
    if args.json:
        _check_writable(args.json)
    scores = evaluate(args.checkpoint, num_videos=args.num_videos, num_scenes=args.num_scenes, steps=args.steps,
                      guidance_scale=args.guidance_scale, seed=args.seed, device=device,
                      text_cache=args.text_cache, progress=not args.no_progress, ema=args.ema)
    if args.json:
        write_text_atomic(args.json, json.dumps(scores, indent=2) + "\n")
    print(f"{scores['num_videos']} held-out storyboards of {scores['num_scenes']} scenes: {format_scores(scores)}")


BENCHMARKS = {"ttt": "bench_ttt", "data": "bench_data", "seams": "seams", "quality": "bench_quality",
              "cogvideox": "bench_cogvideox", "parallel": "bench_parallel"}


def cmd_bench(args, rest):
    import importlib

    return importlib.import_module(f".eval.{BENCHMARKS[args.what]}", __package__).main(rest)


def _sampling_args(p):
    p.add_argument("--checkpoint", help="checkpoint or run folder (default: the bundled tiny model)")
    p.add_argument("--ema", action="store_true",
                   help="sample with the moving average of the weights the run kept (train.ema_decay)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's config)")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--text-cache", help="precomputed caption embeddings (optional; same result, faster)")
    p.add_argument("--no-progress", action="store_true")


def _window_args(p):
    p.add_argument("--window", type=int, help="frames per sampling window (sliding-window generation)")
    p.add_argument("--overlap", type=int, help="frames each window continues (default: one segment)")


def _check_sampling(args):
    """The checks every sampling command shares; returns the device (`--device`, resolved)."""
    from .train.trainer import resolve_device

    if args.checkpoint and not Path(args.checkpoint).exists():
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    check_positive(args, "steps")
    return resolve_device(args.device, "--device")


def _recipe_args(p, config=True):
    p.add_argument("--preset", default="shapes-tiny", help="named recipe (default: shapes-tiny)")
    if config:
        p.add_argument("--config", help="a config JSON (e.g. a checkpoint's config.json) instead of a preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")


def build_parser():
    p = ArgumentParser(prog="ttt-video", description="Long multi-scene video generation with TTT layers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a preset or config file")
    _recipe_args(t)
    t.add_argument("--output-dir", help="run folder (default: runs/<preset>)")
    t.add_argument("--resume", help="'auto' (the run folder's last checkpoint, if any) or a checkpoint path")
    t.add_argument("--text-cache", help="precomputed caption embeddings from `ttt-video cache-text`")
    t.add_argument("--t5-model", help="data.t5_model: a local T5/UMT5 folder (data.text_encoder t5 or t5+llm)")
    t.add_argument("--llm-model", help="data.llm_model: a local folder AutoModel loads (text_encoder llm, t5+llm)")
    t.add_argument("--llm-dtype", choices=["float32", "float16", "bfloat16"], help="data.llm_dtype")
    t.add_argument("--llm-max-length", type=int, help="data.llm_max_length: LLM tokens per caption")
    t.add_argument("--llm-hidden-size", type=int, help="data.llm_hidden_size (default: from the LLM's config)")
    t.add_argument("--local-files-only", action="store_true",
                   help="accepted for compatibility: models always load from local files, never a hub")
    t.add_argument("--no-progress", action="store_true")
    _vae_args(t)
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("plan", help="estimate training memory and propose batch, accumulation and checkpointing")
    _recipe_args(m)
    m.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 24GB, 80GiB, 24000MB")
    m.add_argument("--measure", action="store_true",
                   help="also run a few training steps of every fitting row on this CUDA device and print the peaks")
    m.add_argument("--device", default="auto")
    m.set_defaults(func=cmd_plan)

    lx = sub.add_parser("export-lora", help="write a LoRA checkpoint's weights in diffusers' format")
    lx.add_argument("checkpoint", help="checkpoint or run folder of a cogvideox-ttt run with train.adapter=lora")
    lx.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    lx.set_defaults(func=cmd_export_lora)

    c = sub.add_parser("cache-text", help="precompute the caption embeddings of a preset's synthetic data")
    _recipe_args(c, config=False)
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.set_defaults(func=cmd_cache_text)

    g = sub.add_parser("generate", help="generate a video, one caption per scene")
    g.add_argument("prompts", nargs="*", help="one caption per scene")
    g.add_argument("--storyboard", help="JSON list of segments (strings or {\"text\": ...})")
    g.add_argument("--seconds", type=float)
    g.add_argument("--fps", type=float, help="frames per second (default: the model's)")
    g.add_argument("--num-frames", type=int)
    g.add_argument("--out", default="outputs/video.mp4")
    g.add_argument("--model", help="a local CogVideoX diffusers folder (then captions come from --storyboard)")
    g.add_argument("--ttt-checkpoint", help="with --model: a CogVideoX-TTT checkpoint replacing its transformer "
                   "(CogVideoXTTT.save_pretrained, or a `train` checkpoint or run folder)")
    g.add_argument("--ttt", choices=["mlp", "linear", "none"],
                   help="with --model and no --ttt-checkpoint: the (untrained) TTT kind, or none (default: mlp)")
    g.add_argument("--sampler", choices=["ddim", "dpm"], help="with --model (default: the folder's scheduler)")
    g.add_argument("--height", type=int, help="with --model: pixels (default: the model's)")
    g.add_argument("--width", type=int, help="with --model: pixels (default: the model's)")
    g.add_argument("--dynamic-cfg", action="store_true", help="with --model: guidance rising over the steps")
    g.add_argument("--vae-tiling", action="store_true", help="with --model: decode in spatial tiles (diffusers' "
                   "VAE tiling and slicing): less decoder memory at large sizes, the whole video in memory once")
    g.add_argument("--image", help="an image the video starts from (a model trained with image conditioning, "
                                   "or Stable Video Diffusion: then no captions)")
    _sampling_args(g)
    _window_args(g)
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("extend", help="continue an existing video, window by window")
    x.add_argument("prompts", nargs="*", help="one caption per new scene")
    x.add_argument("--video", required=True, help="the clip to continue (mp4, ...)")
    x.add_argument("--seconds", type=float, help="length to add (default: one window of new segments)")
    x.add_argument("--num-frames", type=int, help="frames to add")
    x.add_argument("--out", default="outputs/extended.mp4")
    _sampling_args(x)
    _window_args(x)
    x.set_defaults(func=cmd_extend)

    d = sub.add_parser("prepare", help="precompute VAE latents and text embeddings of a manifest's videos")
    _recipe_args(d)
    d.add_argument("--data-root", help="folder the manifest's paths are relative to (default: the manifest's)")
    d.add_argument("--manifest", help="a .jsonl manifest or a metadata.json list")
    d.add_argument("--buckets", help="resolution buckets HxW,HxW,... (default: the config's height x width)")
    d.add_argument("--vae", help="'identity', a local diffusers VAE folder, or 'external' (below)")
    _vae_args(d)
    d.add_argument("--out", required=True, help="cache folder (a re-run skips what is done)")
    d.add_argument("--workers", type=int, default=0, help="decoding processes")
    d.add_argument("--device", default="auto")
    d.add_argument("--strict", action="store_true", help="stop at the first bad file or line")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_prepare)

    e = sub.add_parser("evaluate", help="sample held-out synthetic storyboards and score them")
    e.add_argument("--num-videos", type=int, default=64)
    e.add_argument("--num-scenes", type=int, help="scenes per storyboard (default: the training length)")
    e.add_argument("--json", help="also write the scores to this file")
    _sampling_args(e)
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("bench", help="benchmarks; `ttt-video bench ttt --help` for options")
    b.add_argument("what", choices=sorted(BENCHMARKS))
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in BENCHMARKS:  # its options, --help too, are the benchmark's
        args, rest = parser.parse_args(argv[:2]), argv[2:]
    else:
        args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        result = args.func(args, rest) if args.command == "bench" else args.func(args)
    except UsageError as e:
        print(f"ttt-video: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ttt-video: interrupted", file=sys.stderr)
        return 130
    return result or 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
