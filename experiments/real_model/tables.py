"""Means with standard errors over prompts, the results table (markdown) and JSON."""

from __future__ import annotations

import math


def mean_se(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if not math.isnan(x)]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n), n


def summarize(per_prompt: dict) -> dict:
    """``per_prompt``: {"rouge_l": [...], "teacher_logprob": [...], "length": [...], "stopped": [...]}."""
    out = {}
    for key, xs in per_prompt.items():
        m, se, n = mean_se([float(x) for x in xs])
        out[key] = {"mean": m, "se": se, "n": n}
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Prune-then-distill SmolLM2-135M-Instruct on the CPU (issue 17, section 2)",
        "",
        f"Teacher: SmolLM2-135M-Instruct ({result['models']['teacher_layers']} layers, "
        f"{result['models']['teacher_params']:,} params). Student: the same model keeping layers "
        f"{result['models']['student_keep']} ({len(result['models']['student_keep'])} layers, "
        f"{result['models']['student_params']:,} params). {s['n_train']} train prompts, {s['n_eval']} held-out "
        f"prompts; greedy answers of at most {s['max_new']} tokens. Every arm: {s['steps']} optimizer steps of "
        f"{s['window']} sequences (micro batch {s['micro_batch']} x accumulation {s['accum']}), learning rate "
        f"{s['lr']}, through `axolotl train`.",
        "",
        "ROUGE-L: F1 of the longest common subsequence of whitespace tokens (lower-cased) between the model's "
        "greedy answer and the teacher's greedy answer. Teacher log-lik: the teacher's mean log-probability per "
        "token of the model's greedy answer (closing `<|im_end|>` included when generated), under its chat "
        "template. Means over held-out prompts ± standard error over prompts. Gap closed = (arm - student "
        "before) / (teacher - student before).",
        "",
        "| model | ROUGE-L vs teacher | ± SE | gap closed | teacher log-lik / token | ± SE | gap closed "
        "| answer tokens | stops (`<|im_end|>`) | trained tokens | train wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def f(v, fmt="{:.3f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    for row in result["rows"]:
        m = row.get("metrics")
        if not m:
            lines.append(f"| {row['label']} | - | - | - | - | - | - | - | - | - | {f(row.get('wall_s'), '{:.0f}')} "
                         f"({row.get('status', '')}) |")
            continue
        lines.append(
            f"| {row['label']} | {f(m['rouge_l']['mean'])} | {f(m['rouge_l']['se'])} | {f(row.get('gap_rouge'), '{:.2f}')} "
            f"| {f(m['teacher_logprob']['mean'])} | {f(m['teacher_logprob']['se'])} | "
            f"{f(row.get('gap_logprob'), '{:.2f}')} | {f(m['length']['mean'], '{:.1f}')} | "
            f"{f(m['stopped']['mean'], '{:.2f}')} | {f(row.get('trained_tokens'), '{:,.0f}')} | "
            f"{f(row.get('wall_s'), '{:.0f}')} |")
    lines += ["", "Sample answers (first held-out prompts):", ""]
    for q_i, q in enumerate(result["samples"]["prompts"]):
        lines.append(f"* **{q}**")
        for row in result["rows"]:
            if row.get("answers"):
                lines.append(f"  * {row['label']}: {row['answers'][q_i][:200]!r}")
    t = result["timings"]
    lines += ["", f"Wall times: {', '.join(f'{k} {v:.0f} s' for k, v in t.items())}. "
              f"Machine: {s['machine']}.", ""]
    return "\n".join(lines)
