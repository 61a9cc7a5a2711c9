"""qlr: compress LLM weights as W ≈ Q + L R (a low-bit quantized matrix plus a low-rank product).

Core API (pure tensor functions)::

    dec = qlr.decompose(W, H, method="odlri", bits=2, rank=64)
    dec.Q, dec.L, dec.R, dec.reconstruct(), dec.bits_per_weight, dec.history
    qlr.activation_aware_error(W, W_hat, H)
    qlr.methods()

Models::

    model = qlr.compress("smollm2-135m", method="odlri", bits=2, rank=64)
    qlr.save(model, "dir", tokenizer); model = qlr.load("dir"); qlr.perplexity(model, tokenizer, text)
    qlr.finetune(model, ids, qlr.FinetuneConfig(steps=100), teacher=fp_model)   # QPEFT: train L, R on frozen Q
    AutoModelForCausalLM.from_pretrained("dir")     # the same model through transformers (after `import qlr`)
"""

from typing import Any

from ._version import __version__
from .decompose import Decomposition, activation_aware_error, decompose, methods
from .integrations import install_transformers_hook

__all__ = ["Decomposition", "activation_aware_error", "decompose", "methods", "compress", "save", "load",
           "load_tokenizer", "perplexity", "finetune", "FinetuneConfig", "__version__"]

# AutoModelForCausalLM.from_pretrained(qlr checkpoint) works after `import qlr`; transformers is not imported here
install_transformers_hook()


def __getattr__(name: str) -> Any:
    # model-level API loads transformers lazily, so `import qlr` stays light for the pure tensor functions
    if name in ("compress", "save", "load", "load_tokenizer"):
        from . import api

        return getattr(api, name)
    if name == "perplexity":
        from .eval.perplexity import perplexity

        return perplexity
    if name in ("finetune", "FinetuneConfig"):
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module 'qlr' has no attribute {name!r}")
