"""The command line end to end on a tiny local model directory (no download)."""

import json
from pathlib import Path

import pytest
import torch

from qlr.cli import main
from tests.conftest import interrupt_after_layers


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


# --- interrupted runs: resume refuses other settings; kill -9 anywhere, resume, same bytes ------------------------


def _save_model_dir(model, path: Path) -> Path:
    """``model`` as a local Hugging Face directory with a byte-level BPE tokenizer (as the ``model_dir`` fixture)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(path)
    return path


def _compress_args(model_dir, text_file, out, *extra):
    return ["compress", "--model", str(model_dir), "--calib-text", str(text_file), "--calib-samples", "2",
            "--seqlen", "32", "--method", "lorc", "--bits", "3", "--rank", "4", "--out", str(out), *extra]


@pytest.mark.parametrize("change, shown", [
    (["--method", "caldera", "--opt", "outer_iters=1"], "method=lorc, options={}; this one method=caldera, "
                                                         'options={"outer_iters": 1}'),
    (["--bits", "2"], "bits=3; this one bits=2"),
    (["--rank", "8"], "rank=4; this one rank=8"),
    (["--seed", "1"], "seed=0; this one calibration_ids_sha256="),  # other windows too
    (["--calib-samples", "3"], "calibration_shape=[2, 32]"),
    (["--lr-bits", "4"], 'options={}; this one options={"lr_bits": 4}'),
    (["--model", "OTHER"], "model_weights_sha256="),
])
def test_resume_refuses_another_run(tmp_path, model_dir, text_file, capsys, monkeypatch, change, shown):
    from qlr.models.tiny import tiny_llama

    out = tmp_path / "o"
    interrupt_after_layers(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        main(_compress_args(model_dir, text_file, out))
    monkeypatch.undo()
    assert len(list((tmp_path / "o.partial" / "layers").iterdir())) == 3
    if change[:2] == ["--model", "OTHER"]:
        change = ["--model", str(_save_model_dir(tiny_llama(seed=1), tmp_path / "other"))]
    capsys.readouterr()
    assert main(_compress_args(model_dir, text_file, out, "--resume", *change)) == 2
    err = _one_line_error(capsys)
    assert f"cannot resume: the run in {tmp_path / 'o.partial'} used " in err and shown in err, err
    assert "delete it to start over" in err
    assert len(list((tmp_path / "o.partial" / "layers").iterdir())) == 3  # left as it was


def test_keep_failed_layers(tmp_path, text_file, capsys):
    from qlr.models.tiny import tiny_llama

    model = tiny_llama(seed=0)
    with torch.no_grad():  # down_proj of block 0 then reads act(gate)·0 = 0: its H is all zero
        model.model.layers[0].mlp.up_proj.weight.zero_()
    model_dir = _save_model_dir(model, tmp_path / "m")
    args = _compress_args(model_dir, text_file, tmp_path / "o", "--layers", "down_proj")
    assert main(args) == 2
    assert "model.layers.0.mlp.down_proj: H is all zeros" in _one_line_error(capsys)
    assert main([*args, "--resume", "--keep-failed-layers"]) == 0  # the failed run's layers are reused
    text = capsys.readouterr().out
    assert "compressed 1 linears" in text and "kept 1 linear(s) in full precision" in text
    assert main(["inspect", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "kept in full precision: model.layers.0.mlp.down_proj (64 × 128 float32): H is all zeros" in text


def test_inspect_fails_loudly_on_inconsistent_metadata(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "o"
    assert main(_compress_args(model_dir, text_file, out, "--method", "rtn", "--rank", "0")) == 0
    cfg = json.loads((out / "qlr_config.json").read_text())
    cfg["layers"][0]["meta"]["storage_bits"] += 64
    (out / "qlr_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2  # the manifest notices the edit ...
    assert "qlr_config.json' fails its manifest check" in capsys.readouterr().err
    _resign(out)
    assert main(["inspect", str(out)]) == 2  # ... and, re-signed, the metadata does not add up
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "is inconsistent: layer model.layers.0.self_attn.q_proj: its metadata computes" in err


def _resign(directory: Path) -> None:
    """Rewrite manifest.sha256 for the current qlr_config.json (what a deliberate edit of both would do)."""
    from qlr.hashing import file_sha256

    lines = (directory / "manifest.sha256").read_text().splitlines()
    fixed = [f"{file_sha256(directory / 'qlr_config.json')}  qlr_config.json" if line.endswith("  qlr_config.json")
             else line for line in lines]
    (directory / "manifest.sha256").write_text("\n".join(fixed) + "\n")


_CHILD = """
import os, sys, time
import qlr.calibration.pipeline as pl
import qlr.io as io
real_save = pl.save_layer
def save_layer(*a, **k):
    real_save(*a, **k)
    print("layer", flush=True)
pl.save_layer = save_layer
if os.environ.get("QLR_TEST_SLOW_SAVE"):
    real_hf = io._write_hf_config
    def slow(*a, **k):
        print("saving", flush=True)
        time.sleep(60)
        return real_hf(*a, **k)
    io._write_hf_config = slow
