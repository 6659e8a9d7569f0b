import json

from ttt_video.eval.bench_quality import match_parameters, num_params, run
from ttt_video.presets import get_preset

from ..train.test_trainer import TINY


def test_match_parameters_reaches_the_target_within_one_mlp_unit():
    target = num_params(get_preset("shapes-tiny").model)  # ttt-mlp
    cfg = get_preset("shapes-tiny").model
    cfg.seq_mixer = "attention"
    got = match_parameters(cfg, target)
    per_unit = (2 * cfg.dim + 1) * cfg.depth  # one more hidden unit in every block's MLP
    assert 0 <= got - target < per_unit and cfg.mlp_ratio > 4.0


def test_quality_benchmark_end_to_end(tmp_path):
    results, table = run(tmp_path, mixers=("attention", "ttt-linear"), seeds=(0,), steps=1, extend_steps=1,
                         num_videos=1, overrides=[*TINY, "train.tensorboard=false"], progress=False)
    assert set(results) == {"attention", "ttt-linear"}
    assert abs(results["attention"]["params"] - results["ttt-linear"]["params"]) < (2 * 32 + 1) * 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["attention"]["runs"][0]["scores"]) == {"2", "6"}  # training length and 3x
    assert table.count("\n") == 2 + 4 and (tmp_path / "README.md").read_text() == table


def test_finished_runs_are_not_trained_again(tmp_path, monkeypatch):
    import ttt_video.eval.bench_quality as bq

    args = dict(mixers=("attention",), seeds=(0,), steps=1, extend_steps=1, num_videos=1,
                overrides=[*TINY, "train.tensorboard=false"], progress=False)
    first, _ = run(tmp_path, **args)
    monkeypatch.setattr(bq, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    again, _ = run(tmp_path, **args)
    assert again == first


def test_unfinished_runs_start_again_from_scratch(tmp_path):
    args = dict(mixers=("attention",), seeds=(0,), steps=1, extend_steps=1, num_videos=1,
                overrides=[*TINY, "train.tensorboard=false"], progress=False)
    stale = tmp_path / "runs" / "attention-0"
    stale.mkdir(parents=True)
    (stale / "loss.jsonl").write_text('{"step": 7, "loss": 9.0}\n')  # a run killed before its scores
    run(tmp_path, **args)
    assert [json.loads(line)["step"] for line in (stale / "loss.jsonl").read_text().splitlines()] == [1]


def test_parallel_runs_in_processes_give_the_same_table(tmp_path):
    args = dict(mixers=("attention", "ttt-linear"), seeds=(0,), steps=1, extend_steps=1, num_videos=1,
                overrides=[*TINY, "train.tensorboard=false", "train.device=cpu"], progress=False)
    one, table = run(tmp_path / "one", **args)
    both, parallel_table = run(tmp_path / "both", jobs=2, **args)
    assert both == one and parallel_table == table
    assert (tmp_path / "both" / "runs" / "ttt-linear-0.log").is_file()


def test_a_scored_first_phase_goes_on_with_the_extension_only(tmp_path, monkeypatch):
    import ttt_video.eval.bench_quality as bq

    args = dict(mixers=("attention",), seeds=(0,), steps=1, extend_steps=1, num_videos=1,
                overrides=[*TINY, "train.tensorboard=false"], progress=False)
    first, _ = run(tmp_path, **args)
    scores_file = tmp_path / "runs" / "attention-0" / "scores.json"
    scores = json.loads(scores_file.read_text())
    scores_file.write_text(json.dumps({"2": scores["2"]}))  # the extension was interrupted
    trained = []
    real_train = bq.train
    monkeypatch.setattr(bq, "train", lambda cfg, folder, **k: trained.append(str(folder)) or real_train(cfg, folder, **k))
    again, _ = run(tmp_path, **args)
    assert trained == [str(tmp_path / "runs" / "attention-0-long")]
    assert again["attention"]["runs"][0]["scores"]["2"] == scores["2"]
    assert set(json.loads(scores_file.read_text())) == {"2", "6"}
