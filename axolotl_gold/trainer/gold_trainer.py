"""The GOLD trainer: one optimizer window, top to bottom.

Per optimizer step, Axolotl's (HF's) loop asks ``get_batch_samples`` for the
window's micro-batches; here that is where GOLD happens::

    rollouts = the window's prompts (WindowSampler)
    draws    = policy_draws(seed, step)              # on/off-policy per slice
    window   = fill_window(rollouts, draws, engine)  # ONE generation call
    batches  = build_scoring_batch(slice) for each slice
    tokens   = scored tokens of the window, summed over processes

then, per micro-step, ``compute_loss`` runs student and teacher on its slice and
returns ``objective sum / tokens``. Evaluation samples the student on the held-out
prompts and reports per-token divergences (``axolotl_gold.trainer.evaluation``); every
``gold_log_completions_steps`` the window's completions are logged
(``axolotl_gold.trainer.completions_log``); a step whose gradients are not finite is not
applied (``axolotl_gold.trainer.nonfinite``). Everything else (optimizer, scheduler, logging,
checkpoints) is Axolotl's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import defaultdict

import torch
from axolotl.core.trainers.base import AxolotlTrainer

from axolotl_gold.config.settings import GoldSettings
from axolotl_gold.config.validation import graphed_compile
from axolotl_gold.data.sampler import WindowSampler
from axolotl_gold.data.transfer import to_device
from axolotl_gold.data.turns import text_tokenizer
from axolotl_gold.rollouts.window import policy_draws
from axolotl_gold.scoring.forward import bypassable_head
from axolotl_gold.scoring.loss import TEACHER_SECONDS, loss_sum, loss_total, teacher_scoring_batch
from axolotl_gold.scoring.timing import Stopwatch, mark, synchronize
from axolotl_gold.trainer.attention_backends import training_attention
from axolotl_gold.trainer.completions_log import (
    COMPLETIONS_LOG,
    append_jsonl,
    completion_records,
    log_to_trackers,
    row_scores,
)
from axolotl_gold.trainer.evaluation import EvalTotals, sample_eval_rows
from axolotl_gold.trainer.grad_buffers import own_grad_buffers
from axolotl_gold.trainer.nonfinite import NonFiniteSteps, hold_schedule
from axolotl_gold.trainer.parts import GoldParts
from axolotl_gold.trainer.window import prepare_window
from axolotl_gold.vision.batch import rollout_inputs

WINDOW_LOG = "gold_windows.jsonl"
STEP_SECONDS = "micro_steps"  # the training micro-steps' spans: the student's and the teacher's time


def _allocated_gib() -> float | None:
    """CUDA memory allocated by this process now, GiB (None without CUDA)."""
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


class GoldTrainer(AxolotlTrainer):
    """Axolotl's trainer with GOLD's window, rollouts and objective."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss divides by the window's token count itself: no GA rescaling
        self.model_accepts_loss_kwargs = True
        self.gold: GoldSettings | None = None
        self.teacher = None
        self.objective = None
        self.student_engine = None
        self.teacher_engine = None
        self.vision = None
        self._gold_sums: dict[str, float] = defaultdict(float)
        self._gold_clock = Stopwatch()  # the teacher's and the micro-steps' device time
        self._gold_windows = 0
        self._gold_tokenizer = None
        self._eval_totals: EvalTotals | None = None
        self._eval_batches = 0
        self.sharding = None
        self._nonfinite = NonFiniteSteps()

    # ------------------------------------------------------------------ setup
    def setup_gold(self, parts: GoldParts) -> None:
        """Take the parts ``axolotl_gold.assembly`` built (called by the plugin)."""
        self.gold = parts.settings
        self.teacher = parts.teacher
        self.objective = parts.objective
        self.vision = parts.vision
        self.student_engine = parts.student_engine
        self.teacher_engine = parts.teacher_engine
        self.pad_id = parts.pad_id
        self.sharding = parts.sharding
        self._gold_tokenizer = parts.tokenizer  # decodes the completions log
        self.data_collator = parts.collator
        self.eval_data_collator = parts.collator
        # HF's loop reads each micro-step's loss on the host to keep a NaN out of the logged
        # loss (`logging_nan_inf_filter`): a wait for the device after every backward, which
        # leaves it idle while the host starts the next micro-step (most visible under CUDA
        # graphs). A non-finite step is GOLD's to handle (``trainer.nonfinite``: its gradients
        # dropped, a warning, ``gold/skipped_steps``); its loss is logged as it is.
        self.args.logging_nan_inf_filter = False

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume as HF does, unless the sharding strategy loads the checkpoint itself
        (a LoRA student under FSDP2 with ``FULL_STATE_DICT``)."""
        target = model if model is not None else self.model
        if self.sharding is not None and self.sharding.load_checkpoint(
            self.accelerator, target, resume_from_checkpoint
        ):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # ------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        if self.gold is None:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return WindowSampler(
            num_rows=len(dataset),
            micro_batch_size=self.args.per_device_train_batch_size,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            num_generations=self.gold.num_generations,
            num_processes=self.accelerator.num_processes,
            seed=self.args.seed,
        )

    def _remove_unused_columns(self, dataset, description=None):
        if self.gold is None:
            return super()._remove_unused_columns(dataset, description)
        return dataset  # the GOLD collator reads its own columns

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        if self.gold is None:
            return super()._get_collator_with_removed_columns(data_collator, description)
        return data_collator

    # ------------------------------------------------------------------ window
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.gold is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return [], None

        self._teacher_engine_ready()
        at_window = _allocated_gib()  # weights, optimizer state, what the last step left
        calls_before = self.student_engine.calls
        step = self.state.global_step
        draws = policy_draws(self.gold.seed, step, len(batches), self.gold.lmbda)  # once per window
        synchronize(device)  # the last step's queued work is not the generation's time (once a window)
        with self._generation_weights(draws):
            prepared = prepare_window(
                [b["gold_rollouts"] for b in batches],
                draws=draws,
                step=step,
                seed=self.gold.seed,
                rank=self.accelerator.process_index,
                pad_id=self.pad_id,
                student_engine=self.student_engine,
                objective=self.objective,
                teacher_engine=self.teacher_engine,
                vision=self.vision,
                width_multiple=self.gold.scoring_width_multiple,
            )
        window = prepared.window
        if at_window is not None:  # where a step's peak sits: before the student's step or in it
            self._gold_sums["gold/memory_at_window_gib"] += at_window
            self._gold_sums["gold/peak_generation_gib"] += torch.cuda.max_memory_allocated() / 2**30
        prefetch = getattr(self.teacher, "prefetch", None)  # a teacher server: slice k+1 ahead
        if prefetch is not None:
            prefetch([batch.get("teacher", batch) for batch in prepared.micro_batches])
        # queued behind the device's work: HF's own move would wait for it once per tensor
        micro_batches = [to_device(batch, device) for batch in prepared.micro_batches]
        total = torch.tensor(prepared.local_tokens, device=device, dtype=torch.long)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        total = total.clamp(min=1)

        lengths = window.completion_lengths()
        self._gold_sums["gold/on_policy_fraction"] += sum(draws) / len(draws)
        self._gold_sums["gold/completion_length"] += sum(lengths) / max(len(lengths), 1)
        self._gold_sums["gold/time_generation_s"] += prepared.generation_seconds
        self._gold_sums["gold/scored_tokens"] += int(total)
        self._gold_sums["gold/completion_tokens"] += sum(lengths)
        self._gold_windows += 1
        calls = self.student_engine.calls - calls_before
        widths = [int(b["input_ids"].shape[1]) for b in micro_batches]
        self._record_window(step, draws, window, int(total), calls, widths)
        every = self.gold.log_completions_steps
        if every and (self.state.global_step + 1) % every == 0:
            self._log_completions(window)
        return micro_batches, total

    def _teacher_engine_ready(self) -> None:
        self.teacher = self.sharding.window_ready(self.model_wrapped, self.teacher, self.accelerator)

    def _generation_weights(self, draws: list[bool]):
        """The weights the window's engine call samples from, gathered once for it when
        sharded: the student's when a slice is on-policy (the draws are known in advance
        and the same on every process), the teacher's too for ``seq_kd``'s other slices."""
        sampling_teacher = self.teacher_engine is not None and not all(draws)
        return self.sharding.rollout_weights(
            self.model_wrapped if any(draws) else None, self.teacher if sampling_teacher else None
        )

    def _head_weights(self):
        """With the fused loss: the output heads the loss applies itself, gathered once
        for a micro-step (forward, loss and backward) when sharded."""
        if not self.gold.fused_loss:
            return contextlib.nullcontext()
        return self.sharding.head_weights(self.model_wrapped, self.teacher)

    def _record_window(self, step, draws, window, tokens, calls, widths) -> None:
        """Append the window's draws and prompts to ``gold_windows.jsonl`` (main process)."""
        if not self.accelerator.is_main_process:
            return
        h = hashlib.sha1(json.dumps([r.prompt_ids for s in window.slices for r in s]).encode())
        for image in (i for s in window.slices for r in s for i in r.images):
            h.update(image.tobytes())  # image rows: the pixels, not only their tokens
        digest = h.hexdigest()
        record = {
            "step": step,
            "on_policy": draws,
            "prompts_sha1": digest,
            "scored_tokens": tokens,
            "engine_calls": calls,
            "engine_calls_total": self.student_engine.calls,
            "scoring_widths": widths,  # each micro-batch's prompt + completion width (padded)
            "teacher_engine_calls_total": self.teacher_engine.calls if self.teacher_engine else 0,
            "engine": type(self.student_engine).__name__,
            # calls the static engine handed to HF generate (a model it cannot serve)
            "engine_fallbacks": getattr(self.student_engine, "fallbacks", 0),
            # prompts the static engine started in slots of stopped rows (`gold_generation_rows`)
            "engine_refills": getattr(self.student_engine, "refills", 0),
        }
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, WINDOW_LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.gold is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        parts = (model, self.teacher, inputs, self.objective, self.gold.fused_loss, self._gold_clock)
        if num_items_in_batch is None:  # outside a window (e.g. a direct call): local mean
            total, tokens = loss_sum(*parts)
            loss = total / tokens.clamp(min=1)
        else:
            # DDP averages gradients over processes: undo it, the count is already global
            loss = loss_total(*parts) / num_items_in_batch * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.gold is None:
            return super().training_step(model, inputs, num_items_in_batch)
        # the micro-step's time on the device (no wait for it), less the teacher's share
        device = self.accelerator.device
        start = mark(device)
        if graphed_compile(self.args.torch_compile, self.args.torch_compile_mode):
            # the backward's CUDA graph must not own .grad (see trainer.grad_buffers)
            own_grad_buffers(model.parameters())
        # across forward and backward: the sharded head, and attention without cuDNN's kernels
        # (whose backward gives NaN at some widths; trainer.attention_backends)
        with self._head_weights(), training_attention():
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._gold_clock.add(STEP_SECONDS, start, mark(device))
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """HF's gradient norm before each optimizer step; non-finite, the step's gradients are
        dropped (``trainer.nonfinite``; DeepSpeed holds its gradients itself: not there)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.gold is not None and not self.is_deepspeed_enabled:
            skipped = self._nonfinite.skip(grad_norm, self.state.global_step)
            if skipped:
                model.zero_grad(set_to_none=True)  # the optimizer skips parameters without one
            hold_schedule(self.optimizer, skipped)  # no scheduler step after a skipped one
        return grad_norm

    # ------------------------------------------------------------------ evaluation
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
        metric_key_prefix="eval",
    ):
        """HF's loop, then the per-token metrics of ``axolotl_gold.trainer.evaluation`` in place
        of HF's mean of batch means."""
        if self.gold is None:
            return super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        self._eval_totals, self._eval_batches = EvalTotals(), 0
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        self.sharding.after_eval(self.model_wrapped)
        totals = self._eval_totals.reduced(self.accelerator)
        self._eval_totals = None
        output.metrics.pop(f"{metric_key_prefix}_loss", None)
        output.metrics.update(totals.metrics(metric_key_prefix, self.gold.eval_on_policy))
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """One eval batch: its dataset completions scored (off-policy) and, with
        ``gold_eval_on_policy``, the student's samples for its prompts (on-policy);
        sums go to the evaluation's totals, the returned loss is this batch's."""
        if self.gold is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        self._teacher_engine_ready()
        totals = self._eval_totals if self._eval_totals is not None else EvalTotals()
        rows = inputs["gold_rollouts"]
        # every row is scored, prompt-only or not: ZeRO-3 processes run the same passes
        total, units = self._eval_loss_sum(model, rows)
        totals.offpolicy_sum += float(total)
        totals.offpolicy_units += float(units)
        if self.gold.eval_on_policy:
            with self._generation_weights_for_eval():
                rows = sample_eval_rows(
                    rows, self.student_engine, self.gold.seed, self._eval_batches,
                    self.accelerator.process_index,
                    encode=rollout_inputs(self.vision) if self.vision is not None else None,
                )
            self._eval_batches += 1
            total, units = self._eval_loss_sum(model, rows)
            totals.onpolicy_sum += float(total)
            totals.onpolicy_units += float(units)
            totals.sampled_tokens += sum(len(r.completion_ids) for r in rows)
            totals.sampled_rows += len(rows)
        return (total / units.clamp(min=1)).detach(), None, None

    def _eval_loss_sum(self, model, rows):
        batch = teacher_scoring_batch(rows, self.pad_id, self.objective, self.vision,
                                      self.gold.scoring_width_multiple)
        batch = self._prepare_inputs(batch)
        with torch.no_grad(), self._head_weights():
            total, units = loss_sum(model, self.teacher, batch, self.objective, self.gold.fused_loss)
        return total.detach(), units

    def _generation_weights_for_eval(self):
        return self.sharding.eval_rollout_weights(self.model_wrapped)

    # ------------------------------------------------------------------ completions log
    def _log_completions(self, window) -> None:
        """The window's rows, scored one by one, to ``gold_completions.jsonl`` and the trackers
        (see ``axolotl_gold.trainer.completions_log``); every process scores its own rows, the
        main process writes its own."""
        rows = [r for s in window.slices for r in s]
        on_policy = [on for on, s in zip(window.on_policy, window.slices) for _ in s]
        with self._head_weights(), self.compute_loss_context_manager():
            scores = row_scores(
                self.model, self.teacher, rows, self.objective, self.pad_id,
                self.gold.fused_loss, self._prepare_inputs, self.vision,
            )
        if not self.accelerator.is_main_process:
            return
        tokenizer = text_tokenizer(self._gold_tokenizer)
        records = completion_records(
            self.state.global_step + 1, rows, on_policy, scores,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
        )
        append_jsonl(os.path.join(self.args.output_dir, COMPLETIONS_LOG), records)
        log_to_trackers(
            records, self.args.report_to, self.callback_handler.callbacks, self.state.global_step + 1
        )

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.gold is not None and self._gold_windows and "loss" in logs:
            n = self._gold_windows
            spans = self._gold_clock.totals()  # waits for the device once, at logging
            teacher = spans.get(TEACHER_SECONDS, 0.0)
            self._gold_sums[TEACHER_SECONDS] += teacher
            self._gold_sums["gold/time_student_s"] += spans.get(STEP_SECONDS, 0.0) - teacher
            for key, value in self._gold_sums.items():
                logs[key] = round(value / n, 6)
            logs["gold/engine_calls_total"] = self.student_engine.calls
            logs["gold/skipped_steps"] = self._nonfinite.total  # non-finite gradients, since the start
            if torch.cuda.is_available():  # peak since the last log (Axolotl resets it), this process
                logs["gold/peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            self._gold_sums.clear()
            self._gold_windows = 0
        super().log(logs, start_time)
