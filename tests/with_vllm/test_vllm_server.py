"""The vLLM rollout server (real vLLM, CPU build) and `vllm_mode: server` training."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from axolotl_run import gold_config, log_history, run_train, windows  # noqa: E402
from server_process import free_port, served  # noqa: E402



@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "-m", "axolotl_gold.rollouts.vllm.server", "--model", tiny_pair["student"],
           "--port", str(port), "--dtype", "float32", "--max-model-len", "64"]
    with served(cmd, tmp_path_factory.mktemp("server") / "server.log", "/health", 180, port) as url:
        yield port, url


def test_weights_pushed_over_http_change_the_samples(server, tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.vllm.client import VLLMServerEngine

    _, url = server
    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    step = {"n": 0}
    engine = VLLMServerEngine(url, lambda: model, lambda: step["n"], SamplingSettings(max_new_tokens=8, temperature=0.0), {tok.eos_token_id})
    text = tok.apply_chat_template([{"role": "user", "content": "encode: hello"}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]

    def hf_greedy():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        ids = out[0, len(prompt):].tolist()
        return ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids

    assert engine.generate([prompt], seed=0) == [hf_greedy()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    step["n"] = 1
    after = engine.generate([prompt], seed=0)
    # the first window synced too (the server starts from the base checkpoint)
    assert engine.syncs == 2 and after == [hf_greedy()]


def test_unreachable_server_names_the_url():
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.vllm.client import VLLMServerEngine, VLLMServerUnreachable

    url = f"http://127.0.0.1:{free_port()}"
    # the first window's sync is the first request
    engine = VLLMServerEngine(url, lambda: torch.nn.Linear(2, 2), lambda: 0, SamplingSettings(max_new_tokens=4), {2}, timeout=2, retries=2)
    with pytest.raises(VLLMServerUnreachable, match=f"{url} did not answer /update_weights after 2 tries"):
        engine.generate([[1, 2, 3]], seed=0)


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_axolotl_train_with_vllm_server(server, tiny_pair, tmp_path, adapter):
    port, _ = server
    extra = {}
    if adapter:  # the LoRA run pushes only the merged modules LoRA changes
        extra = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True,
                     lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)
    cfg = gold_config(tiny_pair, tmp_path, use_vllm=True, vllm_mode="server", vllm_server_port=port,
                      lmbda=1.0, num_generations=2, max_steps=3, **extra)
    out = run_train(cfg, tmp_path)
    losses = [h["loss"] for h in log_history(out, 3) if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(l) for l in losses)
    assert [r["engine_calls"] for r in windows(out)] == [1, 1, 1]


def test_two_training_processes_share_the_server(server, tiny_pair, tmp_path):
    """DDP over gloo (torchrun, 2 processes): each process samples its own window from the
    server; the main process pushes the weights and both wait for it at a barrier."""
    port, _ = server
    cfg = gold_config(tiny_pair, tmp_path, use_vllm=True, vllm_mode="server", vllm_server_port=port,
                      lmbda=1.0, num_generations=2, micro_batch_size=2, gradient_accumulation_steps=1, max_steps=2,
                      save_steps=2)
    out = run_train(cfg, tmp_path, num_processes=2)
    losses = [h["loss"] for h in log_history(out, 2) if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
