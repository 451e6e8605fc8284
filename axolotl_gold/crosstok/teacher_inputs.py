"""What a teacher with another tokenizer reads, and how its tokens align with ours.

For each row of a slice: the teacher's prompt (its own chat template on the row's
messages by default, or the student's rendered prompt re-tokenized), the completion
text re-encoded with the teacher tokenizer, and the byte-offset alignment between
the student's actual completion ids and the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from axolotl_gold.crosstok.alignment import align_completion, completion_byte_offsets, ids_byte_offsets
from axolotl_gold.data.batching import Rollout, build_scoring_batch
from axolotl_gold.data.turns import end_of_completion_id, fit_prompt, stop_token_ids


def student_completion_offsets(tokenizer, ids: list[int]) -> tuple[list[tuple[int, int]], str]:
    """Byte offsets of the student's own (possibly non-canonical) ids, and their text.

    Byte-level BPE places the ids directly; other tokenizers fall back to decoding
    growing prefixes (quadratic in the completion length, exact for any tokenizer
    whose decode is prefix-stable).
    """
    try:
        offsets, raw = ids_byte_offsets(tokenizer, ids)
        return offsets, raw.decode("utf-8", errors="replace")
    except ValueError:
        pass
    offsets, previous = [], 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True).encode("utf-8"))
        end = max(end, previous)
        offsets.append((previous, end))
        previous = end
    return offsets, tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class CrossTokenizerInputs:
    """Builds the teacher's batch and the alignment for one slice of rollouts."""

    student_tokenizer: object
    teacher_tokenizer: object
    max_prompt_length: int
    prompt_mode: str = "teacher_template"  # or "student_text" (the reference's behaviour)
    skip_student_eos: bool = True
    skip_teacher_eos: bool = True
    alignment_fallback: str | None = None  # "positional" for tokenizers without offsets
    teacher_vision: object | None = None  # the teacher's VisionEncoder (rows with images)
    # the teacher's chat_template_kwargs (``teacher_chat_template_kwargs``, default the student's)
    teacher_template_kwargs: dict = field(default_factory=dict)
    # ids that end a student completion; the trainer sets the set its engines stop on
    student_stop_ids: set[int] | None = None

    def __post_init__(self):
        if self.student_stop_ids is None:
            self.student_stop_ids = stop_token_ids(self.student_tokenizer)
        # a finished completion ends, on the teacher's side, as its template ends a turn
        self.teacher_end_id = end_of_completion_id(self.teacher_tokenizer, self.teacher_template_kwargs)

    def teacher_prompt(self, row: Rollout) -> list[int]:
        """The teacher's prompt ids of a text row (image rows: see ``__call__``).

        Too long for ``max_prompt_length``: the earliest turns go, as for the student's
        rows; the ids' end is kept only when even the last user turn is too long.
        """
        tok = self.teacher_tokenizer
        if self.prompt_mode == "teacher_template" and row.prompt_messages and tok.chat_template:
            def render(messages):
                text = tok.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False, **self.teacher_template_kwargs
                )
                return tok(text, add_special_tokens=False)["input_ids"]

            fitted = fit_prompt(render, row.prompt_messages, self.max_prompt_length)
            if fitted is not None:
                return fitted[1]
            ids = render(row.prompt_messages)
        else:
            text = self.student_tokenizer.decode(row.prompt_ids, skip_special_tokens=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_length:]

    def align_row(self, row: Rollout):
        """(teacher completion ids, student groups, teacher groups) of one row."""
        t_eos = self.teacher_end_id
        ids = list(row.completion_ids)
        ended = bool(ids) and ids[-1] in self.student_stop_ids
        s_offsets, text = student_completion_offsets(self.student_tokenizer, ids)
        t_ids, t_offsets = completion_byte_offsets(
            self.teacher_tokenizer, text, fallback=self.alignment_fallback
        )
        if ended and t_eos is not None:
            # the teacher scores stopping (its own turn end) too; zero-width at the end
            t_ids = list(t_ids) + [t_eos]
            if t_offsets is not None:
                end = len(text.encode("utf-8"))
                t_offsets = list(t_offsets) + [(end, end)]
        if t_offsets is None:
            s_offsets = None
        s_groups, t_groups = align_completion(
            s_offsets,
            t_offsets,
            num_student=len(ids),
            num_teacher=len(t_ids),
            # only an EOS is skipped: a completion cut at max length keeps its last token
            skip_student_eos=self.skip_student_eos and ended,
            skip_teacher_eos=self.skip_teacher_eos and ended,
        )
        return list(t_ids), s_groups, t_groups

    def __call__(self, rows: list[Rollout]) -> dict:
        completions, s_groups, t_groups = [], [], []
        for row in rows:
            t_ids, sg, tg = self.align_row(row)
            completions.append(t_ids)
            s_groups.append(sg)
            t_groups.append(tg)
        if self.teacher_vision is not None and any(r.images for r in rows):
            # its own template and image tokens, the same images; encoded once, in the batch
            vision = self.teacher_vision
            texts = [vision.render(r.prompt_messages) for r in rows]
            teacher = vision.scoring_batch(None, completions, texts, [r.images for r in rows])
        else:
            pad = self.teacher_tokenizer.pad_token_id
            if pad is None:
                pad = self.teacher_tokenizer.eos_token_id
            teacher = build_scoring_batch([self.teacher_prompt(r) for r in rows], completions, pad)
        return {
            "teacher": teacher,
            "uld_student_ids": [list(r.completion_ids) for r in rows],
            "uld_teacher_ids": completions,
            "uld_student_groups": s_groups,
            "uld_teacher_groups": t_groups,
        }
