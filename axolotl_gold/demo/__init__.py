"""Demo assets for GOLD: a synthetic task, local tokenizers, tiny Qwen2 models.

Everything is built locally on CPU (no hub access):

* :mod:`~axolotl_gold.demo.task`: the task (encode a 5-letter word with a fixed
  substitution cipher), splits and exact-match scoring.
* :mod:`~axolotl_gold.demo.tokenizers`: a char-level tokenizer and a different
  byte-level BPE (for cross-tokenizer runs), both with chat templates.
* :mod:`~axolotl_gold.demo.models`: teacher/student Qwen2 configs and
  :func:`build_tiny_pair` (random weights, for tests).
* :mod:`~axolotl_gold.demo.pretrain`: :func:`build_demo`, a trained teacher
  (~100%) and a weak student (~15%) plus chat-format data.
* :mod:`~axolotl_gold.demo.score`: :func:`score_model`, greedy exact-match accuracy
  of a model or PEFT adapter directory.

CLI: ``python -m axolotl_gold.demo {build,score,report} ...``.
"""

from axolotl_gold.demo.task import make_example, make_split, score

__all__ = ["build_demo", "build_tiny_pair", "make_example", "make_split", "score", "score_model"]


def __getattr__(name):
    if name == "build_demo":
        from axolotl_gold.demo.pretrain import build_demo

        return build_demo
    if name == "build_tiny_pair":
        from axolotl_gold.demo.models import build_tiny_pair

        return build_tiny_pair
    if name == "score_model":
        from axolotl_gold.demo.score import score_model

        return score_model
    raise AttributeError(f"module 'axolotl_gold.demo' has no attribute {name!r}")
