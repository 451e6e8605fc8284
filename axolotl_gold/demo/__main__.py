"""``python -m axolotl_gold.demo``: build demo assets, score a model, print a before/after report.

    python -m axolotl_gold.demo build OUT [--cross-tokenizer] [--tiny] [--seed N] [--force]
    python -m axolotl_gold.demo score MODEL_DIR EVAL_JSONL [--n N]
    python -m axolotl_gold.demo report --teacher DIR --before DIR --after DIR --eval FILE [--n N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _quiet():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def _set_threads():
    import torch

    from axolotl_gold.demo.pretrain import pick_threads

    torch.set_num_threads(pick_threads("auto"))


def cmd_build(args) -> int:
    t0 = time.time()
    if args.tiny:
        from axolotl_gold.demo.models import build_tiny_pair

        paths = build_tiny_pair(args.out, cross_tokenizer=args.cross_tokenizer, seed=args.seed)
        print(json.dumps(paths, indent=2))
        print(f"built tiny random pair in {time.time() - t0:.1f}s")
        return 0
    from axolotl_gold.demo.pretrain import build_demo

    scores = build_demo(args.out, seed=args.seed, cross_tokenizer=args.cross_tokenizer, force=args.force)
    print(f"teacher accuracy={scores['teacher']:.3f}  student accuracy={scores['student']:.3f}  "
          f"(n={scores['n_eval']}, build {scores['build_seconds']}s, this call {time.time() - t0:.1f}s)")
    print(json.dumps(scores["paths"], indent=2))
    return 0


def cmd_build_vlm(args) -> int:
    from axolotl_gold.demo.vlm import build_tiny_vlms

    for name, path in build_tiny_vlms(args.out, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


def cmd_score(args) -> int:
    _set_threads()
    from axolotl_gold.demo.score import score_model

    acc = score_model(args.model_dir, args.eval_jsonl, n=args.n, batch_size=args.batch_size)
    print(f"accuracy={acc:.3f}")
    return 0


def cmd_report(args) -> int:
    _set_threads()
    from axolotl_gold.demo.models import read_jsonl
    from axolotl_gold.demo.score import score_model

    n = len(read_jsonl(args.eval, args.n))
    rows = []
    for label, path in (("teacher", args.teacher), ("student before", args.before), ("student after", args.after)):
        acc = score_model(path, args.eval, n=args.n, batch_size=args.batch_size)
        rows.append((label, acc, path))
    before, after = rows[1][1], rows[2][1]
    # standard error of the difference of two proportions on the same n prompts (upper bound, unpaired)
    se = math.sqrt(max(before * (1 - before) + after * (1 - after), 1e-12) / max(n, 1))
    width = max(len(r[0]) for r in rows)
    print(f"exact-match accuracy on {n} held-out prompts ({args.eval})")
    print(f"{'model'.ljust(width)}  accuracy  path")
    for label, acc, path in rows:
        print(f"{label.ljust(width)}  {acc:8.3f}  {path}")
    print(f"{'change'.ljust(width)}  {after - before:+8.3f}  ({(after - before) / se:+.1f} standard errors)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "teacher": rows[0][1], "before": before, "after": after,
                       "paths": {r[0]: r[2] for r in rows}}, f, indent=2)
    return 0


def main(argv=None) -> int:
    _quiet()
    ap = argparse.ArgumentParser(prog="python -m axolotl_gold.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build teacher/, student/, data/ and scores.json under OUT")
    b.add_argument("out")
    b.add_argument("--cross-tokenizer", action="store_true", help="teacher uses the BPE tokenizer")
    b.add_argument("--tiny", action="store_true", help="random-weight pair and a tiny dataset (seconds)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even if OUT is up to date")
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("build-vlm", help="tiny VLM student/teachers and an image dataset under OUT")
    v.add_argument("out")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=cmd_build_vlm)

    s = sub.add_parser("score", help="greedy exact-match accuracy of a model or adapter directory")
    s.add_argument("model_dir")
    s.add_argument("eval_jsonl")
    s.add_argument("--n", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.set_defaults(func=cmd_score)

    r = sub.add_parser("report", help="before/after/teacher table")
    r.add_argument("--teacher", required=True)
    r.add_argument("--before", required=True)
    r.add_argument("--after", required=True)
    r.add_argument("--eval", required=True)
    r.add_argument("--n", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--json", default=None, help="also write the numbers here")
    r.set_defaults(func=cmd_report)

    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
