import pytest

from axolotl_gold.data.batching import Rollout
from axolotl_gold.rollouts.window import fill_window, generation_seed, policy_draws


class RecordingEngine:
    """A real engine stand-in that records calls; completions encode their prompt."""

    def __init__(self, tag):
        self.calls = 0
        self.tag = tag
        self.prompts = []

    def generate(self, prompts, seed):
        self.calls += 1
        self.prompts.append(prompts)
        return [[self.tag, p[-1], 2] for p in prompts]


def _slices(n_slices=4, mbs=2):
    return [
        [Rollout(prompt_ids=[10 * s + r, 99], completion_ids=[7, 7]) for r in range(mbs)]
        for s in range(n_slices)
    ]


def test_draws_are_deterministic_and_follow_lmbda():
    assert policy_draws(1, 5, 8, 0.5) == policy_draws(1, 5, 8, 0.5)
    assert policy_draws(1, 5, 8, 0.0) == [False] * 8
    assert policy_draws(1, 5, 8, 1.0) == [True] * 8
    many = [d for step in range(500) for d in policy_draws(0, step, 4, 0.3)]
    assert 0.25 < sum(many) / len(many) < 0.35
    assert generation_seed(0, 1, 0) != generation_seed(0, 1, 1)


def test_one_call_for_all_on_policy_slices():
    engine = RecordingEngine(tag=1)
    draws = [True, False, True, False]
    window = fill_window(_slices(), draws, engine, student_seed=0)
    assert engine.calls == 1
    assert len(engine.prompts[0]) == 4  # two on-policy slices x micro batch 2
    for s, on in enumerate(draws):
        for row in window.slices[s]:
            if on:
                assert row.completion_ids == [1, 99, 2]
            else:
                assert row.completion_ids == [7, 7]  # the dataset completion


def test_no_call_without_on_policy_slices_and_seq_kd_uses_teacher():
    student, teacher = RecordingEngine(1), RecordingEngine(5)
    window = fill_window(_slices(), [False, True, False, False], student, 0, teacher, 1)
    assert student.calls == 1 and teacher.calls == 1
    assert window.slices[0][0].completion_ids[0] == 5  # seq_kd: the teacher's sample
    assert window.slices[1][0].completion_ids[0] == 1
    fill_window(_slices(), [False] * 4, student, 0)
    assert student.calls == 1


def test_input_slices_are_not_mutated():
    slices = _slices()
    fill_window(slices, [True] * 4, RecordingEngine(1), 0)
    assert slices[0][0].completion_ids == [7, 7]


def test_mismatched_draws_raise():
    with pytest.raises(ValueError):
        fill_window(_slices(), [True], RecordingEngine(1), 0)
