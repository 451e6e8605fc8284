"""Scoring checkpoints, the results table (markdown + JSON) and the accuracy-vs-steps plot."""

from __future__ import annotations

import math
import threading

import task

from axolotl_gold.demo.score import generate_answers

EVAL_LOCK = threading.Lock()  # one model on the device for scoring at a time


def score_dir(model_dir: str, tokenizer_dir: str, examples, device: str, batch_size: int, digits: int) -> dict:
    """Greedy exact-match accuracy of a saved model on ``examples`` with its standard error."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with EVAL_LOCK:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        preds = generate_answers(model, tok, [p for p, _ in examples], batch_size=batch_size,
                                 max_new_tokens=task.max_new_tokens(digits))
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    n = len(examples)
    k = sum(task.is_correct(p, c) for (p, _), c in zip(examples, preds))
    acc = k / n
    return {"accuracy": acc, "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n), "n": n, "correct": k,
            "samples": [{"prompt": p, "completion": c} for (p, _), c in list(zip(examples, preds))[:3]]}


def gap_closed(acc: float, start: float, teacher: float) -> float | None:
    gap = teacher - start
    return None if gap <= 1e-9 else (acc - start) / gap


def combine(runs: list[dict]) -> tuple[float, float]:
    """Mean accuracy over seeds and its standard error (binomial SEs combined; with
    several seeds, the larger of that and the spread between seeds)."""
    accs = [r["accuracy"] for r in runs]
    mean = sum(accs) / len(accs)
    se = math.sqrt(sum(r["se"] ** 2 for r in runs)) / len(runs)
    if len(runs) > 1:
        sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
        se = max(se, sd / math.sqrt(len(accs)))
    return mean, se


def markdown(result: dict) -> str:
    ref = result["reference"]
    lines = [
        f"# Quality experiment: {result['task']}",
        "",
        f"Held-out exact-match accuracy, greedy decoding, n = {ref['teacher']['n']} prompts; "
        f"{result['settings']['steps']} optimizer steps of {result['settings']['window']} sequences per arm "
        f"(equal student training sequences), learning rate {result['settings']['lr']}, "
        f"seeds {result['settings']['seeds']}. Gap closed = (arm - student start) / (teacher - student start).",
        "",
        "| model | accuracy | ± SE | gap closed |",
        "| --- | ---: | ---: | ---: |",
        f"| teacher ({result['models']['teacher_params']:,} params) | {ref['teacher']['accuracy']:.3f} | "
        f"{ref['teacher']['se']:.3f} | |",
    ]
    for key in ("student", "student_bpe"):
        if key in ref:
            lines.append(f"| {key} start ({result['models'][key + '_params']:,} params) | "
                         f"{ref[key]['accuracy']:.3f} | {ref[key]['se']:.3f} | 0 |")
    lines += ["", "| arm | method | steps | accuracy | ± SE | gap closed | accuracy along training | wall s | status |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for arm in result["arms"]:
        curve = ", ".join(f"{s}: {a:.2f}" for s, a in arm.get("curve", []))
        acc = f"{arm['accuracy']:.3f}" if arm.get("accuracy") is not None else "-"
        se = f"{arm['se']:.3f}" if arm.get("se") is not None else "-"
        gap = f"{arm['gap_closed']:.2f}" if arm.get("gap_closed") is not None else "-"
        lines.append(f"| {arm['name']} | {arm['label']} | {arm.get('steps', '-')} | {acc} | {se} | {gap} | "
                     f"{curve} | {arm.get('wall_s', '-')} | {arm['status']} |")
    lines += ["", f"Total wall time {result['timings']['total_s']:.0f} s "
              f"(build {result['timings']['build_s']:.0f} s, arms + scoring {result['timings']['arms_s']:.0f} s) "
              f"on {result['settings']['device_name']}."]
    notes = [f"- {a['name']}: {a['reason']}" for a in result["arms"] if a.get("reason")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def plot(result: dict, path_png: str) -> str | None:
    """Accuracy against optimizer steps per arm (step 0 = the arm's student at the start),
    teacher as a dashed line. matplotlib if importable, else PIL, else an SVG next to it.
    Returns the path written."""
    series = [(a["name"], a["curve"]) for a in result["arms"] if a.get("curve")]
    teacher = result["reference"]["teacher"]["accuracy"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
        for name, curve in series:
            ax.plot([s for s, _ in curve], [a for _, a in curve], marker="o", label=name)
        ax.axhline(teacher, color="black", linestyle="--", label="teacher")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"held-out exact match (n={result['reference']['teacher']['n']})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(result["task"])
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path_png)
        plt.close(fig)
        return path_png
    except ImportError:
        pass
    try:
        return _plot_pil(series, teacher, path_png)
    except ImportError:
        path_svg = path_png.rsplit(".", 1)[0] + ".svg"
        with open(path_svg, "w") as f:
            f.write(_svg(series, teacher))
        return path_svg


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#000080", "#808000"]


def _frame(series):
    max_step = max([s for _, c in series for s, _ in c] + [1])
    W, H, L, R, T, B = 900, 560, 70, 200, 30, 50
    def xy(step, acc):
        return L + (W - L - R) * step / max_step, T + (H - T - B) * (1 - acc)
    return W, H, L, R, T, B, max_step, xy


def _plot_pil(series, teacher, path):
    from PIL import Image, ImageDraw

    W, H, L, R, T, B, max_step, xy = _frame(series)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        x0, y = xy(0, v)
        d.line([L, y, W - R, y], fill="#dddddd")
        d.text((L - 35, y - 6), f"{v:.2f}", fill="black")
    for s in sorted({s for _, c in series for s, _ in c}):
        x, _ = xy(s, 0)
        d.text((x - 8, H - B + 6), str(s), fill="black")
    d.text((W // 2 - 60, H - 22), "optimizer steps", fill="black")
    d.text((5, 8), "held-out exact-match accuracy", fill="black")
    _, ty = xy(0, teacher)
    for x in range(L, W - R, 12):
        d.line([x, ty, x + 6, ty], fill="black")
    for i, (name, curve) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        pts = [xy(s, a) for s, a in curve]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.line([W - R + 15, T + 18 * i + 6, W - R + 35, T + 18 * i + 6], fill=c, width=3)
        d.text((W - R + 40, T + 18 * i), name, fill="black")
    d.text((W - R + 40, T + 18 * len(series)), "teacher (dashed)", fill="black")
    img.save(path)
    return path


def _svg(series, teacher):
    W, H, L, R, T, B, max_step, xy = _frame(series)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">',
           f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="black"/>']
    _, ty = xy(0, teacher)
    out.append(f'<line x1="{L}" y1="{ty}" x2="{W - R}" y2="{ty}" stroke="black" stroke-dasharray="6,6"/>')
    for i, (name, curve) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, a) for s, a in curve))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{W - R + 40}" y="{T + 18 * i + 10}" font-size="12">{name}</text>')
        out.append(f'<line x1="{W - R + 15}" y1="{T + 18 * i + 6}" x2="{W - R + 35}" y2="{T + 18 * i + 6}" '
                   f'stroke="{c}" stroke-width="3"/>')
    out.append(f'<text x="{W // 2 - 60}" y="{H - 10}" font-size="12">optimizer steps (max {max_step})</text>')
    out.append("</svg>")
    return "\n".join(out)
