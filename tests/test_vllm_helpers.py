"""vLLM engine helpers that need no vLLM: the log-prob guard and checkpoint names."""

from types import SimpleNamespace

from axolotl_gold.rollouts.vllm.sampling import _finite_logprobs, prompt_groups
from axolotl_gold.rollouts.vllm.weights import _checkpoint_name


def _sample(values):
    ids = list(range(1, len(values) + 1))
    return SimpleNamespace(token_ids=ids, logprobs=[{i: SimpleNamespace(logprob=v)} for i, v in zip(ids, values)])


def test_non_finite_sampled_logprobs_are_caught():
    assert _finite_logprobs(_sample([-0.1, -2.0]), 2)
    assert not _finite_logprobs(_sample([-0.1, float("nan")]), 2)
    assert not _finite_logprobs(_sample([float("-inf")]), 1)
    assert not _finite_logprobs(_sample([float("inf")]), 1)
    assert _finite_logprobs(_sample([-0.1, float("nan")]), 1)  # only the kept tokens count
    assert _finite_logprobs(SimpleNamespace(token_ids=[1], logprobs=None), 1)


def test_checkpoint_names_strip_peft_and_ddp_prefixes():
    assert _checkpoint_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer") == "model.layers.0.self_attn.q_proj"
    assert _checkpoint_name("module.lm_head.weight") == "lm_head.weight"


def test_prompt_groups_are_runs_of_identical_rows():
    a, b, c = [1, 2], [3], [1, 2]
    assert prompt_groups([a, a, a, a, b, b, b, b]) == [(0, 4), (4, 4)]  # num_generations 4
    assert prompt_groups([a, b, c]) == [(0, 1), (1, 1), (2, 1)]  # distinct rows, num_generations 1
    assert prompt_groups([]) == []
