from collections import Counter

import pytest

from axolotl_gold.data.sampler import WindowSampler


def _rank_batches(sampler, world, mbs):
    """What accelerate hands each process: global batch k goes to rank k % world."""
    flat = list(sampler)
    batches = [flat[i : i + mbs] for i in range(0, len(flat), mbs)]
    return {r: batches[r::world] for r in range(world)}


@pytest.mark.parametrize("world,mbs,accum,ng", [(1, 8, 1, 1), (1, 2, 4, 2), (2, 2, 2, 2), (3, 3, 2, 3)])
def test_each_rank_window_is_whole_prompt_groups(world, mbs, accum, ng):
    sampler = WindowSampler(100, mbs, accum, ng, num_processes=world, seed=3)
    per_rank = _rank_batches(sampler, world, mbs)
    gbs = mbs * accum // ng
    seen = Counter()
    for rank, batches in per_rank.items():
        assert len(batches) == sampler.num_windows * accum
        for w in range(sampler.num_windows):
            window = [i for b in batches[w * accum : (w + 1) * accum] for i in b]
            counts = Counter(window)
            assert len(counts) == gbs, "distinct prompts per local window"
            assert set(counts.values()) == {ng}, "each prompt num_generations times"
            # repeats are consecutive, so a group is never split by the draw order
            assert window == [p for p in dict.fromkeys(window) for _ in range(ng)]
            seen.update(counts.keys())
    assert len(seen) == sampler.num_windows * gbs * world  # no prompt reused in an epoch


def test_same_prompts_whatever_the_split():
    """(8, 1), (2, 4) and 2 processes x (2, 2) see the same prompts in window 0."""
    a = set(list(WindowSampler(64, 8, 1, 1, seed=1))[:8])
    b = set(list(WindowSampler(64, 2, 4, 1, seed=1))[:8])
    c = set(list(WindowSampler(64, 2, 2, 1, num_processes=2, seed=1))[:8])
    assert a == b == c


def test_order_depends_on_seed_and_epoch_only():
    s1, s2 = WindowSampler(50, 2, 2, 2, seed=5), WindowSampler(50, 2, 2, 2, seed=5)
    assert list(s1) == list(s2)
    s2.set_epoch(1)
    assert list(s1) != list(s2)
    assert len(list(s1)) == len(s1)


def test_too_small_dataset_names_the_keys():
    with pytest.raises(ValueError, match="micro_batch_size"):
        WindowSampler(3, 2, 2, 1)
