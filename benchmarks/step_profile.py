"""Where one optimizer step of `axolotl train` leaves the device idle, and which host reads wait.

``rollout_plugins.StepProfile`` (bench_cli.py --profile-step) runs one step of the trainer under
torch.profiler (host ops with their Python stacks, CUDA kernels) and writes ``report(prof)``:

- the kernels' time against the span from the first kernel's start to the last one's end, and
  the idle inside it (the span less the union of the kernels' intervals);
- the longest idle gaps, each with what the host was running when the device went idle (the
  innermost host op open at the gap's start, and its nearest Python frame outside torch);
- the host's waits for the device: every ``.item()``-like read (``aten::_local_scalar_dense``),
  CUDA synchronize call and memory copy (its host time says whether it waited), counted by the
  Python line that asked for it.

On the CPU there are no kernels: only the waits table has rows (the reads still happen).
"""

from __future__ import annotations

import re
from collections import defaultdict

# host events that wait for the device: a scalar read, the runtime's synchronize calls, and copies
# (one from or to pageable host memory returns only once the device got to it)
WAITS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
         "cudaMemcpy", "cudaMemcpyAsync")
PYTHON_FRAME = re.compile(r"\(\d+\): ")


def is_annotation(event) -> bool:
    """A profiler range mirrored on the device's timeline (``record_function``, the optimizer's
    step), which the profiler lists among the device's events: not a kernel."""
    return bool(getattr(event, "is_user_annotation", False))


def _is_kernel(event) -> bool:
    from torch.autograd import DeviceType

    return event.device_type == DeviceType.CUDA and not is_annotation(event)


def _library(frame: str) -> bool:
    return frame.startswith(("torch/", "<built-in", "contextlib.py", "threading.py")) or any(
        part in frame for part in ("/torch/", "site-packages/torch/", "/contextlib.py", "/threading.py"))


def _frame(event, host=()) -> str:
    """The nearest Python frame outside torch that (transitively) called ``event``: what asked
    for it. The profiler records Python calls as host events of their own (``file(line): name``)
    around the ops, or (older versions) as an op's ``stack``. A CUDA runtime call (a synchronize,
    a copy, a launch) has no parent: the innermost op of ``host`` around it on its thread stands
    in. With no frame outside torch, the innermost one inside it (``torch: ...``)."""
    inner, looked_around = None, False
    while event is not None:
        for line in getattr(event, "stack", None) or []:
            if not _library(line):
                return line.strip()
            inner = inner or line.strip()
        if PYTHON_FRAME.search(event.name):
            if not _library(event.name):
                return event.name.strip()
            inner = inner or event.name.strip()
        parent = getattr(event, "cpu_parent", None)
        if parent is None and not looked_around:  # once: equal ranges would hold each other
            parent, looked_around = _enclosing(event, host), True
        event = parent
    return f"torch: {inner}" if inner else "(no Python frame outside torch)"


def _enclosing(event, host):
    """The innermost event of ``host`` on ``event``'s thread whose time range holds it."""
    a, b = event.time_range.start, event.time_range.end
    thread = getattr(event, "thread", None)
    around = [e for e in host if e is not event and getattr(e, "thread", None) == thread
              and e.time_range.start <= a and b <= e.time_range.end]
    return min(around, key=lambda e: e.time_range.elapsed_us(), default=None)


def _launch_before(host, moment: float):
    """The last kernel or graph launch the host started before ``moment``: what ended an idle gap."""
    launches = [e for e in host if "Launch" in e.name and e.time_range.start <= moment]
    return max(launches, key=lambda e: e.time_range.start, default=None)


def busy_and_gaps(kernels: list[tuple[float, float]]) -> tuple[float, float, list[tuple[float, float]]]:
    """(span, busy, gaps) in the intervals' unit: the first start to the last end, the union of
    the intervals' lengths, and the idle intervals between them, longest first."""
    if not kernels:
        return 0.0, 0.0, []
    kernels = sorted(kernels)
    busy, gaps = 0.0, []
    start, end = kernels[0]
    for a, b in kernels[1:]:
        if a > end:
            busy += end - start
            gaps.append((end, a))
            start, end = a, b
        else:
            end = max(end, b)
    busy += end - start
    span = end - kernels[0][0]
    return span, busy, sorted(gaps, key=lambda g: g[1] - g[0], reverse=True)


def _host_op_at(host: list, moment: float):
    """The innermost (shortest) host op open at ``moment``, or None."""
    open_ = [e for e in host if e.time_range.start <= moment <= e.time_range.end]
    return min(open_, key=lambda e: e.time_range.elapsed_us(), default=None)


def report(events, top: int = 12) -> str:
    """The three tables above, from a profile's ``events()``."""
    from torch.autograd import DeviceType

    kernels = [e for e in events if _is_kernel(e)]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    span, busy, gaps = busy_and_gaps([(e.time_range.start, e.time_range.end) for e in kernels])
    lines = [f"kernels: {len(kernels)}, {sum(e.time_range.elapsed_us() for e in kernels) / 1e3:.1f} ms; "
             f"first kernel's start to last kernel's end {span / 1e3:.1f} ms, device busy {busy / 1e3:.1f} ms "
             f"({100 * busy / span if span else 0:.0f}%), idle {(span - busy) / 1e3:.1f} ms in {len(gaps)} gaps"]
    if gaps:
        lines += ["", f"the {min(top, len(gaps))} longest idle gaps", "",
                  "| idle ms | host op open when the device went idle | its Python frame | the launch that ended it, asked at |",
                  "| ---: | --- | --- | --- |"]
        for a, b in gaps[:top]:
            op = _host_op_at(host, a)
            name, frame = (op.name, _frame(op, host)) if op is not None else ("(none)", "")
            launch = _launch_before(host, b)
            ended = f"{launch.name}: {_frame(launch, host)}" if launch is not None else ""
            lines.append(f"| {(b - a) / 1e3:.2f} | {name[:80]} | {frame[:160]} | {ended[:200]} |")
    waits = defaultdict(lambda: [0, 0.0])
    for e in host:
        if e.name in WAITS:
            entry = waits[(e.name, _frame(e, host))]
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us()
    lines += ["", "host waits for the device (scalar reads, synchronize calls, copies) by the line that asked", "",
              "| wait | calls | host ms | asked at |", "| --- | ---: | ---: | --- |"]
    for (name, frame), (calls, us) in sorted(waits.items(), key=lambda kv: kv[1][1], reverse=True)[:2 * top]:
        lines.append(f"| {name} | {calls} | {us / 1e3:.2f} | {frame[:160]} |")
    return "\n".join(lines)
