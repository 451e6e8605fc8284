"""The teacher's view of a slice when it has another tokenizer."""

import pytest
from transformers import AutoTokenizer

from axolotl_gold.data.batching import Rollout
from axolotl_gold.crosstok.teacher_inputs import CrossTokenizerInputs, student_completion_offsets


@pytest.fixture(scope="module")
def toks(tiny_cross_pair):
    return (
        AutoTokenizer.from_pretrained(tiny_cross_pair["student"]),
        AutoTokenizer.from_pretrained(tiny_cross_pair["teacher"]),
    )


def _row(student_tok, prompt="encode: hello", answer="abcde", eos=True):
    messages = [{"role": "user", "content": prompt}]
    text = student_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = student_tok(answer, add_special_tokens=False)["input_ids"]
    return Rollout(
        prompt_ids=student_tok(text, add_special_tokens=False)["input_ids"],
        completion_ids=ids + ([student_tok.eos_token_id] if eos else []),
        prompt_messages=messages,
    )


def test_teacher_renders_its_own_chat_template(toks):
    student_tok, teacher_tok = toks
    inputs = CrossTokenizerInputs(student_tok, teacher_tok, max_prompt_length=48)
    row = _row(student_tok)
    prompt = teacher_tok.decode(inputs.teacher_prompt(row))
    assert "[INST]" in prompt and "<|user|>" not in prompt  # the teacher's own markers
    legacy = CrossTokenizerInputs(student_tok, teacher_tok, 48, prompt_mode="student_text")
    assert "<|user|>" in teacher_tok.decode(legacy.teacher_prompt(row))


def test_completion_is_reencoded_and_groups_cover_the_same_bytes(toks):
    student_tok, teacher_tok = toks
    inputs = CrossTokenizerInputs(student_tok, teacher_tok, max_prompt_length=48, skip_student_eos=False, skip_teacher_eos=False)
    row = _row(student_tok, answer="qrstu vwxyz")
    t_ids, s_groups, t_groups = inputs.align_row(row)
    assert t_ids[-1] == teacher_tok.eos_token_id
    assert teacher_tok.decode(t_ids[:-1]) == "qrstu vwxyz"
    s_off, _ = student_completion_offsets(student_tok, row.completion_ids)
    from axolotl_gold.crosstok.alignment import completion_byte_offsets

    _, t_off = completion_byte_offsets(teacher_tok, "qrstu vwxyz")
    t_off = list(t_off) + [(11, 11)]
    for sg, tg in zip(s_groups, t_groups):
        assert s_off[sg[-1]][1] == t_off[tg[-1]][1]  # each aligned pair ends on the same byte
    # every student token is in exactly one group, EOS paired with EOS at the end
    assert sorted(i for g in s_groups for i in g) == list(range(len(row.completion_ids)))
    assert s_groups[-1] == [len(row.completion_ids) - 1] and t_groups[-1] == [len(t_ids) - 1]


def test_eos_skipped_only_when_present(toks):
    student_tok, teacher_tok = toks
    inputs = CrossTokenizerInputs(student_tok, teacher_tok, max_prompt_length=48)
    with_eos = _row(student_tok, answer="abcde", eos=True)
    cut = _row(student_tok, answer="abcde", eos=False)  # truncated at max length: no EOS
    _, s_eos, _ = inputs.align_row(with_eos)
    _, s_cut, _ = inputs.align_row(cut)
    assert max(i for g in s_eos for i in g) == len(with_eos.completion_ids) - 2  # EOS left out
    assert max(i for g in s_cut for i in g) == len(cut.completion_ids) - 1  # last letter kept


def test_batch_has_teacher_tensors_and_alignment(toks):
    student_tok, teacher_tok = toks
    inputs = CrossTokenizerInputs(student_tok, teacher_tok, max_prompt_length=48)
    rows = [_row(student_tok, answer="abcde"), _row(student_tok, prompt="encode: xyzzy", answer="qq")]
    batch = inputs(rows)
    teacher = batch["teacher"]
    assert teacher["input_ids"].shape[0] == 2
    assert (teacher["completion_labels"] != -100).sum(1).tolist() == [len(t) for t in batch["uld_teacher_ids"]]
    assert len(batch["uld_student_groups"]) == 2


