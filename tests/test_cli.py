"""The command line end to end on a tiny local model directory (no download)."""

import json
from pathlib import Path

import pytest

from qlr.cli import main


@pytest.fixture
def text_file(tmp_path: Path, sample_text: str) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(sample_text * 6)
    return p


def test_compress_inspect_eval(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "ck"
    rc = main(["compress", "--model", str(model_dir), "--method", "caldera", "--bits", "2", "--rank", "8",
               "--calib-text", str(text_file), "--calib-samples", "4", "--seqlen", "64", "--out", str(out),
               "--opt", "outer_iters=2", "--opt", "inner_iters=2"])
    assert rc == 0
    assert "compressed 14 linears with caldera" in capsys.readouterr().out
    assert not (tmp_path / "ck.partial").exists()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "measured from file" in text and "model.layers.1.mlp.down_proj" in text
    res = tmp_path / "res.json"
    assert main(["eval", str(out), "--text", str(text_file), "--seqlen", "64", "--json", str(res)]) == 0
    got = json.loads(res.read_text())
    assert got["perplexity"] > 1 and got["fp_perplexity"] > 1


def test_fractional_rank_and_budget(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "ck"
    assert main(["compress", "--model", str(model_dir), "--method", "lorc", "--bits", "3", "--rank", "0.1",
                 "--calib-text", str(text_file), "--calib-samples", "2", "--seqlen", "64", "--out", str(out)]) == 0
    cfg = json.loads((out / "qlr_config.json").read_text())
    ranks = {layer["name"].split(".")[-1]: layer["meta"]["rank"] for layer in cfg["layers"]}
    assert ranks["q_proj"] == 6 and ranks["k_proj"] == 3  # round(0.1 · min(m, n)): 64-wide q, 32-wide k


def test_clear_errors(tmp_path, text_file, capsys):
    assert main(["compress", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a known name" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    (tmp_path / "o.partial").mkdir()
    with pytest.raises(SystemExit, match="--resume"):
        main(["compress", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])


def test_methods_lists_everything(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("odlri", "caldera", "qera-exact", "srr", "loftq"):
        assert name in out


def test_demo_prints_the_comparison(model_dir, text_file, capsys):
    rc = main(["demo", "--quick", "--model", str(model_dir), "--calib-text", str(text_file), "--text", str(text_file),
               "--seqlen", "64"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FP (dequantized GGUF)" in out and "RTN 2-bit g32" in out and "ODLRI" in out
    assert "| model | bits/weight (all-in) | perplexity | compress time (s) |" in out
