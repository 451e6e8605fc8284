"""Chat templates of the major families: prompt, dataset completion and stop token agree.

For each family the dataset row must end where the model ends a turn: the template's
turn-end token (Gemma ``<end_of_turn>``, Llama 3 ``<|eot_id|>``, Qwen ``<|im_end|>``,
Mistral ``</s>``), which is also in the one stop set every engine and ULD use.
References are plain strings written out by hand.
"""

import json

import pytest

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.data.chat_template import GoldChatStrategy
from axolotl_gold.data.turns import stop_token_ids, turn_end_id
from axolotl_gold.rollouts.engines.base import trim_completion
from tests.chat_families import FAMILIES

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "The quick brown fox?"}
ANSWER = {"role": "assistant", "content": "The lazy dog."}

# the completion each family's template writes for ANSWER, up to its turn end
EXPECTED_COMPLETION = {
    "qwen3": "<think>\n\n</think>\n\nThe lazy dog.<|im_end|>",
    "llama3": "The lazy dog.<|eot_id|>",
    "gemma": "The lazy dog.<end_of_turn>",
    "mistral": "The lazy dog.</s>",
}
EXPECTED_PROMPT = {
    "qwen3": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nThe quick brown fox?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nThe quick brown fox?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nThe quick brown fox?<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "<s>[INST] Be brief.\n\nThe quick brown fox?[/INST]",
}


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _row(tok, messages, index=0, **cfg):
    base = {"lmbda": 0.5, "max_completion_length": 32, "sequence_len": 256}
    base.update(cfg)
    ds_cfg = base.pop("ds_cfg", {})
    return GoldChatStrategy(tok, base, ds_cfg).process_row({"messages": messages}, index)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stop_set_is_eos_generation_config_and_turn_end(name):
    family = FAMILIES[name]
    tok = family.tokenizer()
    assert tok.convert_ids_to_tokens(turn_end_id(tok)) == family.turn_end
    expected = {tok.eos_token_id, tok.convert_tokens_to_ids(family.turn_end)}
    assert stop_token_ids(tok) == expected
    expected |= {tok.convert_tokens_to_ids(t) for t in family.generation_eos}
    assert stop_token_ids(tok, family.generation_config()) == expected


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_row_prompt_and_completion_match_the_template(name):
    family = FAMILIES[name]
    tok = family.tokenizer()
    row = _row(tok, [SYSTEM, USER, ANSWER])
    n = row["gold_prompt_length"]
    assert row["input_ids"][:n] == _ids(tok, EXPECTED_PROMPT[name])
    completion = row["input_ids"][n:]
    assert completion == _ids(tok, EXPECTED_COMPLETION[name])
    assert tok.convert_ids_to_tokens(completion[-1]) == family.turn_end
    if tok.eos_token != family.turn_end:
        assert tok.eos_token_id not in completion  # e.g. Gemma never writes `<eos>` after a turn


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_rollout_stops_where_the_dataset_completion_ends(name):
    """What the model emits when it ends a turn is cut by the engines' stop set exactly
    where the dataset completion ends: both sides score the same end-of-turn token."""
    family = FAMILIES[name]
    tok = family.tokenizer()
    row = _row(tok, [USER, ANSWER])
    dataset_completion = row["input_ids"][row["gold_prompt_length"]:]
    # the model continues past the turn end as its template would (newline, next header)
    emitted = dataset_completion + _ids(tok, "\n") + _ids(tok, "The quick")
    stops = stop_token_ids(tok, family.generation_config())
    assert trim_completion(emitted, stops) == dataset_completion


# not llama3: its prompt ends "\n\n", which byte-level BPE merges with the answer's first
# word when the conversation is tokenized whole (rollouts see the prompt's own tokens)
@pytest.mark.parametrize("name", ["gemma", "qwen3"])
def test_full_conversation_tokens_are_prompt_plus_completion(name):
    tok = FAMILIES[name].tokenizer()
    row = _row(tok, [SYSTEM, USER, ANSWER])
    full = _ids(tok, tok.apply_chat_template([SYSTEM, USER, ANSWER], tokenize=False))
    assert full[: len(row["input_ids"])] == row["input_ids"]


