"""An optimizer step whose gradients are not finite is not applied.

One NaN or infinity in a window's gradients (a kernel's bug, as cuDNN's attention backward
at some widths, ``trainer.attention_backends``; an overflow) turns every weight NaN at the
optimizer step, and the run goes on sampling from NaN logits until a device-side assertion
stops it, with nothing saved worth keeping since the step. The trainer reads the gradient
norm HF's loop computes before every optimizer step (one wait for the device a step, where
the next window's generation waits anyway) and hands it to ``NonFiniteSteps``: when it is not
finite the gradients are dropped, so the optimizer skips every parameter and the weights and
optimizer state stay as they were, and (``hold_schedule``) the learning-rate schedule does
not advance, as after a float16 loss scaler's skipped step. A warning names the step
(``gold_windows.jsonl`` has its micro-batch widths) and ``gold/skipped_steps`` counts them. ``MAX_IN_A_ROW`` such steps in a
row stop the run with an error: then every step is broken, and skipping hides it.
"""

from __future__ import annotations

import logging
import math

LOG = logging.getLogger(__name__)
MAX_IN_A_ROW = 3


class NonFiniteGradients(RuntimeError):
    """Raised after ``MAX_IN_A_ROW`` optimizer steps in a row with non-finite gradients."""


class NonFiniteSteps:
    """Counts optimizer steps with a non-finite gradient norm: all of them and those in a row."""

    def __init__(self, limit: int = MAX_IN_A_ROW):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def skip(self, grad_norm, step: int) -> bool:
        """Whether step ``step``'s gradients must be dropped (their norm ``grad_norm``, a
        float or a 0-d tensor, is not finite); raises ``NonFiniteGradients`` at the limit."""
        if math.isfinite(float(grad_norm)):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteGradients(
                f"the gradients were not finite (norm {float(grad_norm)}) in {self.in_a_row} optimizer "
                f"steps in a row, the last step {step}: none of them was applied, so the weights and "
                "the last checkpoint are finite. The loss was finite if it logged so; a NaN from one "
                "kernel at some shapes shows as the same widths in gold_windows.jsonl's scoring_widths. "
                "Try `bf16: false` (float32) to tell precision from a kernel, and a lower "
                "`learning_rate` or `max_grad_norm` if the weights grew."
            )
        LOG.warning(
            "step %d: gradient norm %s is not finite; the step is skipped (nothing applied; %d "
            "skipped so far, %d in a row; the run stops at %d in a row). Its micro-batch widths are "
            "gold_windows.jsonl's scoring_widths.", step, float(grad_norm), self.total, self.in_a_row, self.limit,
        )
        return True


def hold_schedule(optimizer, skipped: bool) -> None:
    """Mark the optimizer step as skipped or not where HF's loop reads it
    (``accelerator.optimizer_step_was_skipped``, each Accelerate optimizer's overflow flag):
    after a skipped step the learning-rate scheduler does not step. With a float16 loss
    scaler the scaler sets the flag itself at ``optimizer.step`` (a dropped gradient is no
    overflow to it, so the schedule advances there); without one Accelerate never touches
    it, so every step sets it."""
    if hasattr(optimizer, "_is_overflow") and getattr(optimizer, "scaler", None) is None:
        optimizer._is_overflow = skipped
