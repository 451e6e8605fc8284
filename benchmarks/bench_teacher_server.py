"""The teacher server's cost: bytes per scored token and scoring time against a local teacher.

Builds a small random Qwen2-shaped teacher (CPU by default), starts
``python -m axolotl_gold.models.teacher_server`` on loopback in a subprocess, and scores the same
batches with the teacher loaded locally and through the server (``RemoteTeacher``: the
teacher's final hidden states over HTTP, the output head local). Prints:

1. measured bytes on the wire per scored token (request + answer) beside what full-vocabulary
   logits and top-k log-probabilities would take for the same model;
2. the same per-token sizes for real teacher shapes (computed, bf16 states and logits);
3. scoring time per batch, local vs remote (median of ``--reps``), and the largest difference
   between the two sets of hidden states.

    python benchmarks/bench_teacher_server.py                      # CPU, about a minute
    python benchmarks/bench_teacher_server.py --hidden 1024 --vocab 64000 --layers 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# (name, hidden size, vocabulary) of teachers people serve
REAL_SHAPES = [
    ("Qwen2.5-7B", 3584, 152_064),
    ("Qwen3-32B", 5120, 151_936),
    ("Llama-3.1-70B", 8192, 128_256),
    ("Qwen3-235B-A22B", 4096, 151_936),
]
TOPK_BYTES_PER_ENTRY = 8  # int32 token id + float32 log-probability, packed binary


def build_teacher(folder: str, hidden: int, vocab: int, layers: int) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(1, hidden // 64)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="float32",
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str, device: str):
    import requests

    port = free_port()
    log = open(Path(model) / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "axolotl_gold.models.teacher_server", "--model", model, "--port", str(port),
         "--dtype", dtype, "--device", device],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(Path(model) / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def batches(n: int, rows: int, prompt: int, completion: int, vocab: int, seed: int = 0):
    from axolotl_gold.data.batching import build_scoring_batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompts = [torch.randint(0, vocab, (prompt - 7 * r,), generator=g).tolist() for r in range(rows)]
        completions = [torch.randint(0, vocab, (completion - 5 * r,), generator=g).tolist() for r in range(rows)]
        out.append(build_scoring_batch(prompts, completions, pad_id=0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=192)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--topk", type=int, nargs="+", default=[8, 20])
    args = parser.parse_args()

    from axolotl_gold.config.settings import TeacherSettings
    from axolotl_gold.models.remote.teacher import RemoteTeacher, load_output_head
    from axolotl_gold.models.teacher import load_teacher
    from axolotl_gold.scoring.forward import completion_states

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_teacher(tmp, args.hidden, args.vocab, args.layers)
        proc, url = start_server(model_dir, args.dtype, args.device)
        try:
            local = load_teacher(TeacherSettings(model_dir, None, model_dir, args.dtype), device)
            config, head = load_output_head(model_dir, None, dtype, device)
            remote = RemoteTeacher(url, config, head, model_id=model_dir)
            remote.check_server()
            work = batches(args.reps + 1, args.rows, args.prompt, args.completion, args.vocab)
            scored = [int((b["completion_labels"] != -100).sum()) for b in work]

            def timed(teacher, batch):
                start = time.perf_counter()
                with torch.no_grad():
                    states = completion_states(teacher, batch, use_head_bypass=True)
                return time.perf_counter() - start, states.values

            timed(local, work[0]), timed(remote, work[0])  # warm-up
            sent0, recv0 = remote.bytes_sent, remote.bytes_received
            local_s, remote_s, diffs = [], [], []
            for batch in work[1:]:
                t_local, v_local = timed(local, batch)
                t_remote, v_remote = timed(remote, batch)
                mask = batch["completion_labels"] != -100
                local_s.append(t_local)
                remote_s.append(t_remote)
                diffs.append(float((v_local[mask].float() - v_remote[mask].float()).abs().max()))
            tokens = sum(scored[1:])
            sent = (remote.bytes_sent - sent0) / tokens
            received = (remote.bytes_received - recv0) / tokens
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    elem = torch.tensor([], dtype=dtype).element_size()
    print(f"\nteacher: hidden {args.hidden}, vocab {args.vocab}, {args.layers} layers, {args.dtype} on {args.device}; "
          f"{args.rows} rows x ({args.prompt} prompt + {args.completion} completion) tokens, "
          f"{tokens // args.reps} scored tokens per batch\n")
    print("| payload per scored token | bytes | vs hidden states |")
    print("| --- | ---: | ---: |")
    rows = [("answer: hidden states + header (measured)", received),
            ("request: token ids, masks, positions (measured)", sent),
            (f"full-vocabulary logits ({args.dtype})", args.vocab * elem)]
    rows += [(f"top-{k} (int32 id + fp32 log-prob)", k * TOPK_BYTES_PER_ENTRY) for k in args.topk]
    for name, value in rows:
        print(f"| {name} | {value:,.0f} | {value / received:.2f}x |")

    print("\n| real teacher (bf16) | hidden | vocab | hidden states B/token | logits B/token | logits / states | top-8 B/token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, h, v in REAL_SHAPES:
        print(f"| {name} | {h} | {v:,} | {2 * h:,} | {2 * v:,} | {v / h:.1f}x | {8 * TOPK_BYTES_PER_ENTRY} |")

    med_local, med_remote = statistics.median(local_s), statistics.median(remote_s)
    print(f"\n| scoring one batch ({args.reps} reps, median) | ms | per scored token (us) |")
    print("| --- | ---: | ---: |")
    per = tokens / args.reps
    print(f"| local teacher (forward, head bypassed) | {1e3 * med_local:.1f} | {1e6 * med_local / per:.1f} |")
    print(f"| teacher server over loopback (forward + HTTP + (de)serialization) | {1e3 * med_remote:.1f} | {1e6 * med_remote / per:.1f} |")
    print(f"| overhead | {1e3 * (med_remote - med_local):.1f} | {1e6 * (med_remote - med_local) / per:.1f} |")
    print(f"\nmax |local - remote| over the scored hidden states: {max(diffs):.3g}")


if __name__ == "__main__":
    main()
