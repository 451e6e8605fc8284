"""The student side of a GOLD step, stage by stage (profile_student_step.py's core).

``measure`` times one optimizer step of bench_vs_reference.Ours split into the stages of
``STAGES`` (each device-synced), ``floors`` gives each stage's least time on an H200 from its
FLOPs and bytes, ``stage_table`` sets them side by side, ``kernel_table`` lists the top
kernels of one step under torch.profiler.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

from stage_clock import STAGE_LABEL, Clock, generations
from step_profile import is_annotation

H200_FLOPS, H200_BYTES = 989e12, 4.8e12
STAGES = ("prefill", "student forward", "teacher forward", "loss", "loss backward", "model backward",
          "optimizer step", "zero_grad")
STUDENT_SIDE = STAGES[1:2] + STAGES[3:]


def prefill(ours, prompts, clock) -> None:
    """The static engine's prefill (``DecodeStep.prefill``: HF's own mask and positions)."""
    import torch

    from axolotl_gold.data.batching import left_pad
    from axolotl_gold.rollouts.engines.decode_step import DecodeStep
    from axolotl_gold.rollouts.engines.hf import generation_mode

    model = plain_model(ours.student)  # the engine's model: never the compiled wrapper
    ids, mask = (t.to(ours.device) for t in left_pad(prompts, ours.pad))
    decode = DecodeStep(model, ids.shape[0], ids.shape[1] + ours.args.completion, ours.device)
    decode.reset()
    with clock("prefill"), torch.no_grad(), generation_mode(model):
        decode.prefill(ids, mask)


def plain_model(model):
    """The model under a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def split_step(ours, prepared, clock) -> None:
    """One optimizer step, stage by stage (the same arithmetic as Ours.train)."""
    from axolotl_gold.trainer.attention_backends import training_attention

    total = max(prepared.local_tokens, 1)
    ours.own_grads()
    with training_attention():  # as the trainer's step
        _micro_steps(ours, prepared, clock, total)
    with clock("optimizer step"):
        ours.optimizer.step()
    with clock("zero_grad"):
        ours.optimizer.zero_grad(set_to_none=True)


def _micro_steps(ours, prepared, clock, total: int) -> None:
    """The window's micro-batches, stage by stage."""
    import torch

    from axolotl_gold.data.transfer import to_device
    from axolotl_gold.scoring.forward import CompletionStates, completion_states
    from axolotl_gold.scoring.routing import objective_sum

    for micro in prepared.micro_batches:
        batch = to_device(micro, ours.device)
        with clock("student forward"):
            student = completion_states(ours.student, batch, use_head_bypass=True)
        trace = generations()
        with clock("teacher forward"), torch.no_grad():
            teacher = completion_states(ours.teacher, batch, use_head_bypass=True)
        trace("teacher forward")
        hidden = student.values.detach().requires_grad_()
        with clock("loss"):
            # the student's states with the loss's own leaf (its compute dtype kept: a float32 head
            # under bf16 autocast computes in bf16, as in the trainer)
            states = CompletionStates(hidden, student.head, student.compute_dtype)
            loss = objective_sum(ours.objective, states, teacher, batch) / total
        trace("loss")
        with clock("loss backward"):
            loss.backward()
        trace("loss backward")
        with clock("model backward"):
            student.values.backward(hidden.grad)


UNSYNCED = "student side, no waits between stages"


def unsynced_student_side(ours, prepared, teachers: list) -> float:
    """Seconds of one optimizer step's student side as the trainer queues it: forward, loss and
    backward per micro-batch, then the optimizer, with no device sync between stages (the host
    launches ahead while the device runs), one before and one after. The teacher's states
    (``teachers``, one per micro-batch) were computed beforehand, so none of its time is in."""
    from axolotl_gold.scoring.forward import completion_states
    from axolotl_gold.data.transfer import to_device
    from axolotl_gold.scoring.routing import objective_sum
    from axolotl_gold.scoring.timing import synchronize
    from axolotl_gold.trainer.attention_backends import training_attention

    total = max(prepared.local_tokens, 1)
    synchronize(ours.device)
    start = time.perf_counter()
    ours.own_grads()
    with training_attention():
        for micro, teacher in zip(prepared.micro_batches, teachers):
            batch = to_device(micro, ours.device)
            student = completion_states(ours.student, batch, use_head_bypass=True)
            (objective_sum(ours.objective, student, teacher, batch) / total).backward()
    ours.optimizer.step()
    ours.optimizer.zero_grad(set_to_none=True)
    synchronize(ours.device)
    return time.perf_counter() - start


def teacher_states(ours, prepared) -> list:
    """The teacher's completion states of each micro-batch (for ``unsynced_student_side``)."""
    import torch

    from axolotl_gold.data.transfer import to_device
    from axolotl_gold.scoring.forward import completion_states
    from axolotl_gold.trainer.attention_backends import training_attention

    with torch.no_grad(), training_attention():
        return [completion_states(ours.teacher, to_device(micro, ours.device),
                                  use_head_bypass=True) for micro in prepared.micro_batches]


