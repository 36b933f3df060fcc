"""Smoke tests of ``unitscale formats`` and ``unitscale snr`` through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from unitscale import cli


def test_formats_table(capsys, tmp_path):
    out_json = tmp_path / "formats.json"
    assert cli.main(["formats", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for text in ("fp8_e4b", "fp8_e5a", "int4", "float8_e4m3fn", "S.1111.111", "0x80 only", "57344", "2^-126"):
        assert text in out
    rows = {r["name"]: r for r in json.loads(out_json.read_text())}
    assert rows["fp8_e4b"]["max"] == 448.0 and rows["fp8_e4b"]["min_subnormal"] == 2.0**-9
    assert rows["int4"]["qmin"] == -8 and rows["tf32"]["torch_dtype"] is None


def test_snr_table_json_and_plot(capsys, tmp_path):
    png, js = tmp_path / "snr.png", tmp_path / "snr.json"
    argv = ["snr", "--samples", "65536", "--plot-samples", "1024", "--plot", str(png), "--json", str(js)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "fp8_e4b" in out and "int8, absmax" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    data = json.loads(js.read_text())
    assert abs(data["snr"]["fp8_e4b"]["db"] - 31.5) <= 1.0  # REFERENCE §3.2
    curves = data["curves"]
    assert len(curves["log2_sigma"]) == len(curves["sigma_db"]["fp16"]) == 41
    assert set(curves["outlier_db"]) == {
        "int8, absmax scale",
        "fp8 e4m3fn, absmax scale",
        "fp8 e4m3fn, no scale",
    }


def test_snr_without_plot_and_sigma(capsys):
    assert cli.main(["snr", "--samples", "4096", "--sigma", "0.001"]) == 0
    assert "σ = 0.001" in capsys.readouterr().out


def test_snr_bad_arguments(capsys):
    assert cli.main(["snr", "--samples", "1"]) == 2
    assert "--samples" in capsys.readouterr().err
    assert cli.main(["snr", "--samples", "64", "--sigma", "-1"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["formats", "--no-such-flag"])
