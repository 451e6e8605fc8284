"""A window's scoring batches moved to the device without a wait (``data.transfer.to_device``),
and a micro-step (student forward, teacher forward, loss, backward) that never waits for the
device either: the trainer queues a whole step and reads the device once, for the gradient
norm. On CUDA the tests queue a long kernel first (``torch.cuda._sleep``) and check it is still
running when the host comes back; a wait anywhere (a blocking copy, a scalar read) would have
let it finish."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from axolotl_gold.data.batching import Rollout, weigh_rows
from axolotl_gold.data.transfer import to_device
from axolotl_gold.scoring.loss import loss_sum, loss_total, scoring_batch
from axolotl_gold.scoring.objectives import JsdObjective

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="waits on a device need one")


def _batch(weights=None, nested=False):
    g = torch.Generator().manual_seed(3)
    rows = [Rollout(prompt_ids=torch.randint(3, 64, (p,), generator=g).tolist(),
                    completion_ids=torch.randint(3, 64, (c,), generator=g).tolist())
            for p, c in ((5, 6), (9, 2), (7, 11), (3, 1))]
    batch = scoring_batch(rows, pad_id=0, multiple=4)
    if weights is not None:
        weigh_rows(batch, weights)  # as prepare_window does: the weights' groups found here
    if nested:  # what another tokenizer's teacher and teacher servers add
        batch["teacher"] = {"input_ids": batch["input_ids"].clone(), "names": ["a", "b"]}
        batch["teacher_names"] = ["a", "b", None, "a"]
    return batch


def _model(seed, device):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).to(device)


def test_keeps_the_batch_as_it_is_on_its_own_device():
    batch = _batch(nested=True)
    moved = to_device(batch, "cpu")
    assert moved.keys() == batch.keys()
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert moved[key] is value  # nothing copied
    assert moved["teacher"]["input_ids"] is batch["teacher"]["input_ids"]
    assert moved["teacher"]["names"] == ["a", "b"] and moved["teacher_names"] == ["a", "b", None, "a"]


def test_the_loss_sums_count_is_the_hosts():
    student, teacher = _model(0, "cpu"), _model(1, "cpu")
    objective = JsdObjective(beta=0.5, temperature=0.9, chunk_size=4, vocab_size=64)
    batch = _batch()
    total, count = loss_sum(student, teacher, batch, objective, True)
    assert count.device.type == "cpu" and int(count) == 20
    assert torch.equal(total, loss_total(student, teacher, batch, objective, True))


def _queue_a_long_kernel() -> torch.cuda.Event:
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))  # about a second of spinning on the device
    done = torch.cuda.Event()
    done.record()
    return done


@cuda
def test_moves_to_cuda_behind_the_queued_work_and_hf_style_copies_wait():
    batch = _batch([1, 3, 1, 2], nested=True)
    done = _queue_a_long_kernel()
    moved = to_device(batch, "cuda")
    assert not done.query(), "to_device waited for the device"
    torch.cuda.synchronize()
    for key in ("input_ids", "attention_mask", "completion_labels", "row_weights"):
        assert moved[key].device.type == "cuda" and torch.equal(moved[key].cpu(), batch[key])
    assert moved["teacher"]["input_ids"].device.type == "cuda" and moved["teacher_names"] == batch["teacher_names"]
    # what HF's `_prepare_inputs` did: a blocking copy from pageable memory waits for the queue
    done = _queue_a_long_kernel()
    batch["input_ids"].to("cuda")
    assert done.query()


@cuda
@pytest.mark.parametrize("weights", [None, [1, 3, 1, 2]])
def test_a_micro_step_queues_without_waiting_for_the_device(weights):
    device = torch.device("cuda")
    student, teacher = _model(0, device), _model(1, device)
    objective = JsdObjective(beta=0.5, temperature=0.9, chunk_size=4, vocab_size=64)
    batch = to_device(_batch(weights), device)
    loss_total(student, teacher, batch, objective, True).backward()  # warm: kernels loaded, caches made
    student.zero_grad(set_to_none=True)
    done = _queue_a_long_kernel()
    loss = loss_total(student, teacher, batch, objective, True) / 20
    loss.backward()
    assert not done.query(), "the micro-step waited for the device"
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters())


def test_per_row_weights_are_read_from_the_hosts_list():
    """The per-row objectives (ULD) read ``weigh_rows``' host list, never the device tensor."""
    from axolotl_gold.scoring.objectives import UldObjective

    batch = _batch([1, 3, 1, 2])
    batch["row_weights"] = batch["row_weights"].to("meta")  # reading its values would raise
    batch["uld_student_groups"] = [[[0]], [[0], [1]], [], [[0]]]
    assert UldObjective(inputs=None, config=None).count(batch) == 1 * 1 + 3 * 2 + 0 + 2 * 1
