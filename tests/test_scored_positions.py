"""The scored positions found on the host (``scoring_batch``'s ``scored_positions``): the loss
selects the same rows as the labels' boolean mask, with no ``nonzero`` on the device (which
waits for the device to learn the row count), and the count is the host's."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from axolotl_gold.data.batching import SCORED_POSITIONS, WEIGHT_GROUPS, Rollout, completion_token_count, weigh_rows
from axolotl_gold.scoring.loss import loss_sum, scoring_batch
from axolotl_gold.scoring.objectives import JsdObjective


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(getattr(i, "dtype", None) == torch.bool for i in args[1]):
            name = "boolean index"  # finds its rows with a nonzero: a wait on a device
        self.names.append(name)
        return func(*args, **(kwargs or {}))


def _model(seed):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).double()


def _batch(weights=None):
    g = torch.Generator().manual_seed(3)
    rows = [Rollout(prompt_ids=torch.randint(3, 64, (p,), generator=g).tolist(),
                    completion_ids=torch.randint(3, 64, (c,), generator=g).tolist())
            for p, c in ((5, 6), (9, 2), (7, 11), (3, 0))]
    batch = scoring_batch(rows, pad_id=0, multiple=4)
    if weights is not None:
        batch["row_weights"] = torch.tensor(weights)
    return batch


@pytest.mark.parametrize("weights", [None, [1, 3, 1, 2]])
@pytest.mark.parametrize("fused", [True, False])
def test_host_positions_give_the_masks_loss_and_gradient(fused, weights):
    student, teacher = _model(0), _model(1)
    objective = JsdObjective(beta=0.5, temperature=0.9, chunk_size=4, vocab_size=64)
    keyed = _batch(weights)
    masked = {k: v for k, v in keyed.items() if k != SCORED_POSITIONS}
    assert keyed[SCORED_POSITIONS].tolist() == (masked["completion_labels"] != -100).flatten().nonzero().flatten().tolist()
    batches = [keyed, masked]
    if weights is not None:  # as prepare_window weighs merged repeats: the groups found on the host
        grouped = {k: v for k, v in keyed.items() if k != "row_weights"}
        weigh_rows(grouped, weights)
        # scored rows: row 0's 6 tokens (weight 1), row 1's 2 (3), row 2's 11 (1); row 3 has none
        assert [(w, i.tolist()) for w, i in grouped[WEIGHT_GROUPS]] == [
            (1, [0, 1, 2, 3, 4, 5, *range(8, 19)]), (3, [6, 7])]
        assert completion_token_count(grouped) == 6 + 3 * 2 + 11
        batches.append(grouped)
    results = []
    for batch in batches:
        student.zero_grad(set_to_none=True)
        total, count = loss_sum(student, teacher, batch, objective, fused)
        (total / count).backward()
        results.append((float(total), int(count), [p.grad.clone() for p in student.parameters()]))
    (t1, c1, g1) = results[0]
    for t2, c2, g2 in results[1:]:
        assert c1 == c2 == (19 if weights is None else 6 + 3 * 2 + 11)
        assert t1 == pytest.approx(t2, rel=1e-12)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_keyed_batch_selects_and_counts_without_a_boolean_index_or_host_read():
    student, teacher = _model(0), _model(1)
    objective = JsdObjective(beta=0.5, temperature=0.9, chunk_size=4, vocab_size=64)
    keyed = _batch()
    masked = {k: v for k, v in keyed.items() if k != SCORED_POSITIONS}
    seen = {}
    for name, batch in (("keyed", keyed), ("masked", masked)):
        with Ops() as ops:
            loss_sum(student, teacher, batch, objective, True)
        seen[name] = ops.names
    assert "boolean index" not in seen["keyed"]
    assert seen["masked"].count("boolean index") == 2  # student's and teacher's rows
    # host reads of tensor values (`.item()`: a sync on CUDA): the mask's count is one more
    # (the rest are HF's, inside the models' forwards)
    reads = {name: names.count("_local_scalar_dense") for name, names in seen.items()}
    assert reads["masked"] == reads["keyed"] + 1
    with Ops() as ops:
        assert completion_token_count(keyed) == 19
    assert ops.names == []  # the count is the positions' shape, read on the host