def measure(ours, prepared, prompts, args, plain: bool = False) -> dict:
    """Median ms per optimizer step of each stage over args.steps after args.warmup, of the
    student side with no waits between its stages (``UNSYNCED``), and ("first step") the
    student side of the first warm-up step (a compile's warm-up)."""
    from axolotl_gold.scoring.timing import synchronize

    runs, first = [], None
    teachers = teacher_states(ours, prepared)
    for index in range(args.warmup + args.steps):
        clock = Clock(ours.device)
        prefill(ours, prompts, clock)
        split_step(ours, prepared, clock)
        clock.seconds[UNSYNCED] = unsynced_student_side(ours, prepared, teachers)
        if plain:  # bench_cli's loop as it is, the teacher's share taken out
            synchronize(ours.device)
            start = time.perf_counter()
            ours.train(prepared)
            synchronize(ours.device)
            clock.seconds["plain"] = time.perf_counter() - start
        if index == 0:
            first = sum(clock.seconds[s] for s in STUDENT_SIDE)
        if index >= args.warmup:
            runs.append(clock.seconds)
    out = {k: 1e3 * statistics.median(r[k] for r in runs) for k in runs[0]}
    out["first step"] = 1e3 * first
    return out


def floors(ours, prepared, prompts) -> dict:
    """Seconds per optimizer step each stage needs at least on an H200, and what bounds it."""
    s_cfg, t_cfg = ours.student.config, ours.teacher.config
    s_lin, t_lin = linear_params(ours.student), linear_params(ours.teacher)
    item = ours.dtype.itemsize
    vocab = ours.args.vocab
    embed = ours.student.get_input_embeddings().weight.numel()  # tied: the head's gradient lands there too
    flops, nbytes = defaultdict(float), defaultdict(float)
    for micro in prepared.micro_batches:
        rows, width = micro["input_ids"].shape
        scored = int((micro["completion_labels"] != -100).sum())
        forward = 2 * s_lin * rows * width + attention_flops(s_cfg, rows, width)
        flops["student forward"] += forward
        nbytes["student forward"] += s_lin * item
        flops["teacher forward"] += 2 * t_lin * rows * width + attention_flops(t_cfg, rows, width)
        nbytes["teacher forward"] += t_lin * item
        flops["loss"] += 2 * scored * vocab * (t_cfg.hidden_size + 3 * s_cfg.hidden_size)  # heads + gradient
        nbytes["loss"] += vocab * (s_cfg.hidden_size + t_cfg.hidden_size) * item
        nbytes["loss backward"] += 2 * item * (vocab * s_cfg.hidden_size + scored * s_cfg.hidden_size)
        flops["model backward"] += 2 * forward * (1.5 if ours.student.is_gradient_checkpointing else 1)
        nbytes["model backward"] += 2 * (s_lin + embed) * item  # weights read, their gradients written
    rows, width = len(prompts), max(map(len, prompts))
    flops["prefill"] = 2 * s_lin * rows * width + attention_flops(s_cfg, rows, width)
    nbytes["prefill"] = s_lin * item
    params = list(ours.student.parameters())
    state = sum(t.numel() * t.element_size() for st in ours.optimizer.state.values()
                for t in st.values() if hasattr(t, "numel") and t.dim())
    nbytes["optimizer step"] = sum(3 * p.numel() * p.element_size() for p in params) + 2 * state
    out = {}
    for stage in STAGES:
        f, b = flops[stage] / H200_FLOPS, nbytes[stage] / H200_BYTES
        out[stage] = (max(f, b), "FLOP" if f >= b else "bytes") if f or b else (0.0, "-")
    return out


def linear_params(model) -> int:
    """Weights of the decoder layers' matmuls (embedding and head apart)."""
    return sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)


