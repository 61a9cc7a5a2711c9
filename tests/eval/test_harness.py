"""qlr.eval.harness: the lm-evaluation-harness bridge fails clearly when lm_eval is absent."""

from __future__ import annotations

import sys

import pytest

from qlr.eval.harness import run_lm_eval


def test_missing_lm_eval_names_install_and_offline_data(monkeypatch, tiny_model, byte_tokenizer) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'qlr\[eval\]'.*HF_DATASETS_OFFLINE"):
        run_lm_eval(tiny_model, byte_tokenizer, "arc_easy", batch_size=1, limit=2)