def test_qwen3_chat_template_kwargs_apply_to_prompt_and_completion():
    tok = FAMILIES["qwen3"].tokenizer()
    header = "<|im_start|>user\nThe quick brown fox?<|im_end|>\n<|im_start|>assistant\n"
    for cfg in ({"chat_template_kwargs": {"enable_thinking": False}},
                {"ds_cfg": {"chat_template_kwargs": {"enable_thinking": False}}}):
        row = _row(tok, [USER, ANSWER], **cfg)
        n = row["gold_prompt_length"]
        assert row["input_ids"][:n] == _ids(tok, header + "<think>\n\n</think>\n\n")
        assert row["input_ids"][n:] == _ids(tok, "The lazy dog.<|im_end|>")
    thinking = _row(tok, [USER, ANSWER])  # rollouts think: the completion opens the block
    n = thinking["gold_prompt_length"]
    assert thinking["input_ids"][:n] == _ids(tok, header)
    assert thinking["input_ids"][n:] == _ids(tok, "<think>\n\n</think>\n\nThe lazy dog.<|im_end|>")


def _conversation(turns):
    messages = [SYSTEM]
    for k in range(turns):
        messages += [
            {"role": "user", "content": f"Question {k}: the quick brown fox jumps over the lazy dog?"},
            {"role": "assistant", "content": f"Answer {k}: the lazy dog."},
        ]
    return messages


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_long_prompt_drops_earliest_turns_keeping_system_and_header(name):
    tok = FAMILIES[name].tokenizer()
    messages = _conversation(4)
    full_prompt = _ids(tok, tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False))
    kept = [SYSTEM] + messages[5:-1]  # the last two exchanges' prompt: user, answer, user
    kept_ids = _ids(tok, tok.apply_chat_template(kept, add_generation_prompt=True, tokenize=False))
    budget = len(kept_ids) + 3  # fits two exchanges, not three
    assert len(full_prompt) > budget
    row = _row(tok, messages, sequence_len=budget + 32, max_completion_length=32)
    n = row["gold_prompt_length"]
    assert row["input_ids"][:n] == kept_ids
    assert n <= budget
    assert [m["content"] for m in json.loads(row["gold_prompt_messages"])] == [m["content"] for m in kept]
    assert row["input_ids"][n:] == _ids(tok, EXPECTED_COMPLETION[name].replace("The lazy dog.", "Answer 3: the lazy dog."))
    bos = tok.bos_token_id
    if bos is not None:
        assert row["input_ids"][0] == bos  # left truncation would have cut it


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_last_user_turn_too_long_is_refused_with_its_row(name):
    tok = FAMILIES[name].tokenizer()
    messages = [SYSTEM, {"role": "user", "content": "the quick brown fox " * 40}, ANSWER]
    with pytest.raises(GoldConfigError, match=r"dataset row 5: its last user turn .* `sequence_len`"):
        _row(tok, messages, index=5, sequence_len=64, max_completion_length=16)


def test_runtime_added_tokens_must_be_in_the_teacher_vocabulary():
    """`special_tokens` / `tokens` grow the student's tokenizer as loaded; the teacher's
    (same on disk) lacks them, so same-tokenizer JSD has no teacher logit for them."""
    import copy

    from axolotl_gold.models.compatibility import check_added_tokens

    teacher = FAMILIES["gemma"].build()
    student = copy.deepcopy(teacher)
    cfg = {"special_tokens": {"eos_token": "<end_of_turn>"}}  # existing token: allowed
    student.add_special_tokens({"eos_token": "<end_of_turn>"})
    check_added_tokens(cfg, student, teacher)
    student.add_tokens(["<tool_call>"])
    with pytest.raises(GoldConfigError, match=r"`tokens` adds '<tool_call>'.*teacher"):
        check_added_tokens({"tokens": ["<tool_call>"]}, student, teacher)
    student.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    with pytest.raises(GoldConfigError, match=r"`special_tokens.additional_special_tokens` adds '<\|extra\|>'"):
        check_added_tokens({"special_tokens": {"additional_special_tokens": ["<|extra|>"]}}, student, teacher)


def test_plugin_checks_the_student_tokenizer_as_loaded(tmp_path):
    import copy

    from axolotl_gold.models.compatibility import check_runtime_tokens

    teacher = FAMILIES["llama3"].build()
    teacher.save_pretrained(tmp_path)  # the same tokenizer on disk for both
    student = copy.deepcopy(teacher)
    cfg = {"teacher_model": str(tmp_path), "special_tokens": {"pad_token": "<|pad|>"}}
    student.add_special_tokens({"pad_token": "<|pad|>"})  # what Axolotl does at load time
    with pytest.raises(GoldConfigError, match=r"`special_tokens.pad_token` adds '<\|pad\|>'"):
        check_runtime_tokens(cfg, student)
    check_runtime_tokens({"teacher_model": str(tmp_path), "special_tokens": {"eos_token": "<|eot_id|>"}}, student)