def attention_flops(cfg, rows: int, width: int) -> float:
    """Q K^T and P V over a causal [width, width] (half counted), every layer."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * rows * cfg.num_hidden_layers * width * width * cfg.num_attention_heads * head_dim


def stage_table(ms: dict, floor: dict) -> str:
    lines = ["| stage | ms per optimizer step | H200 floor ms | bound by | ratio to floor |",
             "| --- | ---: | ---: | --- | ---: |"]
    for stage in STAGES:
        sec, kind = floor[stage]
        ratio = f"{ms[stage] / (1e3 * sec):.1f}x" if sec else "-"
        lines.append(f"| {stage} | {ms[stage]:.2f} | {1e3 * sec:.3f} | {kind} | {ratio} |")
    side = sum(ms[s] for s in STUDENT_SIDE)
    side_floor = 1e3 * sum(floor[s][0] for s in STUDENT_SIDE)
    lines.append(f"| student side (sum of its stages) | {side:.2f} | {side_floor:.3f} | | {side / side_floor:.1f}x |")
    if UNSYNCED in ms:
        lines.append(f"| {UNSYNCED} (teacher's states computed beforehand) | {ms[UNSYNCED]:.2f} "
                     f"| {side_floor:.3f} | | {ms[UNSYNCED] / side_floor:.1f}x |")
    if "plain" in ms:
        plain = ms["plain"] - ms["teacher forward"]
        lines.append(f"| student side, as the plain loop runs it (teacher taken out) | {plain:.2f} "
                     f"| {side_floor:.3f} | | {plain / side_floor:.1f}x |")
    return "\n".join(lines)


def window_batches(ours, prepared, grouped: bool = False, multiple: int = 1) -> list:
    """The window's micro-batches as the slices were drawn (before ``group_by_length``) or
    grouped as ``prepare_window`` groups them, with widths rounded up to ``multiple``."""
    from axolotl_gold.data.batching import group_by_length, merge_repeats, weigh_rows
    from axolotl_gold.scoring.loss import teacher_scoring_batch

    merged = [merge_repeats(rows) for rows in prepared.window.slices]
    out = []
    for rows, counts in group_by_length(merged) if grouped else merged:
        batch = teacher_scoring_batch(rows, ours.pad, ours.objective, multiple=multiple)
        if any(c > 1 for c in counts):
            weigh_rows(batch, counts)
        out.append(batch)
    return out


def kernel_table(ours, prepared, prompts, top: int = 25, per_stage: int = 8) -> str:
    """One step under torch.profiler: the top kernels by total device time (CPU: ops), then
    each student-side stage's own top ``per_stage`` kernels (ops) and its device-busy share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = ours.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        clock = Clock(ours.device, labelled=True)
        prefill(ours, prompts, clock)
        split_step(ours, prepared, clock)
    events = prof.key_averages()
    if cuda:  # kernels are the events on the device; else (older profilers) ops by self device time
        events = [e for e in events if e.device_type == DeviceType.CUDA and not _annotation(e)] or list(events)
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    events = sorted(events, key=time_of, reverse=True)
    total = sum(time_of(e) for e in events) or 1
    wall = 1e3 * sum(clock.seconds.values())  # the same stages, device-synced, under the profiler
    busy = (f"; kernels {total / 1e3:.1f} ms of device time in {wall:.1f} ms of wall time for these stages "
            f"(device busy {100 * total / 1e3 / wall:.0f}%)") if cuda else ""
    lines = [f"top {top} {'CUDA kernels' if cuda else 'CPU ops (self time)'} of one step (prefill + student "
             f"side + teacher), by total time{busy}", "", "| kernel | calls | total ms | share |",
             "| --- | ---: | ---: | ---: |"]
    for e in events[:top]:
        lines.append(f"| {_kernel_name(e.key)} | {e.count} | {time_of(e) / 1e3:.2f} | {100 * time_of(e) / total:.1f}% |")
    lines += ["", stage_kernel_table(prof.events(), clock.seconds, per_stage, cuda)]
    return "\n".join(lines)


def _annotation(event) -> bool:
    """A profiler range (ours, the optimizer's) mirrored on the device's timeline, not a kernel."""
    return is_annotation(event) or event.key.startswith(STAGE_LABEL)


def _kernel_name(name: str) -> str:
    return name.replace("|", "/")[:110]


def stage_kernel_table(events, seconds: dict, top: int, cuda: bool = True) -> str:
    """Each student-side stage's kernels: those that started inside the stage's profiler range
    (the stage ends with a device sync inside its range, so its kernels end there too), summed
    by name; the stage's kernel time against its synced wall time. ``cuda`` False: CPU ops by
    self time instead of kernels."""
    from torch.autograd import DeviceType

    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    duration = (lambda e: e.time_range.elapsed_us()) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731

    ranges = defaultdict(list)  # stage -> its ranges (each micro-batch's, host and device mirror)
    for e in events:
        if e.name.startswith(STAGE_LABEL):
            ranges[e.name[len(STAGE_LABEL):]].append((e.time_range.start, e.time_range.end))
    by_stage = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for e in events:
        if e.device_type != kind or _annotation(e):
            continue
        start = e.time_range.start
        for stage, spans in ranges.items():
            if any(a <= start <= b for a, b in spans):
                entry = by_stage[stage][e.name]
                entry[0] += 1
                entry[1] += duration(e)
                break
    what = "kernels" if cuda else "CPU ops (self time)"
    lines = [f"{what} by student-side stage ({what} started inside the stage; busy = their time / synced wall)",
             "", "| stage | kernel | calls | ms | share of stage |", "| --- | --- | ---: | ---: | ---: |"]
    for stage in STUDENT_SIDE:
        kernels = by_stage.get(stage)
        if not kernels:
            continue
        busy_ms = sum(v[1] for v in kernels.values()) / 1e3
        wall_ms = 1e3 * seconds.get(stage, 0.0)
        lines.append(f"| **{stage}** | all {sum(v[0] for v in kernels.values())} {what}, device busy "
                     f"{100 * busy_ms / wall_ms if wall_ms else 0:.0f}% of {wall_ms:.1f} ms | | {busy_ms:.2f} | 100% |")
        for name, (calls, us) in sorted(kernels.items(), key=lambda kv: kv[1][1], reverse=True)[:top]:
            lines.append(f"| {stage} | {_kernel_name(name)} | {calls} | {us / 1e3:.2f} | "
                         f"{100 * us / 1e3 / busy_ms if busy_ms else 0:.1f}% |")
    return "\n".join(lines)
