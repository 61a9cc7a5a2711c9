"""What the QPEFT tests share besides the fixture (``conftest.py``): Q's stored codes."""

from __future__ import annotations

import copy

import torch

from qlr.nn.qlinear import QLRLinear


def q_codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every compressed layer's Q codes and rotation signs, by buffer name."""
    return {f"{n}.{k}": v.clone() for n, mod in model.named_modules() if isinstance(mod, QLRLinear)
            for k, v in mod._buffers.items() if k.startswith("q_") or k.startswith("signs")}


def interrupted_then_resumed(student: torch.nn.Module, ids: torch.Tensor, cfg: object, teacher: torch.nn.Module,
                             work_dir: object, kill_at: str) -> tuple[torch.nn.Module, object]:
    """Fine-tune a copy of ``student`` into ``work_dir`` until its log writes a line starting with ``kill_at``
    (the run dies there), then resume a fresh copy from the saved state: (the resumed model, its result)."""
    import pytest

    from qlr.train import finetune

    class Killed(Exception):
        pass

    def die(line: str) -> None:
        if line.startswith(kill_at):
            raise Killed

    with pytest.raises(Killed):
        finetune(copy.deepcopy(student), ids, cfg, teacher=teacher, work_dir=work_dir, progress=False, log=die)
    again = copy.deepcopy(student)  # a fresh process reloads the compressed model
    return again, finetune(again, ids, cfg, teacher=teacher, work_dir=work_dir, resume=True, progress=False)
