import json

import pytest
from transformers import AutoTokenizer

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.data.chat_template import GoldChatStrategy, normalize_messages


def _strategy(tiny_pair, **cfg):
    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    base = {"lmbda": 0.5, "max_completion_length": 8, "sequence_len": 24}
    base.update(cfg)
    return tok, GoldChatStrategy(tok, base, {})


def test_prompt_is_rendered_with_generation_prompt_and_completion_ends_on_eos(tiny_pair):
    tok, strategy = _strategy(tiny_pair)
    messages = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]
    row = strategy.process_row({"messages": messages}, 0)
    n = row["gold_prompt_length"]
    prompt_text = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert row["input_ids"][:n] == tok(prompt_text, add_special_tokens=False)["input_ids"]
    completion = row["input_ids"][n:]
    assert completion[-1] == tok.eos_token_id
    assert completion[:-1] == tok("cba", add_special_tokens=False)["input_ids"]
    assert json.loads(row["gold_prompt_messages"]) == messages[:1]
    assert row["gold_completion_text"] == "cba"


def test_long_prompt_drops_its_earliest_turns(tiny_pair):
    tok, strategy = _strategy(tiny_pair, sequence_len=40, max_completion_length=8)
    turns = [
        {"role": "user", "content": "reverse: " + "abcdefghij" * 2},
        {"role": "assistant", "content": "jihgfedcba" * 2},
        {"role": "user", "content": "reverse: abc"},
        {"role": "assistant", "content": "cba"},
    ]
    row = strategy.process_row({"messages": turns}, 0)
    n = row["gold_prompt_length"]
    kept = tok(tok.apply_chat_template(turns[2:3], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    assert row["input_ids"][:n] == kept  # whole turns, not the ids' tail
    assert json.loads(row["gold_prompt_messages"]) == turns[2:3]


def test_last_user_turn_over_budget_is_refused(tiny_pair):
    _, strategy = _strategy(tiny_pair, sequence_len=20, max_completion_length=8)
    long = "reverse: " + "abcdefghij" * 3
    with pytest.raises(GoldConfigError, match="dataset row 4: its last user turn"):
        strategy.process_row({"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "x"}]}, 4)


def test_prompt_only_rows_need_lmbda_one(tiny_pair):
    _, strategy = _strategy(tiny_pair)
    with pytest.raises(GoldConfigError, match=r"row 3 .*`lmbda: 1.0`"):
        strategy.process_row({"messages": [{"role": "user", "content": "hi"}]}, 3)
    _, strategy = _strategy(tiny_pair, lmbda=1.0)
    row = strategy.process_row({"messages": [{"role": "user", "content": "hi"}]}, 3)
    assert row["gold_prompt_length"] == len(row["input_ids"])


def test_row_without_prompt_is_an_error(tiny_pair):
    _, strategy = _strategy(tiny_pair)
    with pytest.raises(GoldConfigError, match="row 7 has no user message"):
        strategy.process_row({"messages": [{"role": "assistant", "content": "x"}]}, 7)
    with pytest.raises(GoldConfigError, match="set `field_messages`"):
        strategy.process_row({"text": "x"}, 1)


def test_sharegpt_style_rows_are_normalized():
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    assert normalize_messages(row) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
