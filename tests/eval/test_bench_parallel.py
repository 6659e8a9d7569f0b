import json

from ttt_video.cli import main

from ..train.test_trainer import TINY


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, capsys):
    sets = [a for s in TINY for a in ("--set", s)]
    code = main(["bench", "parallel", *sets, "--steps", "3", "--global-batch", "2", "--device", "cpu",
                 "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "summary.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "FSDP runs on GPUs only" in out and "DDP x2" in out and "efficiency" in out
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert set(rows) == {"single", "ddp"} and len(rows["ddp"]["losses"]) == 3
    assert rows["ddp"]["max_abs_loss_diff"] < 1e-4 and rows["ddp"]["seconds_per_step"] > 0


def test_global_batch_must_split(capsys):
    assert main(["bench", "parallel", "--global-batch", "3", "--num-processes", "2"]) == 2
    assert "does not split over 2 processes" in capsys.readouterr().err
