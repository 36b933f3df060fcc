"""`unitscale train` / `unitscale demo` command lines: errors list valid names, resume through the CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from unitscale.cli import build_parser, main
from unitscale.commands import train as train_cmd


@pytest.mark.parametrize(("flag", "value", "listed"), [
    ("--precision", "fp7", "accepted: fp32, bf16"),
    ("--optimizer", "lamb", "accepted: adamw, adam, sgd"),
    ("--scaling", "half", "accepted: unit, standard"),
])
def test_unknown_names_list_valid_ones(tmp_path, text_file, capsys, flag, value, listed):
    rc = main(["train", flag, value, "--data", str(text_file), "--steps", "1", "--out", str(tmp_path / "r"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and repr(value) in err and listed in err, err


def test_unknown_model_lists_valid_ones(tmp_path, text_file, capsys):
    models = pytest.importorskip("unitscale.models", reason="unitscale.models not importable yet")
    rc = main(["train", "--model", "gpt9", "--data", str(text_file), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "'gpt9'" in err and ", ".join(models.MODEL_NAMES) in err


def test_missing_data_file_and_bad_set(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="KEY=VALUE"):
        train_cmd.parse_overrides(["d_model"])
    assert train_cmd.parse_overrides(["d_model=32", "tau_mlp=0.25", "norm=post"]) == {
        "d_model": 32, "tau_mlp": 0.25, "norm": "post"}


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "drop --resume" in capsys.readouterr().err


def test_config_from_args_resume_keeps_saved_config(tmp_path, monkeypatch):
    from unitscale.train import loop

    saved = loop.TrainConfig(model="conv", lr=0.5, steps=10, model_overrides={"d_model": 32})
    monkeypatch.setattr(loop, "config_from_checkpoint", lambda out: saved)
    args = build_parser().parse_args(["train", "--resume", "--steps", "20", "--set", "n_layers=1",
                                      "--out", str(tmp_path)])
    cfg = train_cmd.config_from_args(args)
    assert (cfg.model, cfg.lr, cfg.steps, cfg.resume) == ("conv", 0.5, 20, True)
    assert cfg.model_overrides == {"d_model": 32, "n_layers": 1}


def test_train_cli_end_to_end_with_resume(tmp_path, text_file, capsys):
    pytest.importorskip("unitscale.models", reason="unitscale.models not importable yet")
    out = tmp_path / "run"
    common = ["--data", str(text_file), "--out", str(out), "--quiet"]
    args = ["train", "--model", "gpt", "--precision", "fp32", "--steps", "2", "--warmup", "1", "--batch-size",
            "2", "--seq-len", "8", "--eval-windows", "2", "--set", "d_model=16", "--set", "n_layers=1"]
    assert main(args + common) == 0
    assert main(["train", "--resume", "--steps", "3"] + common) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 3
    assert "finished: step 3" in capsys.readouterr().out


def test_demo_parser_defaults():
    args = build_parser().parse_args(["demo"])
    assert isinstance(args, argparse.Namespace) and args.steps == 150 and args.reference is True
