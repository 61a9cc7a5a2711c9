"""Shared fixtures: a tiny random Llama, a byte tokenizer, a short English text, a device, test layers; every test
runs with one intra-op thread and, unless marked ``integration``, with its own empty ``$QLR_CACHE``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qlr.models.tiny import ByteTokenizer, tiny_llama
from tests.layers import llm_like
from tests.outliers import outlier_layer as _outlier_layer

SAMPLE_TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little and see "
    "the watery part of the world. It is a way I have of driving off the spleen and regulating the "
    "circulation. Whenever I find myself growing grim about the mouth, whenever it is a damp, drizzly "
    "November in my soul, then I account it high time to get to sea as soon as I can. This is my "
    "substitute for pistol and ball. "
)


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Every test runs with one intra-op thread: the tests run many small tensor ops, and two OpenMP threads
    sharing loaded cores stall on every op (the cli/pipeline tests ran ~10× slower with the default). Restored after
    each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_REAL_CACHE = Path(os.environ.get("QLR_CACHE") or "~/.cache/qlr").expanduser()


@pytest.fixture(autouse=True)
def _isolated_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Points ``$QLR_CACHE`` at an empty directory of the test's own, so that no test but an ``integration`` one
    reads or writes the user's corpora and token caches. Only the compiled-kernel cache (a build product keyed by
    the source, flags and CPU) is shared with the real one, through a link, so that kernels build once."""
    if request.node.get_closest_marker("integration"):
        return
    root = tmp_path_factory.mktemp("qlr-cache")
    kernels = _REAL_CACHE / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    (root / "kernels").symlink_to(kernels, target_is_directory=True)
    monkeypatch.setenv("QLR_CACHE", str(root))


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    """A fresh 2-layer ``LlamaForCausalLM`` (hidden 64, vocab 256, GQA 4/2 heads), eval mode, seed 0."""
    return tiny_llama(seed=0)


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model) -> Path:
    """``tiny_model`` saved as a local Hugging Face directory with a byte-level BPE tokenizer (no download)."""
    path = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def save_byte_tokenizer(path: Path) -> None:
    """Save a byte-level BPE tokenizer (256 tokens, no merges; no download) into the model directory ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(path)


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    """UTF-8 byte tokenizer matching ``tiny_model``'s 256-token vocabulary."""
    return ByteTokenizer()


@pytest.fixture
def sample_text() -> str:
    """About 550 bytes of English prose (five sentences), repeated where tests need more."""
    return SAMPLE_TEXT


@pytest.fixture
def device() -> torch.device:
    """The CPU; GPU variants of a test should parametrize ``device`` with the ``gpu`` marker instead."""
    return torch.device("cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def layer() -> dict:
    """A small LLM-like layer (48 × 128) with 4 activation-outlier input channels; see ``tests/layers.py``."""
    return llm_like()


@pytest.fixture(scope="session")
def wide_layer() -> dict:
    """A wider LLM-like layer (64 × 256: more input columns than GPTQ's 128-column block)."""
    return llm_like(m=64, n=256, seed=1)


@pytest.fixture(scope="session")
def outlier_layer() -> dict:
    """An outlier-heavy 64 × 256 layer (three heavy weight columns, six ×40 activation channels, independent
    channels) on which plain GPTQ loses to RTN; see ``tests/outliers.py``."""
    return _outlier_layer()


@pytest.fixture(params=["compiled", "torch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test through qlr's compiled CPU kernels and through the pure-torch reference (``QLR_KERNELS=torch``);
    fails when the kernels did not build here (CI has a compiler)."""
    from qlr.kernels import cpu

    if request.param == "torch":
        monkeypatch.setenv("QLR_KERNELS", "torch")
    else:
        monkeypatch.delenv("QLR_KERNELS", raising=False)
        if not cpu.available():
            pytest.fail(f"compiled kernels did not build: {cpu.build_error()}")
    return request.param


def interrupt_after_layers(monkeypatch: pytest.MonkeyPatch, n_layers: int) -> None:
    """Make the next compression stop (KeyboardInterrupt, as Ctrl-C would) once ``n_layers`` layers are written to
    its work directory."""
    import qlr.calibration.pipeline as pl

    real, done = pl.save_layer, []

    def save_layer(*a: object, **k: object) -> None:
        real(*a, **k)
        done.append(1)
        if len(done) >= n_layers:
            raise KeyboardInterrupt

    monkeypatch.setattr(pl, "save_layer", save_layer)
