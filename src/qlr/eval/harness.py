"""Optional bridge to lm-evaluation-harness (``pip install 'qlr[eval]'``) for published zero-shot tasks.

qlr never downloads: the task datasets must already be in the local Hugging Face datasets cache, and the
run should be made with ``HF_DATASETS_OFFLINE=1`` (and ``HF_HUB_OFFLINE=1``) set in the environment.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["run_lm_eval"]

_INSTALL_HINT = (
    "lm-evaluation-harness is not installed; install it with: pip install 'qlr[eval]'. "
    "Its task datasets must also be available locally (a populated Hugging Face datasets cache, used with "
    "HF_DATASETS_OFFLINE=1), since qlr does not download anything. The built-in offline alternative is "
    "qlr.eval.proxy.last_word_proxy (a proxy task, not a published benchmark)."
)


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    batch_size: int = 1,
    limit: int | float | None = None,
) -> dict[str, dict[str, Any]]:
    """Run lm-evaluation-harness tasks on an in-memory model; returns ``{task: {metric: value}}``.

    ``tasks`` is a list of task names or one comma-separated string (e.g. ``"arc_easy,piqa"``); ``limit``
    caps the examples per task (a fraction if < 1), as in ``lm_eval.simple_evaluate``. The model is wrapped
    with ``HFLM(pretrained=model, tokenizer=tokenizer)``. Raises ``ImportError`` with the install command
    when ``lm_eval`` is missing, and warns when ``HF_DATASETS_OFFLINE`` is not set.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [t.strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise ValueError("no lm-eval tasks given")
    if os.environ.get("HF_DATASETS_OFFLINE", "").lower() not in {"1", "true", "yes", "on"}:
        warnings.warn(
            "HF_DATASETS_OFFLINE is not set; lm-eval may try to download task datasets. Set "
            "HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 and pre-populate the datasets cache.",
            UserWarning,
            stacklevel=2,
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=names, batch_size=batch_size, limit=limit)
    if output is None:  # non-zero rank in a distributed run
        return {}
    return {task: dict(metrics) for task, metrics in output["results"].items()}
