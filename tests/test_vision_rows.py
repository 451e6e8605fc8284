"""Image rows: parsing, image sources, and the errors that name the row or key."""

import base64
import io
import json

import pytest
from PIL import Image

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.vision.rows import open_image, split_vision_row


def _png(color=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _user(*parts):
    return {"role": "user", "content": list(parts)}


TEXT = {"type": "text", "text": "what?"}
ANSWER = {"role": "assistant", "content": [{"type": "text", "text": "red"}]}


def test_every_image_source_in_order(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png((0, 255, 0)))
    b64 = base64.b64encode(_png((0, 0, 255))).decode()
    pil = Image.new("RGB", (5, 5), (9, 9, 9))
    messages = [
        _user(
            {"type": "image", "path": str(path)},
            {"type": "image", "base64": b64},
            {"type": "image", "url": "data:image/png;base64," + b64},
            {"type": "image", "image": pil},
            {"type": "image"},
            TEXT,
        ),
        ANSWER,
    ]
    column = [{"bytes": _png((1, 2, 3)), "path": None}]
    row = split_vision_row(messages, column, index=0)
    assert row.completion == "red"
    assert [p["type"] for p in row.prompt_messages[0]["content"]] == ["image"] * 5 + ["text"]
    assert all(p == {"type": "image"} for p in row.prompt_messages[0]["content"][:5])
    pixels = [open_image(spec).getpixel((0, 0)) for spec in row.images]
    assert pixels == [(0, 255, 0), (0, 0, 255), (0, 0, 255), (9, 9, 9), (1, 2, 3)]


def test_relative_paths_are_read_beside_the_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(_png())
    assert open_image("img/x.png", base_dirs=(str(tmp_path),)).size == (8, 6)


def test_prompt_only_row_and_string_content():
    row = split_vision_row([_user({"type": "image", "image": Image.new("RGB", (2, 2))}, TEXT)], None, 3)
    assert row.completion is None and len(row.images) == 1
    row = split_vision_row([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], None, 0)
    assert row.completion == "yo" and row.images == []


@pytest.mark.parametrize(
    "messages, column, needle",
    [
        ([_user({"type": "image"}, {"type": "image"}, TEXT), ANSWER], ["x.png"], "more image placeholders"),
        ([_user(TEXT), ANSWER], ["x.png"], "only 0 image placeholders"),
        (
            [_user(TEXT), {"role": "assistant", "content": [{"type": "image", "path": "x"}]}],
            None,
            "completions are text",
        ),
    ],
)
def test_placeholder_errors_name_the_row(messages, column, needle):
    with pytest.raises(GoldConfigError, match=needle) as err:
        split_vision_row(messages, column, index=7)
    assert "dataset row 7" in str(err.value)


def test_image_errors(tmp_path):
    with pytest.raises(GoldConfigError, match="does not exist"):
        open_image(str(tmp_path / "missing.png"), "dataset row 2")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(GoldConfigError, match="dataset row 2: the image cannot be decoded"):
        open_image(str(broken), "dataset row 2")
    with pytest.raises(GoldConfigError, match="cannot be decoded"):
        open_image(str(broken), "dataset row 2", load=False)
    with pytest.raises(GoldConfigError, match="is a URL"):
        open_image("https://example.com/cat.png", "dataset row 2")
    with pytest.raises(GoldConfigError, match="base64 image data cannot be decoded"):
        open_image({"base64": "not base64!!"}, "dataset row 2")


def test_check_rows_reports_the_bad_row(tmp_path):
    from axolotl_gold.vision.chat_template import check_rows

    good = tmp_path / "ok.png"
    good.write_bytes(_png())
    rows = [
        {"messages": [_user({"type": "image", "path": str(good)}, TEXT), ANSWER]},
        {"messages": [_user({"type": "image", "path": "ok.png"}, TEXT), ANSWER]},  # relative
        {"messages": [_user({"type": "image", "path": str(tmp_path / "nope.png")}, TEXT), ANSWER]},
    ]
    assert check_rows(rows[:2], {}, lmbda=0.5, base_dirs=(str(tmp_path),)) == 2
    with pytest.raises(GoldConfigError, match="dataset row 2: image path .* does not exist"):
        check_rows(rows, {}, lmbda=0.5, base_dirs=(str(tmp_path),))
    with pytest.raises(GoldConfigError, match="dataset row 0 .*prompt-only.*lmbda"):
        check_rows([{"messages": [_user({"type": "image", "path": str(good)}, TEXT)]}], {}, lmbda=0.5)


def test_text_strategy_refuses_image_rows(tiny_pair):
    from transformers import AutoTokenizer

    from axolotl_gold.data.chat_template import GoldChatStrategy

    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    strategy = GoldChatStrategy(tok, {"lmbda": 0.5, "sequence_len": 64, "max_completion_length": 8})
    row = {"messages": [_user({"type": "image", "path": "x.png"}, TEXT), ANSWER]}
    with pytest.raises(GoldConfigError, match="dataset row 4 has images but the student is text-only"):
        strategy.process_row(row, 4)
    with pytest.raises(GoldConfigError, match="text-only"):
        strategy.process_row({"messages": [_user(TEXT), ANSWER], "images": ["x.png"]}, 4)
    # a text row still takes the text path
    text_row = {"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "d"}]}
    out = strategy.process_row(text_row, 0)
    assert out["gold_prompt_length"] > 0 and json.loads(out["gold_prompt_messages"])[0]["content"] == "abc"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"skip_prepare_dataset": None}, "skip_prepare_dataset"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        ({"gold_rollout_compile": True}, "set `gold_generation_engine: static`"),
        ({"use_vllm": True}, "use_vllm"),
        ({"use_uld_loss": True, "uld_teacher_prompt": "student_text"}, "uld_teacher_prompt"),
        ({"datasets": [{"path": "x.jsonl", "type": "alpaca"}]}, "axolotl_gold.vision.chat_template"),
    ],
)
def test_vision_settings_are_checked_before_loading(overrides, key):
    _validate_vision_data(overrides, key)


def test_static_engine_and_its_compile_are_accepted_for_a_vision_student():
    _validate_vision_data({"gold_generation_engine": "static", "gold_rollout_compile": True}, None)


def _validate_vision_data(overrides, key):
    from axolotl_gold.config.validation import validate_gold_settings

    data = {
        "teacher_model": "t",
        "processor_type": "AutoProcessor",
        "skip_prepare_dataset": True,
        "datasets": [{"path": "x.jsonl", "type": "axolotl_gold.vision.chat_template"}],
    }
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    if key is None:
        validate_gold_settings(data)
        return
    with pytest.raises(GoldConfigError, match=key):
        validate_gold_settings(data)
