"""Several teacher servers, a teacher per row: ``teacher_servers`` (name -> URL).

Each row names its teacher (the dataset's ``teacher_column``, carried as ``Rollout.teacher``
into the batch the teacher reads, ``batch["teacher_names"]``). ``TeacherRouter`` stands
where one remote teacher would: it splits a scoring batch by teacher, asks each server for
its own rows (each client as with one server: its retries, its checks, and in exact mode
its own output head, read from that teacher's checkpoint, ``teacher_models``), and answers
``RoutedStates``, which ``scoring.routing.objective_sum`` scores group by group: the loss
sums are those of each row scored by its own teacher. ``prefetch`` hands every teacher its
rows of the window at once, so all servers are asked ahead, each by its own worker thread.
"""

from __future__ import annotations

import logging

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.models.compatibility import text_config
from axolotl_gold.scoring.routing import RoutedStates, batch_rows, take_rows

LOG = logging.getLogger(__name__)


class TeacherRouter:
    """Teacher clients by name (``HttpTeacher``s of one mode); rows routed by their name."""

    def __init__(self, teachers: dict, column: str = "teacher"):
        if not teachers:
            raise ValueError("a TeacherRouter needs at least one teacher")
        self.teachers = dict(teachers)
        self.column = column
        self.config = next(iter(self.teachers.values())).config  # one vocabulary (checked)

    def rows_by_teacher(self, batch: dict) -> dict[str, list[int]]:
        """Per teacher name (in order of first row), the batch's rows it scores."""
        names = batch.get("teacher_names")
        if names is None:
            names = [None] * batch_rows(batch)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if name not in self.teachers:
                raise GoldConfigError(
                    f"a training row names teacher {name!r} (dataset column `{self.column}`, "
                    f"`teacher_column`), not one of `teacher_servers`: {sorted(self.teachers)}. "
                    "Fix the dataset, or prepare it again (a dataset prepared before `teacher_servers` "
                    "was set has no teacher names: remove its `dataset_prepared_path`)."
                )
            groups.setdefault(name, []).append(row)
        return groups

    def completion_states(self, batch: dict, use_head_bypass: bool = True) -> RoutedStates:
        """Each teacher's completion states of its own rows (asked ahead by ``prefetch``
        when they were); a failed request raises here, so nothing trains on part of a batch."""
        return RoutedStates([
            (rows, self.teachers[name].completion_states(take_rows(batch, rows), use_head_bypass))
            for name, rows in self.rows_by_teacher(batch).items()
        ])

    def prefetch(self, batches: list[dict]) -> None:
        """Every teacher's rows of ``batches`` requested now, in order (each server by its own
        worker thread, so the servers answer side by side)."""
        per_teacher: dict[str, list[dict]] = {name: [] for name in self.teachers}
        for batch in batches:
            for name, rows in self.rows_by_teacher(batch).items():
                per_teacher[name].append(take_rows(batch, rows))
        for name, sub_batches in per_teacher.items():
            self.teachers[name].prefetch(sub_batches)

    def forward(self, *args, **kwargs):
        raise TypeError("a TeacherRouter is not run here: the scoring code calls `completion_states`")

    __call__ = forward


def check_teacher_servers(settings) -> dict:
    """Before any model loads: ``check_teacher_server`` for the one server, or for each of
    ``teacher_servers`` (their teachers sharing one vocabulary). Returns /health (or the
    model card) per name (``""`` for ``teacher_server_url``)."""
    from axolotl_gold.models.remote.teacher import check_teacher_server

    if not settings.teacher_server.servers:
        return {"": check_teacher_server(settings)}
    per_teacher = settings.per_teacher()
    same_vocabulary(settings, per_teacher)
    return {name: check_teacher_server(s) for name, s in per_teacher.items()}


def connect_teachers(settings, device):
    """The remote teacher of ``settings``: one client (``teacher_server_url``), or a
    ``TeacherRouter`` over ``teacher_servers``, each client checked against its server."""
    from axolotl_gold.models.remote.prompt_logprobs import connect_prompt_logprobs_teacher
    from axolotl_gold.models.remote.teacher import connect_teacher

    def connect(s):
        if s.teacher_server.mode == "prompt_logprobs":  # top-k log-probs: nothing loaded here
            return connect_prompt_logprobs_teacher(s)
        return connect_teacher(s, device)  # only the teacher's output head is loaded here

    if not settings.teacher_server.servers:
        return connect(settings)
    per_teacher = settings.per_teacher()
    same_vocabulary(settings, per_teacher)
    teachers = {name: connect(s) for name, s in per_teacher.items()}
    LOG.info("GOLD teachers by row (`%s`): %s", settings.teacher_server.column,
             ", ".join(f"{n} at {t.url}" for n, t in teachers.items()))
    return TeacherRouter(teachers, settings.teacher_server.column)


def same_vocabulary(settings, per_teacher: dict) -> None:
    """Every teacher's checkpoint has ``teacher_model``'s vocabulary size (rows of all teachers
    are scored against one student vocabulary); ``GoldConfigError`` naming the teacher."""
    from transformers import AutoConfig

    def vocab(teacher):
        return int(text_config(AutoConfig.from_pretrained(teacher.model, revision=teacher.revision)).vocab_size)

    want = vocab(settings.teacher)
    for name, s in per_teacher.items():
        if s.teacher.model != settings.teacher.model and vocab(s.teacher) != want:
            raise GoldConfigError(
                f"`teacher_models.{name}: {s.teacher.model}` has a vocabulary of {vocab(s.teacher)} "
                f"ids, `teacher_model: {settings.teacher.model}` of {want}: every teacher of "
                "`teacher_servers` must share the teacher tokenizer's vocabulary."
            )
