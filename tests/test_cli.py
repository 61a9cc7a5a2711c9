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
    capsys.readouterr()
    (tmp_path / "o.partial").mkdir()
    assert main(["compress", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "--resume" in capsys.readouterr().err


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


# --- user errors: one line on stderr, exit status 2, before any work ---------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the model is loaded or calibration starts."""
    import qlr.api
    import qlr.models.loading

    def boom(*a, **k):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(qlr.models.loading, "load_model", boom)
    monkeypatch.setattr(qlr.api, "calibration_batches", boom)


def _one_line_error(capsys) -> str:
    """The error line; it must be the only qlr line on stderr (a loading progress bar may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("qlr")]
    assert len(ours) == 1 and ours[0].startswith("qlr compress: error: ") and err.endswith(ours[0] + "\n"), err
    return ours[0]


@pytest.mark.parametrize("setup, match", [
    (lambda out: out.write_text("x"), "is an existing file"),
    (lambda out: (out.mkdir(), (out / "notes.txt").write_text("x")), "is a non-empty directory"),
    (lambda out: out.with_name("o.partial").mkdir(), "pass --resume"),
])
def test_out_is_checked_first(tmp_path, text_file, capsys, no_work, setup, match):
    out = tmp_path / "o"
    setup(out)
    rc = main(["compress", "--model", "smollm2-135m", "--calib-text", str(text_file), "--out", str(out)])
    assert rc == 2
    assert match in _one_line_error(capsys)


def test_out_with_resume(tmp_path):
    from qlr.cli import _check_out

    out = tmp_path / "o"
    out.mkdir()
    (out / "qlr_config.json").write_text("{}")  # an earlier checkpoint: --resume may replace it
    (out / "model.safetensors").write_text("")
    _check_out(out, resume=True)
    (out / "qlr_config.json").unlink()
    with pytest.raises(ValueError, match="not a qlr checkpoint"):
        _check_out(out, resume=True)
    _check_out(tmp_path / "new", resume=False)
    (tmp_path / "empty").mkdir()
    _check_out(tmp_path / "empty", resume=False)


def test_budget_below_q_cost(tmp_path, model_dir, text_file, capsys, monkeypatch):
    import qlr.api

    def boom(*a, **k):
        raise AssertionError("calibration started before the budget was checked")

    monkeypatch.setattr(qlr.api, "calibration_batches", boom)
    rc = main(["compress", "--model", str(model_dir), "--method", "caldera", "--budget", "1.0",
               "--calib-text", str(text_file), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "budget 1.0 bits/weight is below what Q alone costs" in err
    assert "smallest feasible budget for this model is 2." in err and "model.layers." in err
    assert not (tmp_path / "o").exists()


def test_binary_calibration_file_is_named(tmp_path, capsys, no_work):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(128, 256)))
    rc = main(["compress", "--calib-text", str(blob), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert f"{blob} is not a UTF-8 text file (it looks binary" in err


@pytest.mark.parametrize("args, match", [
    (["--method", "awq"], "unknown method 'awq'; available methods: caldera"),
    (["--rank", "500", "--opt", "outer_iters=1", "--opt", "oops"], "--opt expects KEY=VALUE"),
    (["--layers", "mlp("], "not a valid regular expression"),
    (["--opt", "outer_iterz=2"], "has no option(s) ['outer_iterz']"),
])
def test_plan_errors_before_loading(tmp_path, text_file, capsys, no_work, args, match):
    rc = main(["compress", *args, "--calib-text", str(text_file), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert match in _one_line_error(capsys)


@pytest.mark.parametrize("args, match", [
    (["--rank", "abc"], "argument --rank: expected an integer rank"),
    (["--rank", "2.5"], "argument --rank: expected an integer rank"),
    (["--budget", "-1"], "argument --budget: expected a positive number"),
    (["--seqlen", "0"], "argument --seqlen: expected an integer >= 1"),
    (["--lr-bits", "5"], "argument --lr-bits: invalid choice"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", *args, "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = _one_line_error(capsys)
    assert match in err and "see 'qlr compress --help'" in err


def test_compress_help_shows_defaults_and_methods(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("(default: odlri)", "(default: 2)", "(default: 64)", "(default: 512)", "(default: sotu)",
                     "caldera, gptq, loftq, lorc, lqer, odlri", "code width of Q", "input columns per scale/zero group",
                     "smallest feasible value"):
        assert expected in text, expected
