"""The teacher server (exact mode): the teacher loaded once, its final hidden states served.

    python -m axolotl_gold.models.teacher_server --model <teacher_model> [--host 127.0.0.1]
        [--port 8012] [--dtype auto|bfloat16|float16|float32] [--device auto|cpu|cuda|cuda:N]
        [--device-map auto]   # a teacher larger than one GPU, its layers over the visible GPUs

- ``GET /health`` -> JSON: ``format``, ``model`` (as given), ``model_type``, ``hidden_size``,
  ``vocab_size`` (the config's), ``head_rows`` / ``head_bias``, ``dtype``, ``device`` and
  ``head_sha256`` (the output head's weight and bias in ``dtype``), which the trainer compares
  with the head it loaded from ``teacher_model`` before the first step; ``served_requests``
  and ``served_states`` count what it has answered.
- ``POST /hidden_states``: a ``gold-teacher/1`` safetensors body (``wire``) -> the teacher's
  final hidden states (after the final norm, before the head) at the scored positions, in the
  server's dtype. A malformed request is answered 400 with the reason.

Requests from several training processes that arrive while a forward runs are served
together in the next one (``batching.RequestBatcher``, up to ``--max-batch-rows`` rows);
``served_forwards`` counts the forwards.
"""

import argparse  # no `from __future__ import annotations`: FastAPI reads the annotations
import logging
import sys

from axolotl_gold.models.remote import wire

LOG = logging.getLogger(__name__)


def describe(model, model_id: str, head_sha256: str) -> dict:
    from axolotl_gold.models.compatibility import text_config
    from axolotl_gold.scoring.forward import bypassable_head

    config = text_config(model.config)
    head = bypassable_head(model)
    return {
        "ok": True,
        "format": wire.FORMAT,
        "model": model_id,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": int(head.weight.shape[1]),
        "vocab_size": int(config.vocab_size),
        "head_rows": int(head.weight.shape[0]),
        "head_bias": head.bias is not None,
        "dtype": str(head.weight.dtype).removeprefix("torch."),
        "device": str(head.weight.device),
        "head_sha256": head_sha256,
    }


def hidden_states(model, request: dict):
    """``[N, H]`` final hidden states at ``request["scored"]`` (the head bypassed)."""
    import torch

    from axolotl_gold.scoring.forward import completion_states

    from axolotl_gold.scoring.forward import bypassable_head

    # the head's device: with a device_map the loader's hooks move the inputs to the
    # embeddings, and the head is bypassed only when the batch sits where it does
    device = bypassable_head(model).weight.device
    batch = {k: v.to(device) for k, v in request.items()}
    scored = batch.pop("scored")
    batch["completion_labels"] = scored  # only its width is read
    with torch.inference_mode():
        states = completion_states(model, batch, use_head_bypass=True)
    return states.values[scored]


def build_app(model, model_id: str, max_batch_rows: int = 64):
    import threading

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response

    from axolotl_gold.models.compatibility import text_config
    from axolotl_gold.models.remote.batching import RequestBatcher
    from axolotl_gold.scoring.forward import bypassable_head

    head = bypassable_head(model)
    if head is None:
        raise SystemExit(
            f"teacher {model_id}: its output head is not a plain nn.Linear or its config "
            "post-processes logits (softcapping / scaling), so its final hidden states do not "
            "determine its logits through the head alone: the teacher server cannot serve it yet."
        )
    digest = wire.head_digest(head.weight, head.bias, head.weight.dtype)
    info = describe(model, model_id, digest)
    vocab = max(int(text_config(model.config).vocab_size), int(head.weight.shape[0]))
    app = FastAPI(title="axolotl-gold teacher server")
    # one forward at a time; requests that wait for it are served together
    batcher = RequestBatcher(lambda request: hidden_states(model, request), max_rows=max_batch_rows)
    served = {"requests": 0, "states": 0}
    counting = threading.Lock()

    @app.get("/health")
    def health():
        return {**info, "served_requests": served["requests"], "served_states": served["states"],
                "served_forwards": batcher.forwards}

    @app.post("/hidden_states")
    async def serve(request: Request):
        body = await request.body()
        try:
            parsed = wire.decode_request(body, vocab)
        except wire.PayloadError as err:
            return JSONResponse(status_code=400, content={"error": str(err)})

        def run():
            states = batcher.submit(parsed)
            with counting:
                served["requests"] += 1
                served["states"] += states.shape[0]
            return wire.encode_response(states, digest)

        return Response(content=await run_in_threadpool(run), media_type="application/octet-stream")

    return app


def load(model_path: str, dtype: str, device: str, revision=None, device_map=None):
    import torch

    from axolotl_gold.config.settings import TeacherSettings
    from axolotl_gold.models.teacher import load_teacher

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    init_kwargs = {"device_map": device_map} if device_map else {}
    settings = TeacherSettings(model_path, revision, model_path, dtype, init_kwargs)
    return load_teacher(settings, torch.device(device))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="axolotl-gold teacher server (exact mode: final hidden states)")
    parser.add_argument("--model", required=True, help="the teacher checkpoint (the trainer's `teacher_model`)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--device-map", default=None,
                        help="a teacher larger than one GPU: `auto` spreads its layers over the visible GPUs")
    parser.add_argument("--max-batch-rows", type=int, default=64,
                        help="the most rows one forward serves when requests of several processes wait")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import uvicorn

    model = load(args.model, args.dtype, args.device, args.revision, args.device_map)
    app = build_app(model, args.model, args.max_batch_rows)
    info = describe(model, args.model, "")
    LOG.info(
        "teacher server: %s (%s, hidden %s, vocab %s, %s on %s) at http://%s:%s",
        args.model, info["model_type"], info["hidden_size"], info["vocab_size"], info["dtype"],
        info["device"], args.host, args.port,
    )
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
