"""`unitscale train` / `unitscale demo` command lines: errors list valid names, resume through the CLI."""

from __future__ import annotations

import argparse
import json
import re

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


# --config FILE.toml, --help -------------------------------------------------------------------------------

def test_config_file_keys_are_the_options_and_flags_override_them(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "conv"\nsteps = 300\nbatch-size = 8\nseq_len = 32\nlr = 1\nquiet = true\n'
                    'out = "runs/x"\n[set]\nd_model = 64\ntie_embeddings = true\n')
    args = build_parser().parse_args(["train", "--config", str(toml), "--steps", "50", "--set", "n_layers=1"])
    cfg = train_cmd.config_from_args(args)
    assert (cfg.model, cfg.steps, cfg.batch_size, cfg.seq_len, cfg.lr, cfg.quiet, cfg.out_dir) == (
        "conv", 50, 8, 32, 1.0, True, "runs/x")
    assert cfg.model_overrides == {"d_model": 64, "tie_embeddings": True, "n_layers": 1}


@pytest.mark.parametrize(("text", "match"), [
    ("stepz = 3\nbatch = 2\n", r"unknown key\(s\) batch, stepz; accepted: .*batch-size"),
    ('steps = "many"\n', r"--config key 'steps': expected int, got 'many'"),
    ("steps = 2.5\n", r"--config key 'steps': expected int, got 2.5"),
    ('parallel = "tpu"\n', r"'tpu' is not one of none, ddp, fsdp"),
    ("quiet = 1\n", "expected true or false"),
    ("steps = [\n", "is not valid TOML"),
])
def test_config_file_errors_name_the_key_and_what_is_accepted(tmp_path, capsys, text, match):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "r").exists()


def test_help_lists_models_and_recipes_and_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside a name such as fp16-sim-loss-scaled
    from unitscale.cli import HelpFormatter, _command_modules
    from unitscale.models import MODEL_NAMES
    from unitscale.precision import RECIPE_NAMES

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = HelpFormatter("x")._get_help_string(action)
            assert "default" in text and "default None" not in text and "default: None" not in text, (
                name, action.option_strings, text)
    assert set(sub.choices) == set(_command_modules())
    text = " ".join(sub.choices["train"].format_help().split())
    assert f"one of {', '.join(MODEL_NAMES)}" in text and f"one of {', '.join(RECIPE_NAMES)}" in text


def test_help_in_a_subprocess_shows_the_recipes(tmp_path):
    import os
    import subprocess
    import sys

    from unitscale.precision import RECIPE_NAMES

    proc = subprocess.run([sys.executable, "-m", "unitscale.cli", "train", "--help"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "1000"})
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert ", ".join(RECIPE_NAMES) in text and "fp16-sim-loss-scaled" in text
    assert "--overwrite replace the run already in OUT (default off" in text


def test_ops_doc_outside_the_repository_needs_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ops-doc"]) == 2
    assert "--out FILE" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists()
    assert main(["ops-doc", "--out", "ops.md"]) == 0 and (tmp_path / "ops.md").is_file()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "unitscale"\n')  # the repository's root
    assert main(["ops-doc"]) == 0 and (tmp_path / "docs" / "ops.md").is_file()
