"""`teacher_server_mode: prompt_logprobs` against real vLLM (CPU build): vLLM's OpenAI-compatible
server on loopback serves the tiny teacher; the client's top-k equals the local teacher's, the
checks at start refuse another tokenizer, a too-short `max_model_len`, a capped top-k and ids
outside the vocabulary; `axolotl train` runs with it."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from axolotl_run import gold_config, log_history, run_train, windows  # noqa: E402
from server_process import free_port, served  # noqa: E402

MAX_LOGPROBS = 50
SERVER_LOG = {}



@pytest.fixture(scope="module")
def vllm_teacher(tiny_pair, tmp_path_factory):
    """``vllm serve`` (its OpenAI-compatible api_server) of the tiny teacher."""
    port = free_port()
    SERVER_LOG["path"] = tmp_path_factory.mktemp("vllm_teacher") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_pair["teacher"],
           "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
           "--max-logprobs", str(MAX_LOGPROBS)]
    # unbuffered: the access log is read while the server runs
    with served(cmd, SERVER_LOG["path"], "/v1/models", 240, port, PYTHONUNBUFFERED="1") as url:
        yield url


def _teacher(pair, url, **kwargs):
    from transformers import AutoConfig, AutoTokenizer

    from axolotl_gold.models.remote.prompt_logprobs import PromptLogprobsTeacher

    tok = AutoTokenizer.from_pretrained(pair["teacher"])
    kwargs.setdefault("top_k", 5)
    remote = PromptLogprobsTeacher(url, AutoConfig.from_pretrained(pair["teacher"]), kwargs.pop("vocab_size", len(tok)),
                                   model_id=pair["teacher"], **kwargs)
    return remote, tok


def _batch(pad_id):
    from axolotl_gold.data.batching import build_scoring_batch

    # left-padded prompts, right-padded completions, a row with nothing scored
    return build_scoring_batch([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]],
                               [[20, 21, 22], [23, 24, 25, 26, 27], []], pad_id)


def test_top_k_and_the_loss_equal_the_local_teacher(vllm_teacher, tiny_pair):
    from transformers import AutoModelForCausalLM

    from axolotl_gold.scoring.forward import completion_states
    from axolotl_gold.scoring.topk import TopKStates, TopKTailObjective

    remote, tok = _teacher(tiny_pair, vllm_teacher, top_k=5)
    assert remote.check_server(tok, 64)["id"] == tiny_pair["teacher"]
    batch = _batch(tok.pad_token_id)
    got = remote.completion_states(batch)
    mask = batch["completion_labels"] != -100
    assert got.ids.shape == (*mask.shape, 6) and (got.ids[~mask] == -1).all()

    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32)
    with torch.no_grad():
        logp = completion_states(teacher, batch, use_head_bypass=False).values.log_softmax(-1)
    top = logp.topk(5, dim=-1)
    n_extra = 0
    for b, j in mask.nonzero().tolist():
        ids, lp = got.ids[b, j], got.logprobs[b, j]
        listed = ids >= 0
        token = int(batch["completion_labels"][b, j])
        assert token in ids.tolist()  # vLLM lists the scored token, inside the top-k or not
        n_extra += int(listed.sum()) == 6
        torch.testing.assert_close(lp[listed], logp[b, j, ids[listed]], rtol=0, atol=1e-4)
        # the five most likely are the local top-5 (values; ids may swap within a tie)
        torch.testing.assert_close(lp[:5], top.values[b, j], rtol=0, atol=1e-4)
    assert n_extra > 0  # some scored token fell outside the top-5: k + 1 entries there

    # the loss on vLLM's answer equals the loss on the local teacher's own top-k + own token
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    s_states = completion_states(student, batch, use_head_bypass=True)
    local_ids = torch.cat([top.indices, batch["completion_labels"].clamp(min=0)[..., None]], -1)
    local_ids[..., 5] = torch.where((local_ids[..., :5] == local_ids[..., 5:]).any(-1), -1, local_ids[..., 5])
    local = TopKStates(local_ids, logp.gather(-1, local_ids.clamp(min=0)))
    objective = TopKTailObjective(beta=0.5, temperature=1.0, chunk_size=4)
    torch.testing.assert_close(objective(s_states, got, batch), objective(s_states, local, batch), rtol=1e-4, atol=1e-5)


def test_the_checks_at_start(vllm_teacher, tiny_pair, tiny_cross_pair):
    from transformers import AutoTokenizer

    from axolotl_gold.config.errors import GoldConfigError
    from axolotl_gold.models.remote.teacher import TeacherServerError

    remote, tok = _teacher(tiny_pair, vllm_teacher)
    with pytest.raises(GoldConfigError, match=r"max_model_len 128.*--max-model-len 129"):
        remote.check_server(tok, 128)
    other = AutoTokenizer.from_pretrained(tiny_cross_pair["teacher"])  # another vocabulary
    with pytest.raises(GoldConfigError, match="tokenizer") as err:
        remote.check_server(other, 64)
    assert vllm_teacher in str(err.value) and "teacher_model" in str(err.value)
    small, _ = _teacher(tiny_pair, vllm_teacher, vocab_size=40)  # ids beyond the tokenizer's vocabulary
    with pytest.raises(GoldConfigError, match="outside the vocabulary of 40 ids"):
        small.check_server(tok, 64)
    capped, _ = _teacher(tiny_pair, vllm_teacher, top_k=MAX_LOGPROBS + 1)
    with pytest.raises(TeacherServerError, match=f"teacher_server_top_k.*--max-logprobs {MAX_LOGPROBS + 1}"):
        capped.check_server(tok, 64)


def test_unreachable_server_names_the_key_and_the_command(tiny_pair):
    from axolotl_gold.models.remote.teacher import TeacherServerError

    url = f"http://127.0.0.1:{free_port()}"
    remote, tok = _teacher(tiny_pair, url, retries=2, backoff=0.0, timeout=2)
    with pytest.raises(TeacherServerError, match=f"{url} did not answer GET /v1/models after 2 tries") as err:
        remote.check_server(tok, 64)
    assert "vllm serve" in str(err.value) and "`teacher_server_url`" in str(err.value)


@pytest.mark.e2e
def test_axolotl_train_with_a_prompt_logprobs_teacher(vllm_teacher, tiny_pair, tmp_path):
    def scored() -> int:
        return SERVER_LOG["path"].read_text().count("POST /v1/completions")

    before = scored()
    cfg = gold_config(tiny_pair, tmp_path, teacher_server_url=vllm_teacher, teacher_server_mode="prompt_logprobs",
                      teacher_server_top_k=20, lmbda=0.5, max_steps=3)
    out = run_train(cfg, tmp_path)
    losses = [h["loss"] for h in log_history(out, 3) if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    assert len(windows(out)) == 3
    # the checks at start (before loading, then at assembly), then one request per micro-step
    assert scored() - before == 2 + 3 * 2


@pytest.mark.e2e
def test_two_training_processes_share_the_vllm_teacher(vllm_teacher, tiny_pair, tmp_path):
    """DDP over gloo (torchrun, 2 processes): each process asks vLLM for its own slices."""
    cfg = gold_config(tiny_pair, tmp_path, teacher_server_url=vllm_teacher, teacher_server_mode="prompt_logprobs",
                      micro_batch_size=2, gradient_accumulation_steps=1, max_steps=2, save_steps=2)
    out = run_train(cfg, tmp_path, num_processes=2)
    losses = [h["loss"] for h in log_history(out, 2) if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(l) and l > 0 for l in losses)
