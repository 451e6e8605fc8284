"""A window's rows regrouped by length into its micro-batches (``group_by_length``): the
same rows, counts and batch sizes, fewer padded positions, never a larger micro-batch,
and the same window gradient as scoring each slice as drawn."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_gold.assembly import build_objective
from axolotl_gold.config.settings import GoldSettings
from axolotl_gold.data.batching import Rollout, group_by_length, merge_repeats, padded_positions
from axolotl_gold.scoring.loss import teacher_scoring_batch
from axolotl_gold.trainer.window import prepare_window
from test_offpolicy_repeats import NoEngine, _grad, _rows


def _row(prompt: int, completion: int, tag: int = 0) -> Rollout:
    return Rollout(prompt_ids=[5 + tag] * prompt, completion_ids=[7 + tag] * completion)


def _ragged_window(rng: random.Random, slices: int, size: int, limit: int = 768) -> list:
    """Completion lengths geometric with a mean of 40% of ``limit`` (capped), prompts 20 to 300."""
    def length():
        return min(limit, 1 + int(rng.expovariate(1 / (0.4 * limit))))
    return [merge_repeats([_row(rng.randint(20, 300), length(), tag=i * size + j) for j in range(size)])
            for i in range(slices)]


def _items(groups):
    return sorted((tuple(r.prompt_ids), tuple(r.completion_ids), c) for rows, counts in groups
                  for r, c in zip(rows, counts))


@pytest.mark.parametrize("seed", range(20))
def test_same_rows_and_sizes_fewer_positions_never_a_larger_batch(seed):
    rng = random.Random(seed)
    groups = _ragged_window(rng, slices=4, size=4)
    if seed % 2:  # repeats merged: micro-batches of unequal sizes
        groups[0] = merge_repeats([groups[0][0][0]] * 3 + groups[0][0][1:2])
    out = group_by_length(groups)
    assert _items(out) == _items(groups)
    assert [len(rows) for rows, _ in out] == [len(rows) for rows, _ in groups]
    (total, largest), (new_total, new_largest) = padded_positions(groups), padded_positions(out)
    assert new_largest <= largest and new_total <= total
    if seed % 2 == 0:  # 16 ragged rows in 4 equal micro-batches: always regrouped, well below
        assert out is not groups and new_total < 0.9 * total, (new_total, total)


def test_ragged_windows_lose_a_third_of_their_padded_positions():
    # the GPU benchmark's shape: 16 rollouts, micro batch 4, 768-token limit, 256-token prompts
    rng = random.Random(0)
    ratios = []
    for _ in range(200):
        groups = [merge_repeats([_row(256, min(768, 1 + int(rng.expovariate(1 / 307)))) for _ in range(4)])
                  for _ in range(4)]
        ratios.append(padded_positions(group_by_length(groups))[0] / padded_positions(groups)[0])
    mean = sum(ratios) / len(ratios)
    print(f"padded positions grouped / as drawn: mean {mean:.3f}, worst {max(ratios):.3f}")
    assert max(ratios) <= 1.0 and mean < 0.85


def test_kept_as_drawn_when_regrouping_would_grow_the_largest_batch():
    # one merged row (3 repeats) of 1000 tokens beside 3 rows of 900/100/100: the longest
    # rows into the smallest batch, else as drawn
    long, mid, short = _row(10, 990, 1), _row(10, 890, 2), _row(10, 90, 3)
    groups = [([mid], [3]), ([long, short, Rollout(**vars(short))], [1, 1, 1])]
    out = group_by_length(groups)
    assert [len(r) for r, _ in out] == [1, 3] and out[0][0] == [long]
    assert padded_positions(out)[1] <= padded_positions(groups)[1]
    # the same with the small micro-batch last: the longest row still goes to it
    flipped = [groups[1], groups[0]]
    out = group_by_length(flipped)
    assert [len(r) for r, _ in out] == [3, 1] and out[1][0] == [long]
    # a grouping that pads no fewer positions is left alone
    same = [([_row(10, 10, 1)], [1]), ([_row(10, 10, 2)], [1])]
    assert group_by_length(same) is same


def test_window_gradient_equals_each_slice_scored_as_drawn(tiny_pair):
    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float64)
    settings = GoldSettings.from_cfg({"teacher_model": tiny_pair["teacher"], "sequence_len": 64,
                                      "max_completion_length": 12})
    objective = build_objective(settings, student, teacher, tok)
    rows = _rows(tiny_pair, tok, 8, 1)
    rng = random.Random(3)
    for row in rows:  # ragged completions: 1 to all of each row's tokens
        row.completion_ids = row.completion_ids[: rng.randint(1, len(row.completion_ids))]
    slices = [rows[i : i + 2] for i in range(0, 8, 2)]
    prepared = prepare_window(slices, draws=[False] * 4, step=0, seed=0, rank=0, pad_id=tok.pad_token_id,
                              student_engine=NoEngine(), objective=objective)
    drawn = [teacher_scoring_batch(s, tok.pad_token_id, objective) for s in slices]
    grouped_rows = [b["input_ids"].tolist() for b in prepared.micro_batches]
    assert grouped_rows != [b["input_ids"].tolist() for b in drawn]  # regrouped
    assert sum(b["input_ids"].numel() for b in prepared.micro_batches) < sum(b["input_ids"].numel() for b in drawn)
    total = sum(objective.count(b) for b in drawn)
    assert prepared.local_tokens == total
    got = _grad(student, teacher, objective, prepared.micro_batches, total, fused=True)
    want = _grad(student, teacher, objective, drawn, total, fused=True)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
