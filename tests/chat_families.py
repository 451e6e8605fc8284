"""Tokenizers shaped like the chat families users distill, built locally (tokenizer_factory).

Each is a small byte-level BPE with the family's special tokens and a chat template
written after the family's own (trimmed to the parts GOLD reads): Qwen3 with thinking,
Llama 3, Gemma, Mistral. ``FAMILIES[name]`` gives the builder, the family's generation
config eos list, and the token the template writes when an assistant turn ends.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from tests.tokenizer_factory import CORPUS

QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    # the real template: the last assistant turn carries its (possibly empty) reasoning
    "{%- if loop.last %}{{- '<think>\\n' + (message.reasoning_content or '') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set first = messages[0].content + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message.content | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message.role == 'user' %}"
    "{%- if loop.last and system %}{{- '[INST] ' + system + '\\n\\n' + message.content + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message.content + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- message.content + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    build: object  # () -> PreTrainedTokenizerFast
    generation_eos: tuple[str, ...]  # the model's generation_config eos tokens
    turn_end: str  # what the template writes when an assistant turn ends

    def tokenizer(self):
        return self.build()

    def generation_config(self):
        tok = self.build()
        return GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids(t) for t in self.generation_eos])


def _bpe(specials: list[str], template: str, **named) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    hf.chat_template = template
    return hf


@functools.cache
def qwen3():
    """Qwen3 base-style: eos ``<|endoftext|>``, turns end ``<|im_end|>``; ``<think>`` is a plain added token."""
    tok = _bpe(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        QWEN3_TEMPLATE,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.add_tokens(["<think>", "</think>"])
    return tok


@functools.cache
def llama3():
    """Llama 3 base-style: eos ``<|end_of_text|>``, turns end ``<|eot_id|>``."""
    return _bpe(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>"],
        LLAMA3_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
    )


@functools.cache
def gemma():
    """Gemma: eos ``<eos>``, turns end ``<end_of_turn>``."""
    return _bpe(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        GEMMA_TEMPLATE,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


@functools.cache
def mistral():
    """Mistral: ``[INST] ... [/INST]``, turns end on eos ``</s>``."""
    return _bpe(
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        MISTRAL_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )


FAMILIES = {
    "qwen3": Family(qwen3, ("<|im_end|>", "<|endoftext|>"), "<|im_end|>"),
    "llama3": Family(llama3, ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "gemma": Family(gemma, ("<eos>", "<end_of_turn>"), "<end_of_turn>"),
    "mistral": Family(mistral, ("</s>",), "</s>"),
}
