"""The top-k + tail approximation (``teacher_server_mode: prompt_logprobs``) against the exact
full-vocabulary JSD, on a real teacher / student pair and real on-policy positions.

Teacher: SmolLM2-135M-Instruct (``scripts/real_model.py`` caches it in ``.assets/``; vocabulary
49,152). Student: the same checkpoint with 20 of its 30 layers, as ``experiments/real_model``
prunes it. Positions: the student samples answers (temperature 1) to the experiment's training
prompts; every answer token is one scored position. Per position both models' full logits are
computed once; the exact loss is ``generalized_jsd_token_loss`` on them, the approximate one
``topk_tail_token_loss`` on the teacher's top-k log-probabilities plus the sampled token where it
is outside the top-k (what vLLM's ``prompt_logprobs`` answers: k + 1 entries there).

Printed per (beta, k): the teacher mass the listed ids cover, the relative error of the summed
loss, the per-token relative error (median), the cosine similarity of the gradient with respect
to the student's logits (all positions flattened, and the mean over positions), and the
relative L2 error of that gradient.

    OMP_NUM_THREADS=1 python benchmarks/bench_topk_tail.py            # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEEP = list(range(14)) + list(range(24, 30))  # experiments/real_model's student: 20 of 30 layers


def sample_positions(teacher_dir: str, n_prompts: int, max_new: int, seed: int):
    """(student logits [N, V], teacher logits [N, V], sampled ids [N]) over the student's answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "experiments" / "real_model"))
    from prompts import split

    from axolotl_gold.data.batching import build_scoring_batch
    from axolotl_gold.scoring.forward import completion_states

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    teacher_layers = model.model.layers
    student_layers = torch.nn.ModuleList(teacher_layers[i] for i in KEEP)

    def use(layers):
        model.model.layers = layers
        model.config.num_hidden_layers = len(layers)
        for i, layer in enumerate(layers):
            layer.self_attn.layer_idx = i

    questions = split()[0][:n_prompts]
    prompts = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    use(student_layers)
    torch.manual_seed(seed)
    completions = []
    with torch.no_grad():
        for p in prompts:  # one at a time: no padding inside generate
            out = model.generate(torch.tensor([p]), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new, eos_token_id=2, pad_token_id=2)
            completions.append(out[0, len(p):].tolist())
    batch = build_scoring_batch(prompts, completions, pad_id=2)
    mask = batch["completion_labels"] != -100
    with torch.no_grad():
        student = completion_states(model, batch, use_head_bypass=False).values[mask]
        use(teacher_layers)
        teacher = completion_states(model, batch, use_head_bypass=False).values[mask]
    return student, teacher, batch["completion_labels"][mask]


def vllm_like_topk(teacher_logp, sampled, k: int):
    """The teacher's top-k (ids, log-probs), plus the sampled token as a (k+1)-th entry where it
    is outside the top-k (-1 padding elsewhere): vLLM's prompt_logprobs answer."""
    import torch

    lp, ids = teacher_logp.topk(k, dim=-1)
    extra = torch.where((ids == sampled[:, None]).any(-1), -1, sampled)
    ids = torch.cat([ids, extra[:, None]], -1)
    lp = torch.cat([lp, teacher_logp.gather(1, sampled.clamp(min=0)[:, None])], -1)
    return ids, lp


def measure(student, teacher, sampled, ks, betas, temperatures):
    import torch

    from axolotl_gold.losses import generalized_jsd_token_loss
    from axolotl_gold.losses.topk_tail import topk_tail_token_loss

    vocab = student.shape[-1]
    teacher_logp = teacher.log_softmax(-1)
    rows = []
    for temperature in temperatures:
        for beta in betas:
            z = student.clone().requires_grad_()
            exact = generalized_jsd_token_loss(z, teacher, beta=beta, temperature=temperature)
            (g_exact,) = torch.autograd.grad(exact.sum(), z)
            for k in ks:
                ids, lp = vllm_like_topk(teacher_logp, sampled, min(k, vocab))
                z = student.clone().requires_grad_()
                approx = topk_tail_token_loss(z, ids, lp, beta=beta, temperature=temperature)
                (g,) = torch.autograd.grad(approx.sum(), z)
                listed = torch.where(ids >= 0, lp.exp(), 0.0).sum(-1)
                per_pos_cos = torch.nn.functional.cosine_similarity(g.double(), g_exact.double(), dim=-1)
                rows.append({
                    "temperature": temperature,
                    "beta": beta,
                    "k": int(min(k, vocab)),
                    "teacher_mass_listed": float(listed.mean()),
                    "loss_exact_per_token": float(exact.mean()),
                    "loss_approx_per_token": float(approx.mean()),
                    "loss_rel_error": float((approx.sum() - exact.sum()).abs() / exact.sum()),
                    "token_rel_error_median": float(((approx - exact).abs() / exact.clamp_min(1e-12)).median()),
                    "grad_cosine": float(torch.nn.functional.cosine_similarity(
                        g.double().flatten(), g_exact.double().flatten(), dim=0)),
                    "grad_cosine_mean_per_position": float(per_pos_cos.mean()),
                    "grad_rel_l2": float((g - g_exact).double().norm() / g_exact.double().norm()),
                })
                r = rows[-1]
                print(f"| {temperature:g} | {beta:g} | {r['k']:>6} | {r['teacher_mass_listed']:.3f} | "
                      f"{r['loss_exact_per_token']:.4f} | {r['loss_approx_per_token']:.4f} | "
                      f"{r['loss_rel_error']:.4f} | {r['token_rel_error_median']:.4f} | {r['grad_cosine']:.4f} | "
                      f"{r['grad_cosine_mean_per_position']:.4f} | {r['grad_rel_l2']:.4f} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(REPO / ".assets" / "smollm2-135m-instruct"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", default="1,5,20,100")
    ap.add_argument("--betas", default="0,0.5,1")
    ap.add_argument("--temperatures", default="1,0.5,2")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_topk_tail.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    start = time.perf_counter()
    student, teacher, sampled = sample_positions(args.teacher, args.prompts, args.max_new, args.seed)
    vocab = student.shape[-1]
    ks = [int(k) for k in args.ks.split(",")] + [vocab]
    print(f"{student.shape[0]} scored positions (student samples, {args.prompts} prompts), vocabulary {vocab}; "
          f"{time.perf_counter() - start:.0f} s to sample and score\n")
    print("| loss temperature | beta | k | teacher mass in the listed ids | exact loss / token | top-k + tail "
          "loss / token | rel. error of the loss | median per-token rel. error | cosine of student-logit "
          "gradients | mean per-position cosine | rel. L2 error of the gradient |")
    print("|" + " ---: |" * 11)
    rows = measure(student, teacher, sampled, ks,
                   [float(b) for b in args.betas.split(",")], [float(t) for t in args.temperatures.split(",")])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "teacher": "SmolLM2-135M-Instruct (30 layers)", "student": f"the same, layers {KEEP}",
        "positions": int(student.shape[0]), "vocab": int(vocab), "prompts": args.prompts,
        "max_new_tokens": args.max_new, "seed": args.seed,
        "teacher_entries": "top-k, plus the sampled token where it is outside the top-k (vLLM prompt_logprobs)",
        "rows": rows, "seconds": time.perf_counter() - start,
    }, indent=1))
    print(f"\nwritten {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
