"""Ragged completion lengths for the benchmarks (``--ragged`` in bench_cli.py and
bench_vs_reference.py): a real length distribution from random-weight models.

A random-weight model samples nearly uniformly over its vocabulary, so its EOS (one id of
151,936) is almost never drawn and every rollout runs to ``max_new_tokens``. Declaring S
stop ids (the model's ``generation_config.eos_token_id`` list, which our trainer's stop set,
the plain loop's engine and TRL's GOLDTrainer all read) makes each token stop with
probability q ~ S / V (the expected sampled mass of a fixed set of S ids is S / V under any
temperature and top-p, as long as the ids are not special to the model), so a completion's
length is geometric, cut at N = max_new_tokens:

    E[length] = sum_{k<N} (1 - q)^k = (1 - (1 - q)^N) / q

S is chosen so that this is ``TARGET_FRACTION`` (40%) of N. ``stop_mass`` measures q on
the model itself (one forward) so the run can say whether the model honours it.

What the comparison means, for our static engine (rollouts/engines/static.py): every row
of a batch advances one token per step; the host checks stops every ``eos_check_every``
(32) steps and at each row's last token, starts waiting prompts in slots whose row
stopped, ends the call when all rows stopped, and once no prompt waits and half the rows
stopped the others go on as a smaller batch (``compact_finished``; compiled: power-of-two
buckets of at least 4 rows). ``engine_schedule`` replays that schedule from the lengths
(the engine's own ``SlotQueue``): decode steps run and row-steps run. A token step at
batch 16 costs about the same at 8 or 4 rows (the decode step is bound by kernel count and
weight reads, not rows), so when all of a window's rows fit in one batch the time per
generated token rises above the forced run's by up to (token steps x rows) / tokens: the
longest row sets the time, whatever the compaction saves on row-steps. When they do not
fit (``slots`` < rows), refilled slots keep every step full until the queue empties.
"""

from __future__ import annotations

import math

TARGET_FRACTION = 0.4
EOS_CHECK_EVERY = 32  # StaticCacheEngine's default, read in its docstring and __init__


def expected_length(q: float, max_new: int) -> float:
    """Mean of min(Geometric(q), max_new), the stop token counted."""
    return max_new if q <= 0 else (1 - (1 - q) ** max_new) / q


def stop_rate(max_new: int, fraction: float = TARGET_FRACTION) -> float:
    """The per-token stop probability q with expected_length(q) = fraction * max_new."""
    lo, hi = 0.0, 1.0  # expected_length falls as q rises
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_length(mid, max_new) > fraction * max_new else (lo, mid)
    return (lo + hi) / 2


def stop_ids(vocab: int, max_new: int, base: list[int], fraction: float = TARGET_FRACTION) -> list[int]:
    """The stop set: ``base`` (eos, pad) and the ids just below the lowest of them, S in all
    (S = round(q V)). In the benchmarks' byte tokenizer those are unreachable fillers."""
    count = max(len(base), round(stop_rate(max_new, fraction) * vocab))
    low = min(base)
    extra = [i for i in range(low - 1, -1, -1) if i not in base][: count - len(base)]
    return sorted(set(base) | set(extra))


def length_stats(lengths: list[int], max_new: int) -> dict:
    ordered = sorted(lengths)
    pick = lambda p: ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)]  # noqa: E731
    return {"mean": sum(ordered) / len(ordered), "p50": pick(0.5), "p90": pick(0.9), "max": ordered[-1],
            "at_limit": sum(n >= max_new for n in ordered) / len(ordered), "rows": len(ordered)}


def engine_schedule(lengths: list[int], max_new: int, engine: str = "static", slots: int | None = None,
                    every: int = EOS_CHECK_EVERY) -> tuple[int, int]:
    """(decode steps, row-steps) an engine runs for one call on prompts whose completions
    have these lengths (token 0 of each comes from its prefill, not a step), ``slots`` rows at once (default: all): ``static`` /
    ``static-compiled`` replay StaticCacheEngine's schedule (its own ``SlotQueue``; refilled
    slots, compaction); ``static-chunked`` its ``refill_slots=False`` (one batch after
    another); ``hf`` is ``generate``: every row until the longest stops, batch after batch."""
    from axolotl_gold.rollouts.engines.slots import SlotQueue

    slots = slots or len(lengths)
    if engine in ("hf", "static-chunked"):
        steps = row_steps = 0
        for start in range(0, len(lengths), slots):
            chunk = lengths[start : start + slots]
            s, r = ((max(chunk) - 1, (max(chunk) - 1) * len(chunk)) if engine == "hf"
                    else engine_schedule(chunk, max_new, "static", every=every))
            steps, row_steps = steps + s, row_steps + r
        return steps, row_steps
    queue = SlotQueue(len(lengths), min(slots, len(lengths)), max_new, every, buckets=engine == "static-compiled")
    queue.start(range(len(queue.holding)))
    queue.plan()
    while True:
        if queue.count == queue.next_check:
            # a row stops once it sampled its last token (token k comes at step started + k)
            check = queue.check([p < 0 or queue.count >= s + lengths[p] - 1
                                 for p, s in zip(queue.holding, queue.started)])
            if check.done:
                return queue.count, queue.row_steps
        queue.stepped()


