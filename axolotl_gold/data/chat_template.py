"""Dataset strategy: chat conversations as GOLD prompt / completion rows.

Selected with ``type: axolotl_gold.data.chat_template`` (GOLD also routes plain
``type: chat_template`` datasets here). The prompt is every message before the last
assistant turn, rendered with the student's chat template and a generation prompt;
the off-policy completion is that last assistant turn as the template renders it,
ending on the token that ends a turn (see ``chat_turns``). Axolotl's
``chat_template_kwargs`` (``enable_thinking: false``, ...) apply to both. A prompt
over ``sequence_len - max_completion_length`` drops its earliest turns, keeping the
system prompt; a row whose last user turn alone is too long is refused. A
conversation that ends on a user turn is a prompt-only row, allowed when ``lmbda``
is 1 (every slice samples).

Each row becomes:

- ``input_ids``: prompt ids + completion ids (what Axolotl's length filters see),
- ``gold_prompt_length``: how many of those ids are prompt,
- ``gold_prompt_messages`` (JSON) and ``gold_completion_text``: the text, so a
  teacher with another tokenizer can render its own prompt (ULD),
- ``gold_teacher``: with ``teacher_servers``, the row's ``teacher_column`` value, the
  name of the teacher server that scores its rollouts,
- ``labels``/``attention_mask``: placeholders Axolotl's pipeline expects (rows whose
  labels are all -100 are dropped by it); GOLD builds its own masks per window.
"""

from __future__ import annotations

import json
from typing import Any

from axolotl.prompt_tokenizers import DatasetWrappingStrategy

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.settings import GoldSettings
from axolotl_gold.data.turns import end_of_completion_id, fit_prompt, stop_token_ids

IMAGE_TYPES = ("image", "image_url")

_ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}


def normalize_messages(row: dict, ds_cfg: dict | None = None) -> list[dict]:
    """Messages of one row as ``[{"role", "content"}]`` with standard role names."""
    ds_cfg = ds_cfg or {}
    field = ds_cfg.get("field_messages") or (
        "messages" if "messages" in row else "conversations"
    )
    raw = row.get(field)
    if raw is None:
        raise KeyError(field)
    mappings = ds_cfg.get("message_property_mappings") or {}
    role_key = mappings.get("role") or ("role" if raw and "role" in raw[0] else "from")
    content_key = mappings.get("content") or (
        "content" if raw and "content" in raw[0] else "value"
    )
    roles = {}
    for target, sources in (ds_cfg.get("roles") or {}).items():
        for source in sources:
            roles[source] = target
    messages = []
    for message in raw:
        role = message.get(role_key)
        role = roles.get(role, _ROLE_ALIASES.get(role, role))
        messages.append({"role": role, "content": message.get(content_key)})
    return messages


def is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_TYPES


def message_has_images(messages: list[dict]) -> bool:
    return any(
        is_image_part(part)
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
    )


def row_has_images(row: dict, messages: list[dict], images_field: str = "images") -> bool:
    return message_has_images(messages) or bool(row.get(images_field))


