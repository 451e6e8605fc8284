"""Real vLLM (the CPU build) in the training process. Runs in the vLLM venv
(`scripts/test.sh` sets it up); the main suite does not collect this folder.
(It is not named `vllm`: on sys.path that folder would pass for the vllm package.)"""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from axolotl_run import gold_config, log_history, run_train, windows  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _vllm_prompt_logprobs(engine, ids: list[int]) -> list[float]:
    """vLLM's log-probability of each token of ``ids`` given the ones before it."""
    from vllm import SamplingParams

    out = engine.llm.generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    return [entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]


def _hf_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_gold.demo.models import build_tiny_pair
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.vllm.colocate import VLLMColocateEngine

    pair = build_tiny_pair(str(tmp_path_factory.mktemp("vllm_pair")))
    tok = AutoTokenizer.from_pretrained(pair["student"])
    model = AutoModelForCausalLM.from_pretrained(pair["student"])
    step = {"n": 0}
    engine = VLLMColocateEngine(
        pair["student"], lambda: state["model"], lambda: step["n"],
        SamplingSettings(max_new_tokens=8, temperature=0.0), {tok.eos_token_id}, max_model_len=64,
        dtype="float32",
    )
    state = {"model": model}
    return engine, state, step, tok, pair


def _ids(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "encode: hello"}], add_generation_prompt=True, tokenize=False)
    return tok(text + "abcde", add_special_tokens=False)["input_ids"]