def stop_mass(model, ids, stops: list[int], temperature: float, top_p: float, top_k: int = 0) -> float:
    """Mean sampled probability of the stop set over every position of ``ids`` (``[B, T]``),
    under the benchmark's warping: the model's measured q."""
    import torch

    from axolotl_gold.rollouts.engines.sampling import filter_logits

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        probs = filter_logits(logits.flatten(0, 1), temperature, top_k, top_p).softmax(-1)
        return float(probs[:, torch.tensor(stops, device=probs.device)].sum(-1).mean())


def compare(forced: dict, ragged: dict, max_new: int) -> dict:
    """The cost of stopped rows: generation time per generated token, ragged vs forced.

    Each dict holds ``generation_s`` (per step), ``windows`` (the timed steps' lengths,
    one list per engine call), ``engine`` and ``slots`` (for ``engine_schedule``)."""
    gen_tokens = lambda r: sum(map(sum, r["windows"])) / len(r["windows"])  # noqa: E731 - per step
    per_forced = forced["generation_s"] / gen_tokens(forced)
    per_ragged = ragged["generation_s"] / gen_tokens(ragged)
    steps = row_steps = tokens = full = 0
    for lengths in ragged["windows"]:
        s, r = engine_schedule(lengths, max_new, ragged.get("engine", "static"), slots=ragged.get("slots"))
        s, r = s + 1, r + len(lengths)  # the prefill: one step, token 0 of every row
        batch = min(ragged.get("slots") or len(lengths), len(lengths))
        steps, row_steps, tokens, full = steps + s, row_steps + r, tokens + sum(lengths), full + s * batch
    return {"ms_per_token_forced": 1e3 * per_forced, "ms_per_token_ragged": 1e3 * per_ragged,
            "ratio": per_ragged / per_forced, "token_steps": steps / len(ragged["windows"]),
            "step_bound": full / tokens,  # every step costs a full batch (of the rows decoded at once)
            "row_bound": row_steps / tokens,  # every step costs its rows
            "generated_per_s": gen_tokens(ragged) / ragged["generation_s"]}


def report(rows: list[tuple[str, dict, dict | None]], max_new: int, vocab: int, stops: int) -> str:
    """A markdown table: per ragged run (``windows``, times), its forced-length run or None."""
    q = stop_rate(max_new)
    lines = [
        f"ragged lengths: {stops} stop ids of {vocab} (q = {q:.4g} a token, intended mean "
        f"{expected_length(q, max_new):.1f} of {max_new}). 'ms / generated token' is generation time over "
        "the tokens kept, against the forced-length run of the same engine (ratio 1.00: stopped rows cost "
        "nothing). The engine's schedule replayed from the lengths (static: stop check every 32 steps, "
        "compaction once half the live rows stopped; hf: every row until the longest stops) gives the token "
        "steps per call and two bounds of the ratio: 'row-steps' if a step costs its live rows, "
        "'full steps' if every step costs a full batch (the longest row sets the time). A decode step at "
        "batch 16 is bound by kernel count and weight reads, not rows: on a GPU expect the ratio near the "
        "full-steps bound, i.e. stopped rows cost their steps until the call ends.",
        "",
        "| run | mean len | p50 | p90 | max | stop mass q | generated tok/s (engine) | ms / generated token "
        "| forced ms / token | ratio | token steps | row-steps bound | full-steps bound |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r, forced in rows:
        if "error" in r or not r.get("windows"):
            lines.append(f"| {name} | {r.get('error', 'no lengths')} |" + " |" * 12)
            continue
        s = length_stats([n for w in r["windows"] for n in w], max_new)
        q_seen = "n/a" if r.get("stop_mass") is None else f"{r['stop_mass']:.4g}"
        head = f"| {name} | {s['mean']:.1f} | {s['p50']} | {s['p90']} | {s['max']} | {q_seen} "
        if forced is None or "error" in forced or not forced.get("windows"):
            tok_s = sum(map(sum, r["windows"])) / len(r["windows"]) / r["generation_s"]
            lines.append(head + f"| {tok_s:.0f} | | | | | | |")
            continue
        c = compare(forced, r, max_new)
        lines.append(head + f"| {c['generated_per_s']:.0f} | {c['ms_per_token_ragged']:.3f} "
                     f"| {c['ms_per_token_forced']:.3f} | {c['ratio']:.2f}x | {c['token_steps']:.0f} "
                     f"| {c['row_bound']:.2f}x | {c['step_bound']:.2f}x |")
    return "\n".join(lines)
