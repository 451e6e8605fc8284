"""Rollout throughput, HF generate vs colocated vLLM, and weight-sync time, full vs LoRA.

Runs in the vLLM environment (`bash scripts/setup_vllm.sh`), on the CPU here:

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--hidden 512 --layers 8 --prompts 32]

Both engines sample the same prompts from the same random Qwen2-shaped model (built
from a config, saved to a temporary folder), at temperature 1 with EOS suppressed so
every rollout has exactly --new-tokens tokens. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def build_model(path: str, args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from axolotl_gold.demo.tokenizers import build_char_tokenizer

    tok = build_char_tokenizer(path)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
        head_dim=64, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    return model, tok


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--syncs", type=int, default=5)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
    from axolotl_gold.rollouts.vllm.colocate import VLLMColocateEngine

    path = tempfile.mkdtemp(prefix="bench_vllm_")
    model, tok = build_model(path, args)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, len(tok) - 10, (args.prompts, args.prompt_tokens), generator=g).tolist()
    sampling = SamplingSettings(max_new_tokens=args.new_tokens, temperature=1.0)
    no_eos: set[int] = set()  # EOS never stops a rollout: fixed-length outputs on both sides

    hf = HFGenerateEngine(lambda: model, sampling, tok.pad_token_id, no_eos, min_new_tokens=args.new_tokens)
    hf.generate(prompts[:2], seed=0)  # warm-up
    start = time.perf_counter()
    hf_out = hf.generate(prompts, seed=0)
    hf_s = time.perf_counter() - start

    state = {"model": model, "step": 0}
    start = time.perf_counter()
    vllm = VLLMColocateEngine(path, lambda: state["model"], lambda: state["step"], sampling, no_eos,
                              max_model_len=args.prompt_tokens + args.new_tokens + 8, dtype="float32",
                              min_new_tokens=args.new_tokens)
    engine_start_s = time.perf_counter() - start
    vllm.generate(prompts[:2], seed=0)  # warm-up
    start = time.perf_counter()
    vllm_out = vllm.generate(prompts, seed=0)
    vllm_s = time.perf_counter() - start

    def sync_time(n):
        vllm.sync_seconds, vllm.syncs = 0.0, 0
        for _ in range(n):
            vllm.sync_weights()
        return vllm.sync_seconds / n

    full_sync = sync_time(args.syncs)
    state["model"] = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    lora_sync = sync_time(args.syncs)

    hf_tokens = sum(len(c) for c in hf_out)
    vllm_tokens = sum(len(c) for c in vllm_out)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nmodel: {params:.1f}M parameters (hidden {args.hidden}, {args.layers} layers); "
          f"{args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens each; CPU, float32\n")
    print("| engine | tokens | seconds | tokens/s | vs HF |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| HF generate | {hf_tokens} | {hf_s:.2f} | {hf_tokens / hf_s:.0f} | 1.00x |")
    print(f"| vLLM colocate | {vllm_tokens} | {vllm_s:.2f} | {vllm_tokens / vllm_s:.0f} | {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.2f}x |")
    print(f"\nvLLM engine start: {engine_start_s:.1f} s\n")
    print("| weight sync | ms per sync | vs full |")
    print("| --- | ---: | ---: |")
    print(f"| full weights | {full_sync * 1e3:.1f} | 1.00x |")
    print(f"| LoRA (q, v; pushes merged q/k/v) | {lora_sync * 1e3:.1f} | {lora_sync / full_sync:.2f}x |")


if __name__ == "__main__":
    main()