def test_full_weight_sync_matches_hf_logprobs(engine_and_model):
    engine, state, step, tok, _ = engine_and_model
    ids = _ids(tok)
    torch.testing.assert_close(_vllm_prompt_logprobs(engine, ids), _hf_logprobs(state["model"], ids), atol=2e-3, rtol=0)
    with torch.no_grad():  # an "optimizer step"
        for p in state["model"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    step["n"] += 1
    before = _vllm_prompt_logprobs(engine, ids)
    engine.generate([ids[:5]], seed=0)  # a window's generate call pulls the new weights
    assert engine.syncs >= 1
    after = _vllm_prompt_logprobs(engine, ids)
    expected = _hf_logprobs(state["model"], ids)
    assert max(abs(a - b) for a, b in zip(before, expected)) > 1e-2  # stale before the sync
    torch.testing.assert_close(after, expected, atol=2e-3, rtol=0)


def test_lora_sync_pushes_only_changed_modules(engine_and_model):
    from peft import LoraConfig, get_peft_model

    from axolotl_gold.rollouts.vllm.weights import lora_merged_weights

    engine, state, step, tok, pair = engine_and_model
    # the engine already holds this model's weights; LoRA then changes only q/v
    lora = get_peft_model(state["model"], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    names = [n for n, _ in lora_merged_weights(lora)]
    # q/v changed; k rides along (fused qkv in vLLM); MLP, norms, embeddings stay out
    assert names and all(".self_attn." in n and n.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for n in names)
    full = sum(p.numel() for p in lora.get_base_model().parameters())
    pushed = sum(t.numel() for _, t in lora_merged_weights(lora))
    assert pushed < full / 2
    state["model"] = lora
    step["n"] += 1
    engine.generate([_ids(tok)[:5]], seed=0)
    ids = _ids(tok)
    torch.testing.assert_close(_vllm_prompt_logprobs(engine, ids), _hf_logprobs(lora, ids), atol=2e-3, rtol=0)


def test_resumed_dora_with_modules_to_save_syncs_on_the_first_window(engine_and_model, tmp_path):
    """A run resumed from `lora_model_dir`: the engine starts from the base checkpoint,
    the student at step 0 is base + a trained DoRA adapter with trained `lm_head` and
    `embed_tokens` copies. The first window syncs (step still 0), and vLLM's log-probs
    are then the student's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_gold.rollouts.vllm.sampling import model_runner
    from axolotl_gold.rollouts.vllm.weights import full_weights

    engine, state, step, tok, pair = engine_and_model
    base = AutoModelForCausalLM.from_pretrained(pair["student"])
    # a fresh engine: the base checkpoint's weights, never synced
    model_runner(engine.llm).reload_weights(weights_iterator=full_weights(base))
    engine._synced_step = None
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                        modules_to_save=["lm_head", "embed_tokens"])
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(pair["student"]), config)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    trained.save_pretrained(tmp_path / "adapter")
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair["student"]), str(tmp_path / "adapter"), is_trainable=True)
    ids = _ids(tok)
    stale = _vllm_prompt_logprobs(engine, ids)
    expected = _hf_logprobs(student, ids)
    assert max(abs(a - b) for a, b in zip(stale, expected)) > 1e-2  # the base is not the student
    state["model"] = student
    syncs = engine.syncs
    engine.generate([ids[:5]], seed=0)  # step unchanged: the first window syncs anyway
    assert engine.syncs == syncs + 1
    torch.testing.assert_close(_vllm_prompt_logprobs(engine, ids), expected, atol=2e-3, rtol=0)


def test_vllm_stops_at_the_run_stop_set(engine_and_model):
    """The stop set reaches SamplingParams: vLLM itself stops at a stop id (finish
    reason "stop"), instead of sampling to max_tokens and leaving the cut to trim."""
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.vllm.sampling import sample_rollouts

    engine, state, step, tok, _ = engine_and_model
    prompt = _ids(tok)[:6]
    greedy = SamplingSettings(max_new_tokens=8, temperature=0.0)
    free, _ = sample_rollouts(engine.llm, [prompt], greedy, seed=0, eos_ids=set())
    stop = free[0][2]
    seen = []
    generate = engine.llm.generate

    def recording(*args, **kwargs):
        outs = generate(*args, **kwargs)
        seen.extend(outs)
        return outs

    engine.llm.generate = recording
    try:
        out, _ = sample_rollouts(engine.llm, [prompt], greedy, seed=0, eos_ids={stop})
    finally:
        del engine.llm.generate
    cut = free[0][: free[0].index(stop) + 1]
    assert out == [cut]
    sample = seen[0].outputs[0]
    assert sample.finish_reason == "stop" and list(sample.token_ids) == cut


@pytest.mark.parametrize("num_generations", [1, 4])
def test_completions_map_back_to_their_prompts(engine_and_model, num_generations):
    """Greedy samples of distinct prompts, each repeated num_generations times, come back
    in row order: every copy of a prompt gets that prompt's greedy completion."""
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.vllm.sampling import sample_rollouts

    engine, state, step, tok, _ = engine_and_model
    distinct = [_ids(tok)[: 6 + i] for i in range(3)]
    rows = [p for p in distinct for _ in range(num_generations)]
    greedy = SamplingSettings(max_new_tokens=6, temperature=0.0)
    out, dropped = sample_rollouts(engine.llm, rows, greedy, seed=3, eos_ids={tok.eos_token_id})
    single = [sample_rollouts(engine.llm, [p], greedy, seed=3, eos_ids={tok.eos_token_id})[0][0] for p in distinct]
    assert dropped == 0 and out == [c for c in single for _ in range(num_generations)]
    assert len({tuple(c) for c in single}) > 1  # the prompts really differ
    if num_generations > 1:  # sampled copies of one prompt are independent samples
        hot = SamplingSettings(max_new_tokens=6, temperature=1.0)
        samples, _ = sample_rollouts(engine.llm, [distinct[0]] * num_generations, hot, seed=5, eos_ids=set())
        assert len({tuple(c) for c in samples}) > 1


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_axolotl_train_with_colocated_vllm(tiny_pair, tmp_path, adapter):
    extra = dict(use_vllm=True, vllm_mode="colocate", lmbda=0.5, num_generations=2, max_steps=3)
    if adapter:
        extra.update(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True,
                     lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)
    out = run_train(gold_config(tiny_pair, tmp_path, **extra), tmp_path)
    losses = [h["loss"] for h in log_history(out, 3) if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(l) for l in losses)
    records = windows(out)
    assert [r["engine_calls"] for r in records] == [int(any(r["on_policy"])) for r in records]