from qlr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_and_kill(args: list[str], after_layers: int | None, delay: float, slow_save: bool = False) -> int:
    """Run the CLI in a subprocess and SIGKILL it ``delay`` seconds after it wrote ``after_layers`` layers (or
    entered the final save); None: let it finish. Returns the number of layers it wrote."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "QLR_TEST_SLOW_SAVE": "1" if slow_save else ""}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    written = 0
    for line in proc.stdout:
        written += line.startswith("layer")
        if (after_layers is not None and written >= after_layers) or line.startswith("saving"):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    rc = proc.wait(timeout=120)
    assert rc == (-signal.SIGKILL if after_layers is not None or slow_save else 0), rc
    return written


def test_kill_anywhere_then_resume_gives_identical_bytes(tmp_path, text_file):
    """kill -9 at random points (between and inside layers, and during the final save), resume each time: the
    checkpoint has the same bytes as an uninterrupted run's (only run_log.json, the timings, differs)."""
    import random

    from qlr.models.tiny import tiny_llama

    model_dir = _save_model_dir(tiny_llama(seed=0, layers=4, hidden=32, intermediate=64), tmp_path / "m")
    ref, out = tmp_path / "ref", tmp_path / "o"
    # rtn: each layer takes about a millisecond, so that the test's time goes to the kills and resumes
    args = ["--method", "rtn", "--rank", "0"]
    assert main(_compress_args(model_dir, text_file, ref, *args)) == 0  # in this process: checks across processes
    rng = random.Random(14)
    total, done = 4 * 7, 0
    for _ in range(3):  # kill after a random number of layers, a random fraction of a millisecond or more later
        stop = rng.randint(1, max(1, (total - done) // 2))
        done += _run_and_kill(_compress_args(model_dir, text_file, out, "--resume", *args), stop,
                              rng.uniform(0, 0.003))
    _run_and_kill(_compress_args(model_dir, text_file, out, "--resume", *args), None, rng.uniform(0, 0.05),
                  slow_save=True)
    assert (tmp_path / "o.partial").is_dir() and not out.exists()  # the save was cut: OUT untouched
    assert main(_compress_args(model_dir, text_file, out, "--resume", *args)) == 0
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in out.iterdir()) and "manifest.sha256" in names
    for name in names:
        if name != "run_log.json":
            assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert not (tmp_path / "o.partial").exists() and not list(tmp_path.glob(".o.qlr-saving"))


@pytest.mark.parametrize("storage", ["requantize", "fp16"])
def test_finetune_then_inspect_and_eval(tmp_path, model_dir, text_file, capsys, storage):
    run, tuned = tmp_path / "run", tmp_path / "tuned"
    assert main(["compress", "--model", str(model_dir), "--method", "caldera", "--bits", "2", "--rank", "8",
                 "--calib-text", str(text_file), "--calib-samples", "4", "--seqlen", "64", "--opt", "outer_iters=1",
                 "--opt", "inner_iters=1", "--out", str(run)]) == 0
    assert main(["finetune", str(run), "--text", str(text_file), "--steps", "3", "--seqlen", "32", "--windows", "8",
                 "--lr", "1e-3", "--storage", storage, "--train-scales", "--out", str(tuned)]) == 0
    out = capsys.readouterr().out
    assert "fine-tuned 14 layers" in out and f"stored as {storage}" in out
    assert not (tmp_path / "tuned.partial").exists()
    assert main(["inspect", str(tuned)]) == 0  # the reconciliation checks pass on the new factors
    from qlr.io import inspect

    before, after = inspect(run), inspect(tuned)
    if storage == "requantize":
        assert after["bits_per_weight_meta"] == before["bits_per_weight_meta"]
    else:
        assert after["bits_per_weight_meta"] > before["bits_per_weight_meta"]
    cfg = json.loads((tuned / "qlr_config.json").read_text())
    assert cfg["method"] == "caldera" and cfg["extra"]["finetune"]["config"]["steps"] == 3
    assert cfg["extra"]["finetune"]["config"]["train_scales"] is True
    assert main(["eval", str(tuned), "--text", str(text_file), "--seqlen", "64", "--no-fp"]) == 0
    assert main(["finetune", str(run), "--text", str(text_file), "--steps", "3", "--out", str(tuned)]) == 2


def test_finetune_blockwise_srr_preserved(tmp_path, model_dir, text_file, capsys):
    run, tuned = tmp_path / "run", tmp_path / "tuned"
    assert main(["compress", "--model", str(model_dir), "--method", "srr", "--bits", "2", "--rank", "8",
                 "--calib-text", str(text_file), "--calib-samples", "4", "--seqlen", "64", "--opt", "preserve_k=3",
                 "--out", str(run)]) == 0
    assert main(["finetune", str(run), "--text", str(text_file), "--steps", "2", "--seqlen", "32", "--windows", "8",
                 "--mode", "blockwise", "--amp", "bf16", "--preserve-grad-scale", "0.5", "--out", str(tuned)]) == 0
    assert "fine-tuned 14 layers" in capsys.readouterr().out
    cfg = json.loads((tuned / "qlr_config.json").read_text())["extra"]["finetune"]
    assert cfg["config"]["mode"] == "blockwise" and cfg["config"]["preserve_grad_scale"] == 0.5
    assert main(["finetune", str(run), "--text", str(text_file), "--preserve-grad-scale", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "preserve_grad_scale must be in (0, 1]" in err and "Traceback" not in err
