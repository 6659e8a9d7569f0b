import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from safetensors.torch import load_file

from ttt_video.cli import main
from ttt_video.config import apply_overrides
from ttt_video.errors import UserError
from ttt_video.models import build_model
from ttt_video.presets import get_preset
from ttt_video.train import checkpoint as ckpt
from ttt_video.train.adapters import apply_adapter
from ttt_video.train.lora_export import LORA_FILE, export_lora

from ..models.test_cogvideox_ttt import TINY


def test_exported_lora_loads_into_a_diffusers_pipeline_and_gives_our_output(tmp_path, capsys):
    torch.manual_seed(0)
    reference = CogVideoXTransformer3DModel(**TINY, use_rotary_positional_embeddings=False).eval()
    reference.save_pretrained(tmp_path / "pretrained" / "transformer")
    cfg = apply_overrides(get_preset("cogvideox-5b-ttt-3s"), [
        f"model.pretrained={tmp_path / 'pretrained'}", "model.seq_mixer=attention", "train.adapter=lora",
        "train.lora_rank=4", "train.lora_alpha=8"])  # alpha / rank = 2: the scale must be folded in
    model = apply_adapter(build_model(cfg.model), "lora", 4, 8.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    ckpt.save_checkpoint(tmp_path / "run", 1, model, cfg)

    assert main(["export-lora", str(tmp_path / "run"), "--out", str(tmp_path / "lora")]) == 0
    assert f"LoRA weights: {tmp_path / 'lora' / LORA_FILE}" in capsys.readouterr().out
    keys = set(load_file(tmp_path / "lora" / LORA_FILE))
    assert "transformer.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in keys
    assert len(keys) == 2 * 4 * TINY["num_layers"]  # A and B of q, k, v, out in every block

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=reference,
                             scheduler=CogVideoXDDIMScheduler())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 13, 4, 8, 8, generator=g)
    text = torch.randn(1, TINY["max_text_seq_length"], 12, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        before = pipe.transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        pipe.load_lora_weights(tmp_path / "lora")
        after = pipe.transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        ours = model(x.transpose(1, 2), t, text[:, None]).transpose(1, 2)  # the package's layout
    assert (after - before).abs().max() > 1e-3  # the LoRA changed the output...
    assert (after - ours).abs().max() <= 1e-5  # ...to exactly ours


def test_export_refuses_other_checkpoints(tmp_path):
    from .test_trainer import tiny

    cfg = tiny(1)
    ckpt.save_checkpoint(tmp_path, 1, build_model(cfg.model), cfg)
    with pytest.raises(UserError, match="needs arch cogvideox-ttt trained with train.adapter=lora"):
        export_lora(tmp_path, tmp_path / "out")
