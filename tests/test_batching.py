
from axolotl_gold.data.batching import GoldCollator, build_scoring_batch, left_pad
from axolotl_gold.rollouts.engines.base import trim_completion


def test_left_pad_and_masks_from_row_lengths():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_scoring_batch_layout():
    batch = build_scoring_batch([[5, 6, 7], [8]], [[1], [2, 3, 4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 0, 0], [0, 0, 8, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    # positions count real tokens only (what generate() used with left padding)
    assert batch["position_ids"][1].tolist()[2:] == [0, 1, 2, 3]
    assert batch["completion_labels"].tolist() == [[1, -100, -100], [2, 3, 4]]


def test_completion_region_predicts_completion_tokens():
    """Column P-1+k of a causal LM predicts completion token k: check with a model
    whose 'logits' are the input ids shifted (an identity lookup)."""
    prompts, completions = [[5, 6, 7], [8]], [[1], [2, 3, 4]]
    batch = build_scoring_batch(prompts, completions, pad_id=0)
    width = batch["completion_labels"].shape[1]
    kept = batch["input_ids"][:, -(width + 1):]  # what logits_to_keep=C+1 keeps
    predictors = kept[:, :-1]
    # the token at column P-1+k is the one right before completion token k
    assert predictors[0, 0].item() == 7 and predictors[1, 0].item() == 8
    assert predictors[1, 1].item() == 2 and predictors[1, 2].item() == 3


def test_collator_splits_prompt_and_completion():
    row = {"input_ids": [1, 2, 3, 4], "gold_prompt_length": 3, "gold_prompt_messages": "[]"}
    out = GoldCollator()([row])
    (r,) = out["gold_rollouts"]
    assert r.prompt_ids == [1, 2, 3] and r.completion_ids == [4]


def test_trim_completion_keeps_first_eos_drops_what_follows():
    assert trim_completion([4, 5, 2, 0, 0], {2}) == [4, 5, 2]
    assert trim_completion([4, 0, 5], {2}) == [4, 0, 5]  # a sampled pad id is a token
    assert trim_completion([4, 5], {2}) == [4, 5]


def test_scoring_batch_widths_rounded_to_a_multiple():
    batch = build_scoring_batch([[5, 6, 7], [8]], [[1], [2, 3, 4]], pad_id=0, multiple=4)
    # prompt width 3 -> 4 (one more pad on the left), completion width 3 -> 4 (on the right)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7, 1, 0, 0, 0], [0, 0, 0, 8, 2, 3, 4, 0]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0]]
    assert batch["position_ids"][0].tolist()[1:5] == [0, 1, 2, 3]
    assert batch["completion_labels"].tolist() == [[1, -100, -100, -100], [2, 3, 4, -100]]
    same = build_scoring_batch([[5, 6, 7, 9]], [[1, 2, 3, 4]], pad_id=0, multiple=4)  # already multiples
    assert same["input_ids"].shape == (1, 8) and int(same["attention_mask"].sum()) == 8


def test_rounded_widths_score_the_same_loss_and_gradient():
    """The loss of a micro-batch and the student's gradient are the same with widths rounded up
    (the extra positions are masked and unscored): float64, a real model, the fused JSD."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from axolotl_gold.scoring.loss import loss_sum
    from axolotl_gold.scoring.objectives import JsdObjective

    def model(seed):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
        return Qwen2ForCausalLM(cfg).double()

    student, teacher = model(0), model(1)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 9, 7)]
    completions = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (6, 2, 11)]
    objective = JsdObjective(beta=0.5, temperature=1.0, chunk_size=8, vocab_size=64)
    results = []
    for multiple in (1, 16):
        batch = build_scoring_batch(prompts, completions, pad_id=0, multiple=multiple)
        student.zero_grad(set_to_none=True)
        total, count = loss_sum(student, teacher, batch, objective, fused=True)
        (total / count).backward()
        results.append((batch["input_ids"].shape, float(total), int(count),
                        {n: p.grad.clone() for n, p in student.named_parameters()}))
    (shape1, loss1, count1, grads1), (shape16, loss16, count16, grads16) = results
    assert shape1 == (3, 9 + 11) and shape16 == (3, 16 + 16)
    assert count1 == count16 == 19
    assert abs(loss1 - loss16) < 1e-10 * abs(loss1)
    for name, grad in grads1.items():
        torch.testing.assert_close(grads16[name], grad, rtol=1e-9, atol=1e-12)


def test_width_multiple_is_one_unless_set_or_the_student_runs_in_cuda_graphs():
    from axolotl_gold.config.settings import scoring_width_multiple

    assert scoring_width_multiple({}) == 1
    assert scoring_width_multiple({"torch_compile": True}) == 1
    assert scoring_width_multiple({"torch_compile": True, "torch_compile_mode": "default"}) == 1
    assert scoring_width_multiple({"torch_compile": True, "gold_scoring_width_multiple": 8}) == 8
    graphed = {"torch_compile": True, "torch_compile_mode": "reduce-overhead"}
    assert scoring_width_multiple(graphed) == 64  # a graph per shape: fewer shapes
    assert scoring_width_multiple({**graphed, "gold_scoring_width_multiple": 1}) == 1
    assert scoring_width_multiple({**graphed, "torch_compile": False}) == 1
