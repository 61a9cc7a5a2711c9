"""The README commands alone on local model directories of other families: compress → inspect → eval."""

from __future__ import annotations

import json

import pytest
from transformers import logging as hf_logging

from qlr.cli import main
from tests.conftest import save_byte_tokenizer
from tests.models.archs import tiny_causal_lm

hf_logging.set_verbosity_error()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2_moe", "gemma3"])
def test_cli_compress_eval_other_families(arch, tmp_path, sample_text, capsys):
    model_dir, text, out = tmp_path / arch, tmp_path / "text.txt", tmp_path / "run"
    tiny_causal_lm(arch, vocab_size=256).save_pretrained(model_dir)
    save_byte_tokenizer(model_dir)
    text.write_text(sample_text * 4)
    assert main(["compress", "--model", str(model_dir), "--method", "qera-exact", "--bits", "3", "--rank", "8",
                 "--group-size", "32", "--calib-text", str(text), "--calib-samples", "4", "--seqlen", "64",
                 "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    res = tmp_path / "res.json"
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "64", "--json", str(res)]) == 0
    got = json.loads(res.read_text())
    assert 1 < got["perplexity"] < 1e4 and 1 < got["fp_perplexity"] < 1e4