# --- chat families: a Qwen3-style student and a Gemma-style teacher -----------------------

def _family_pair():
    from tests.chat_families import FAMILIES

    return FAMILIES["qwen3"].tokenizer(), FAMILIES["gemma"].tokenizer()


def _family_row(student_tok, answer="The lazy dog.", end="<|im_end|>"):
    messages = [{"role": "user", "content": "The quick brown fox?"}]
    text = student_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = student_tok(answer, add_special_tokens=False)["input_ids"]
    return Rollout(
        prompt_ids=student_tok(text, add_special_tokens=False)["input_ids"],
        completion_ids=ids + ([student_tok.convert_tokens_to_ids(end)] if end else []),
        prompt_messages=messages,
    )


def test_a_turn_end_counts_as_the_end_and_the_teacher_ends_with_its_own():
    """Student stops on `<|im_end|>` (not its eos `<|endoftext|>`); the teacher is
    scored on `<end_of_turn>`, the token it ends a turn with, not its `<eos>`."""
    student_tok, teacher_tok = _family_pair()
    inputs = CrossTokenizerInputs(student_tok, teacher_tok, max_prompt_length=64, skip_student_eos=False, skip_teacher_eos=False)
    row = _family_row(student_tok)
    t_ids, s_groups, t_groups = inputs.align_row(row)
    assert t_ids == teacher_tok("The lazy dog.", add_special_tokens=False)["input_ids"] + [teacher_tok.convert_tokens_to_ids("<end_of_turn>")]
    assert s_groups[-1] == [len(row.completion_ids) - 1] and t_groups[-1] == [len(t_ids) - 1]
    skipping = CrossTokenizerInputs(student_tok, teacher_tok, max_prompt_length=64)
    _, s_groups, t_groups = skipping.align_row(row)
    assert max(i for g in s_groups for i in g) == len(row.completion_ids) - 2  # the turn end is skipped
    cut = _family_row(student_tok, end=None)
    t_cut, s_cut, _ = skipping.align_row(cut)
    assert t_cut == teacher_tok("The lazy dog.", add_special_tokens=False)["input_ids"]  # nothing appended
    assert max(i for g in s_cut for i in g) == len(cut.completion_ids) - 1


def test_student_stop_set_from_the_trainer_is_used():
    student_tok, teacher_tok = _family_pair()
    other = student_tok.convert_tokens_to_ids("<|im_start|>")  # stands for a generation_config eos
    inputs = CrossTokenizerInputs(student_tok, teacher_tok, 64, skip_student_eos=False, skip_teacher_eos=False, student_stop_ids={other})
    row = _family_row(student_tok, end="<|im_start|>")
    t_ids, _, _ = inputs.align_row(row)
    assert t_ids[-1] == teacher_tok.convert_tokens_to_ids("<end_of_turn>")


def test_teacher_prompt_uses_teacher_template_kwargs():
    from tests.chat_families import FAMILIES

    student_tok, teacher_tok = FAMILIES["gemma"].tokenizer(), FAMILIES["qwen3"].tokenizer()
    row = _family_row(student_tok, end="<end_of_turn>")
    no_think = CrossTokenizerInputs(student_tok, teacher_tok, 64, teacher_template_kwargs={"enable_thinking": False})
    assert teacher_tok.decode(no_think.teacher_prompt(row)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = CrossTokenizerInputs(student_tok, teacher_tok, 64)
    assert teacher_tok.decode(thinking.teacher_prompt(row)).endswith("<|im_start|>assistant\n")


def test_teacher_prompt_over_budget_drops_earliest_turns():
    student_tok, teacher_tok = _family_pair()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "the quick brown fox " * 6},
        {"role": "assistant", "content": "The lazy dog."},
        {"role": "user", "content": "The quick brown fox?"},
    ]
    render = lambda m: teacher_tok(teacher_tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]  # noqa: E731
    kept = render([messages[0], messages[3]])
    inputs = CrossTokenizerInputs(student_tok, teacher_tok, max_prompt_length=len(kept) + 2)
    row = Rollout(prompt_ids=[], completion_ids=[], prompt_messages=messages)
    ids = inputs.teacher_prompt(row)
    assert ids == kept and ids[0] == teacher_tok.bos_token_id