def split_prompt_completion(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt messages, completion text or None for a prompt-only row)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def render_prompt_ids(tokenizer, prompt_messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """Prompt ids as the chat template renders them, with the generation prompt.

    The template writes its own BOS and header, so nothing is added on top.
    """
    text = tokenizer.apply_chat_template(
        prompt_messages, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids_for(
    tokenizer, prompt_messages, completion: str, template=None, template_kwargs=None, stops=None
) -> list[int]:
    """Token ids of the completion as the chat template renders it, ending on its stop token.

    The completion is what rendering the full conversation adds to the rendered prompt
    (generation prompt included), cut after the first stop token (``stop_token_ids``:
    the template's turn end, such as Gemma's ``<end_of_turn>``, or eos). A template that
    does not extend its prompt, or writes no stop token, gives the plain text plus the
    template's turn end (eos when it has none). ``template`` is whatever owns the chat
    template (a processor), default the tokenizer. ``stops``: ``(stop ids, end id)``,
    computed once per dataset by the caller (default: from the template).
    """
    template = template or tokenizer
    kwargs = template_kwargs or {}
    if stops is None:
        stops = (stop_token_ids(template, template_kwargs=kwargs), end_of_completion_id(template, kwargs))
    stops, end = stops
    prompt_text = template.apply_chat_template(
        prompt_messages, add_generation_prompt=True, tokenize=False, **kwargs
    )
    full_text = template.apply_chat_template(
        prompt_messages + [{"role": "assistant", "content": completion}], tokenize=False, **kwargs
    )
    if full_text.startswith(prompt_text):
        ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        for k, token in enumerate(ids):
            if token in stops:
                return ids[: k + 1]
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids + ([end] if end is not None else [])


class GoldChatStrategy(DatasetWrappingStrategy):
    """Turns conversation rows into GOLD prompt/completion rows (see module doc)."""

    def __init__(self, tokenizer, cfg, ds_cfg: dict | None = None):
        self.tokenizer = tokenizer
        self.ds_cfg = dict(ds_cfg or {})
        settings = GoldSettings.from_cfg(cfg)
        self.lmbda = settings.lmbda
        self.max_completion = settings.max_completion_length
        self.max_prompt = settings.max_prompt_length
        # Axolotl's own key, for prompts and completions alike (e.g. enable_thinking)
        self.teachers = sorted(settings.teacher_server.servers)  # several teacher servers
        self.teacher_column = settings.teacher_server.column
        self.template_kwargs = dict(settings.chat_template_kwargs)
        self.template_kwargs.update(self.ds_cfg.get("chat_template_kwargs") or {})
        self.stops = (
            stop_token_ids(tokenizer, template_kwargs=self.template_kwargs),
            end_of_completion_id(tokenizer, self.template_kwargs),
        )
        if tokenizer.chat_template is None:
            raise GoldConfigError(
                "the student tokenizer has no chat template: set `chat_template` "
                "(for example `chat_template: chatml`) or use a tokenizer that has one."
            )

    def process_row(self, row: dict, index: int) -> dict[str, Any]:
        try:
            messages = normalize_messages(row, self.ds_cfg)
        except KeyError as err:
            raise GoldConfigError(
                f"dataset row {index} has no messages field {err}: set `field_messages` "
                "in the dataset section to the column that holds the conversation."
            ) from err
        if row_has_images(row, messages, self.ds_cfg.get("field_images") or "images"):
            raise GoldConfigError(
                f"dataset row {index} has images but the student is text-only (no processor): "
                "use a vision-language `base_model` with `processor_type: AutoProcessor`, "
                "`skip_prepare_dataset: true` and `type: axolotl_gold.vision.chat_template`, or drop "
                "the images from the dataset."
            )
        prompt_messages, completion = split_prompt_completion(messages)
        if not any(m["role"] == "user" for m in prompt_messages):
            raise GoldConfigError(
                f"dataset row {index} has no user message before the last assistant "
                "turn, so there is no prompt to generate from: fix the row or the "
                "dataset's `field_messages` / `message_property_mappings`."
            )
        if completion is None and self.lmbda < 1.0:
            raise GoldConfigError(
                f"dataset row {index} has no assistant turn (prompt-only), which needs "
                f"`lmbda: 1.0` (every slice sampled on-policy); `lmbda` is {self.lmbda}."
            )
        fitted = fit_prompt(
            lambda m: render_prompt_ids(self.tokenizer, m, self.template_kwargs),
            prompt_messages,
            self.max_prompt,
        )
        if fitted is None:
            raise GoldConfigError(
                f"dataset row {index}: its last user turn alone renders to more than "
                f"{self.max_prompt} prompt tokens (`sequence_len - max_completion_length`): "
                "raise `sequence_len`, lower `max_completion_length`, or drop the row."
            )
        # earlier turns dropped whole: the template's header and BOS stay
        prompt_messages, prompt_ids = fitted
        completion_ids = (
            completion_ids_for(
                self.tokenizer, prompt_messages, completion, template_kwargs=self.template_kwargs,
                stops=self.stops,
            )[: self.max_completion]
            if completion is not None
            else []
        )
        input_ids = prompt_ids + completion_ids
        out = {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": list(input_ids),
            "gold_prompt_length": len(prompt_ids),
            "gold_prompt_messages": json.dumps(prompt_messages),
            "gold_completion_text": completion if completion is not None else "",
        }
        if self.teachers:
            out["gold_teacher"] = self.row_teacher(row, index)
        return out

    def row_teacher(self, row: dict, index: int) -> str:
        """The row's teacher name (``teacher_column``), one of ``teacher_servers``."""
        name = row.get(self.teacher_column)
        if name not in self.teachers:
            what = "has no" if name is None else f"has `{name}` in its"
            raise GoldConfigError(
                f"dataset row {index} {what} `{self.teacher_column}` column (`teacher_column`), "
                f"which must name one of `teacher_servers`: {self.teachers}. Fix the row, or "
                "set `teacher_column` to the column that names each row's teacher."
            )
        return name

    def wrap_dataset(self, dataset, process_count=None, keep_in_memory=False, **kwargs):
        return dataset.map(
            self.process_row,
            with_indices=True,
            remove_columns=list(dataset.column_names),
            num_proc=process_count,
            keep_in_memory=keep_in_memory,
            desc="GOLD prompts",
        )


def load(tokenizer, cfg, ds_cfg=None, processor=None):  # noqa: ARG001 - axolotl's signature
    return GoldChatStrategy(tokenizer, cfg, ds_cfg)
