"""Evaluation: perplexity, an offline last-word *proxy* task, and an optional lm-evaluation-harness bridge."""

from qlr.eval.harness import run_lm_eval
from qlr.eval.perplexity import perplexity, window_nll
from qlr.eval.proxy import LastWordProxyResult, last_word_proxy, last_word_sentences

__all__ = [
    "LastWordProxyResult",
    "last_word_proxy",
    "last_word_sentences",
    "perplexity",
    "run_lm_eval",
    "window_nll",
]
