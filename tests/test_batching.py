
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
