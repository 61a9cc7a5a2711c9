"""Export a qlr run (a checkpoint written by :func:`qlr.save`) into formats other engines load.

Each format is a module with ``export(run_dir: Path, out_dir: Path, **options) -> dict`` (the returned dict is a
report of what was written and what the conversion loses, also saved next to the files). The registry maps a
format name to ``"module:function"`` and imports the module only when that format is asked for, so that
``import qlr.export`` needs neither PEFT nor gguf.

    qlr export runs/my-run --format peft --out exported/my-run
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

__all__ = ["EXPORTERS", "export", "formats"]

EXPORTERS: dict[str, str] = {
    "peft": "qlr.export.peft:export",  # GPTQ base checkpoint + PEFT LoRA adapter (L R)
    "gguf": "qlr.export.gguf:export",  # llama.cpp GGUF model + LoRA adapter
}


def formats() -> list[str]:
    """The export format names, sorted."""
    return sorted(EXPORTERS)


def export(run_dir: str | Path, fmt: str, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Export the qlr checkpoint ``run_dir`` to ``out_dir`` in format ``fmt`` (see :data:`EXPORTERS`).

    ``options`` go to the format's exporter. Returns the exporter's report dict. Raises ValueError for an unknown
    format and whatever the exporter raises (ValueError with a one-line reason for a run it cannot express)."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {formats()}")
    module_name, _, func_name = EXPORTERS[fmt].partition(":")
    fn = getattr(importlib.import_module(module_name), func_name)
    try:
        inspect.signature(fn).bind(Path(run_dir), Path(out_dir), **options)
    except TypeError as e:
        keys = [k for k in inspect.signature(fn).parameters if k not in ("run_dir", "out_dir")]
        raise ValueError(f"{fmt} export: {e}; its options are {keys}") from None
    return fn(Path(run_dir), Path(out_dir), **options)
