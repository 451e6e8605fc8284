"""Real-shaped model pairs with the real tokenizer for the 2-GPU tests: the GPU suite's
(tests/gpu/gpu_models.py): a SmolLM2-135M-shaped Llama student and a SmolLM2-360M-shaped
Llama teacher (16 layers each, tied embeddings, 49,152-token SmolLM2 tokenizer with its
ChatML template; `.assets/smollm2-tokenizer`), and for hybrid ULD a Qwen2 teacher of the
360M shape with its own byte-level BPE. Random weights, saved in bf16 as real checkpoints.

Build them once, before concurrent test processes read them:

    python3 tests/real_shapes.py DIR            # then GOLD_REAL_SHAPE_MODELS=DIR pytest ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

from gpu_models import Assets  # noqa: E402

# keys that fit these models' chats (prompts of 40 to 70 words) in place of the tiny pair's
OVERRIDES = {"sequence_len": 384, "max_completion_length": 32}


def pairs(root: Path | None = None) -> dict[str, dict]:
    """``{"same": pair, "cross": pair}``, each ``{"student", "teacher", "train",
    "train_complete"}`` (the last without the prompt-only rows, which off-policy windows
    cannot score): read from GOLD_REAL_SHAPE_MODELS when it names a built folder, else
    built under ``root``."""
    built = os.environ.get("GOLD_REAL_SHAPE_MODELS")
    folder = Path(built) if built else Path(root)
    index = folder / "pairs.json"
    if not index.exists():
        assets = Assets(folder, cpu=False)
        index.parent.mkdir(parents=True, exist_ok=True)
        built = {"same": assets.get("llama"), "cross": assets.get("cross")}
        complete = folder / "chats_complete.jsonl"
        rows = [line for line in open(built["same"]["train"]) if json.loads(line)["messages"][-1]["role"] == "assistant"]
        complete.write_text("".join(rows))
        for pair in built.values():
            pair["train_complete"] = str(complete)
        index.write_text(json.dumps(built))
    return json.loads(index.read_text())


if __name__ == "__main__":
    print(json.dumps(pairs(Path(sys.argv[1])), indent=1))
