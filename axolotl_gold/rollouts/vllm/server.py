"""The vLLM rollout server for ``vllm_mode: server``: one command on its own devices.

    python -m axolotl_gold.rollouts.vllm.server --model <base_model> [--port 8011] [--host 127.0.0.1] [--enforce-eager]

Protocol (HTTP, JSON except weights):

- ``GET /health`` -> ``{"ok": true}``
- ``POST /generate`` ``{"prompts": [[ids]], "seed", "max_tokens", "temperature", "top_p",
  "top_k", "min_tokens", "eos_ids"}`` -> ``{"completions": [[ids]], "dropped": n}``
- ``POST /update_weights`` with a safetensors file as the body: the tensors are loaded
  into the running engine in place (a LoRA trainer sends only the merged modules it
  changes, a full fine-tune everything).

Axolotl's ``axolotl vllm-serve`` speaks TRL's NCCL weight-sync protocol, which needs a
GPU communicator; this server needs only HTTP, so it also runs on the CPU build.
"""

import argparse  # no `from __future__ import annotations`: FastAPI reads the annotations
import os


def build_app(llm):
    import threading

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from safetensors.torch import load

    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.vllm.sampling import model_runner, sample_rollouts

    app = FastAPI(title="axolotl-gold vLLM rollout server")
    # one engine, many training processes: requests take turns (the LLM is not thread-safe)
    lock = threading.Lock()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/generate")
    def generate(body: dict):
        sampling = SamplingSettings(
            max_new_tokens=int(body["max_tokens"]),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            top_k=int(body.get("top_k", 0)),
        )
        with lock:
            completions, dropped = sample_rollouts(
                llm, body["prompts"], sampling, int(body.get("seed", 0)),
                set(body.get("eos_ids", [])), int(body.get("min_tokens", 0)),
            )
        return {"completions": completions, "dropped": dropped}

    @app.post("/update_weights")
    async def update_weights(request: Request):
        tensors = load(await request.body())

        def reload():
            with lock:
                model_runner(llm).reload_weights(weights_iterator=iter(tensors.items()))

        await run_in_threadpool(reload)
        return {"updated": len(tensors)}

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the student's base checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument(
        "--enforce-eager", action="store_true",
        help="no CUDA graphs (the default captures them; `vllm_enforce_eager` in the training config)",
    )
    args = parser.parse_args(argv)

    # in-process engine core: weights are reloaded through its model runner
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    import uvicorn

    from axolotl_gold.rollouts.vllm.sampling import shield_lazy_module_objects

    shield_lazy_module_objects()
    from vllm import LLM

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager or not torch.cuda.is_available(),  # CPU build: eager
    )
    uvicorn.run(build_app(llm), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
