"""Training on a compressed model: QPEFT fine-tuning of the low-rank factors on a frozen Q (:mod:`.finetune`)."""

from .finetune import FinetuneConfig, FinetuneResult, finetune, trainable_layers

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "trainable_layers"]
