"""The trainer's side of a teacher server: ``RemoteTeacher``.

It stands wherever the scoring code uses the local teacher: ``scoring.forward.completion_states``
hands it the teacher's scoring batch (its own tokens in cross-tokenizer runs), it posts the batch
to the server and returns ``CompletionStates(values=[B, C, H] final hidden states, head=the
teacher's output head)``. Only the head is held here (loaded from ``teacher_model`` alone: the
``lm_head`` weight, or the tied input embeddings: ``head.py``), so the fused JSD / ULD losses run unchanged
and the gradients are those of the local teacher.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.models.compatibility import text_config
from axolotl_gold.models.remote import wire
from axolotl_gold.models.remote.head import load_output_head
from axolotl_gold.scoring.forward import CompletionStates

LOG = logging.getLogger(__name__)

DEFAULT_KEYS = ("teacher_server_url", "teacher_model")
START_COMMAND = "python -m axolotl_gold.models.teacher_server --model {model} --host <host> --port <port>"


class TeacherServerError(RuntimeError):
    """The teacher server could not give a complete answer: nothing is trained on it."""


class HttpTeacher(nn.Module):
    """A teacher behind HTTP: bounded retries, timeouts and errors that name the URL, the key
    and the command that starts the server. Shared by both server modes (``RemoteTeacher``
    here, ``prompt_logprobs.PromptLogprobsTeacher``)."""

    def __init__(
        self, url: str, *, model_id: str, timeout: float, retries: int, backoff: float,
        keys: tuple[str, str] = DEFAULT_KEYS,
    ):
        super().__init__()
        self.url = url.rstrip("/")
        self.model_id = model_id
        # the keys an error names: (its URL's, its checkpoint's); `teacher_servers.<name>`, ...
        self.url_key, self.model_key = keys
        self.timeout = float(timeout)
        self.retries = max(1, int(retries))
        self.backoff = backoff
        self._session = None
        self._prefetch = None  # a TeacherPrefetch once ``prefetch`` is called

    # --- scoring: prepare (host), fetch (HTTP, any thread), place (device) ---
    def prepare(self, batch: dict):
        raise NotImplementedError

    def fetch(self, request):
        raise NotImplementedError

    def place(self, request, answer, batch: dict, use_head_bypass: bool):
        raise NotImplementedError

    def completion_states(self, batch: dict, use_head_bypass: bool = True):
        """The teacher's completion states of a scoring batch: the answer requested ahead
        by ``prefetch`` when there is one, else requested now."""
        taken = self._prefetch.take(batch) if self._prefetch is not None else None
        if taken is None:
            request = self.prepare(batch)
            taken = request, self.fetch(request)
        return self.place(*taken, batch, use_head_bypass)

    def prefetch(self, batches: list[dict]) -> None:
        """Request ``batches``' scores now, in order, from a worker thread (``prefetch``):
        each micro-step then takes its answer, requested while the one before trained."""
        from axolotl_gold.models.remote.prefetch import TeacherPrefetch

        if self._prefetch is None:
            self._prefetch = TeacherPrefetch(self)
        self._prefetch.submit(batches)

    def start_command(self) -> str:
        """How to start the server this client talks to (for error messages)."""
        return START_COMMAND.format(model=self.model_id)

    def refused(self, url: str, response) -> TeacherServerError:
        """The error for a 4xx answer (the request itself is wrong: not retried)."""
        return TeacherServerError(
            f"the teacher server at {url} refused the request: HTTP {response.status_code}: "
            f"{response.text[:500]}"
        )

    def _session_(self):
        import requests

        if self._session is None:
            self._session = requests.Session()
        return self._session

    def _unreachable(self, what: str, last) -> TeacherServerError:
        return TeacherServerError(
            f"the teacher server at {self.url} did not answer {what} after {self.retries} "
            f"tries ({last}). Start it on the teacher's machine with `"
            + self.start_command()
            + f"` and set `{self.url_key}` to its address (now "
            f"`{self.url}`), or raise `teacher_server_timeout` / `teacher_server_retries`."
        )

    def _request(self, method: str, path: str, decode, **kwargs):
        """``decode(response)`` of the first complete answer; connection errors, timeouts,
        5xx answers and malformed payloads are retried (bounded); a 4xx is raised at once."""
        import requests

        url = f"{self.url}{path}"
        last = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(min(self.backoff * 2.0 ** (attempt - 1), 10.0))
            try:
                response = self._session_().request(method, url, timeout=self.timeout, **kwargs)
            except requests.Timeout:
                last = f"timed out after {self.timeout:g} s"
                continue
            except requests.ConnectionError as err:
                last = f"connection failed: {type(err).__name__}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if not response.ok:  # the request itself is wrong: retrying cannot help
                raise self.refused(url, response)
            try:
                return decode(response)
            except wire.PayloadError as err:
                last = f"malformed answer: {err}"
                LOG.warning("teacher server %s: %s (try %d of %d)", url, last, attempt + 1, self.retries)
                continue
        if last is not None and str(last).startswith("malformed"):
            raise TeacherServerError(
                f"the teacher server at {url} gave no complete answer in {self.retries} tries "
                f"({last}); nothing was trained on it."
            )
        raise self._unreachable(f"{method} {path}", last)


class RemoteTeacher(HttpTeacher):
    """A teacher served by ``axolotl_gold.models.teacher_server``; holds its config and head."""

    def __init__(
        self,
        url: str,
        config,
        head: nn.Linear,
        *,
        model_id: str = "<teacher_model>",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        keys: tuple[str, str] = DEFAULT_KEYS,
    ):
        super().__init__(url, model_id=model_id, timeout=timeout, retries=retries, backoff=backoff, keys=keys)
        self.config = config
        self.lm_head = head
        self.server_info: dict = {}
        self.head_sha256: str | None = None
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- what the scoring code reads -------------------------------------
    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, *args, **kwargs):
        raise TypeError(
            "a RemoteTeacher is not run here: the scoring code calls `completion_states` (the "
            "server returns final hidden states only; sampling from the teacher, `seq_kd`, is "
            "not served)."
        )

    def prepare(self, batch: dict):
        """(scored positions on the host, their count, the request body)."""
        if batch.get("vision"):
            raise TeacherServerError("the teacher server takes token ids only (no pixel_values)")
        scored = (batch["completion_labels"] != -100).to("cpu")
        num = int(scored.sum())
        return scored, num, wire.encode_request(batch) if num else None

    def fetch(self, request) -> torch.Tensor | None:
        """The server's ``[num, H]`` hidden states (None when nothing is scored)."""
        _, num, body = request
        if not num:  # nothing scored (prompt-only rows): nothing to ask
            return None
        return self._post_states(body, num, self.lm_head.weight.shape[1])

    def place(self, request, states, batch: dict, use_head_bypass: bool) -> CompletionStates:
        scored = request[0]
        device = batch["input_ids"].device
        values = torch.zeros((*scored.shape, self.lm_head.weight.shape[1]), dtype=self.dtype, device=device)
        if states is not None:
            values[scored.to(device)] = states.to(device, self.dtype)
        if use_head_bypass:
            return CompletionStates(values=values, head=self.lm_head)
        return CompletionStates(values=self.lm_head(values), head=None)

    def _post_states(self, body: bytes, num: int, hidden_size: int) -> torch.Tensor:
        received = []

        def decode(response):
            received.append(len(response.content))
            return wire.decode_response(response.content, num, hidden_size, self.head_sha256)

        states = self._request(
            "POST", "/hidden_states", decode, data=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        self.requests += 1
        self.bytes_sent += len(body)
        self.bytes_received += received[-1]  # the whole body: states and header
        return states

    def health(self) -> dict:
        def decode(response):
            try:
                return response.json()
            except ValueError as err:
                raise wire.PayloadError(f"/health did not answer JSON: {response.text[:200]}") from err

        return self._request("GET", "/health", decode)

    def compare(self, info: dict, expected: dict) -> None:
        """``GoldConfigError`` naming both models when /health's ``info`` differs from ``expected``."""
        wrong = {k: (info.get(k), v) for k, v in expected.items() if info.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k} {got} (config: {want})" for k, (got, want) in wrong.items())
            raise GoldConfigError(
                f"`{self.url_key}: {self.url}` serves `{info.get('model')}` with {detail}, not the "
                f"teacher `{self.model_key}: {self.model_id}` names: start the server with `--model` the "
                f"checkpoint `{self.model_key}` names, or point `{self.model_key}` at the served one."
            )

    def check_server(self) -> dict:
        """Compare what the server serves with the teacher the config names (its head above
        all); raise ``GoldConfigError`` on any difference. Returns the server's /health."""
        info = self.health()
        head = self.lm_head
        config = text_config(self.config)
        if info.get("format") != wire.FORMAT:
            raise GoldConfigError(
                f"`{self.url_key}: {self.url}` speaks {info.get('format')!r}, this trainer "
                f"{wire.FORMAT!r}: run the same axolotl_gold version on both sides."
            )
        expected = {
            "hidden_size": int(head.weight.shape[1]),
            "vocab_size": int(config.vocab_size),
            "head_rows": int(head.weight.shape[0]),
            "head_bias": head.bias is not None,
        }
        self.compare(info, expected)
        served = info.get("model")
        dtype = wire.DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise GoldConfigError(f"`{self.url_key}: {self.url}` runs in {info.get('dtype')!r}")
        digest = wire.head_digest(head.weight, head.bias, dtype)
        if info.get("head_sha256") != digest:
            raise GoldConfigError(
                f"`{self.url_key}: {self.url}` serves `{served}`, whose output head differs from "
                f"the one in `{self.model_key}: {self.model_id}` (sha256 in {info.get('dtype')}: server "
                f"{str(info.get('head_sha256'))[:16]}..., config {digest[:16]}...): the same "
                f"architecture with other weights. Serve the checkpoint `{self.model_key}` names."
            )
        if dtype != self.dtype:
            LOG.info("teacher server runs in %s; its hidden states are cast to the head's %s", dtype, self.dtype)
        self.server_info = info
        self.head_sha256 = digest
        return info


def check_teacher_server(settings) -> dict:
    """Before any model loads (the plugin's ``pre_model_load``): the server answers /health
    and serves a model of the configured teacher's sizes (the head itself is compared once it
    is loaded, by ``connect_teacher``). A vLLM ``prompt_logprobs`` server is checked by its
    own client (served model, ``max_model_len``, tokenizer, top-k accepted)."""
    from transformers import AutoConfig

    if settings.teacher_server.mode == "prompt_logprobs":
        from axolotl_gold.models.remote.prompt_logprobs import connect_prompt_logprobs_teacher

        remote = connect_prompt_logprobs_teacher(settings)
        return {"model": remote.served_model, "max_model_len": remote.max_model_len}

    teacher = settings.teacher
    config = AutoConfig.from_pretrained(teacher.model, revision=teacher.revision)
    remote = RemoteTeacher(
        settings.teacher_server.url, config, nn.Linear(1, 1, device="meta"), model_id=teacher.model,
        **client_kwargs(settings.teacher_server),
    )
    info = remote.health()
    text = text_config(config)
    expected = {"vocab_size": int(text.vocab_size)}
    if getattr(text, "hidden_size", None) is not None:
        expected["hidden_size"] = int(text.hidden_size)
    remote.compare(info, expected)
    return info


def connect_teacher(settings, device) -> RemoteTeacher:
    """The remote teacher of ``settings`` (``GoldSettings``), its head on ``device``, checked
    against the server (reachable, same model, vocabulary and head) before any step."""
    teacher = settings.teacher
    dtype = wire.DTYPES[teacher.dtype]
    config, head = load_output_head(teacher.model, teacher.revision, dtype, device)
    remote = RemoteTeacher(
        settings.teacher_server.url, config, head, model_id=teacher.model,
        **client_kwargs(settings.teacher_server),
    )
    info = remote.check_server()
    LOG.info(
        "GOLD teacher: served by %s (%s, %s on %s); output head local (%s, %s)",
        remote.url, info.get("model"), info.get("dtype"), info.get("device"),
        tuple(head.weight.shape), head.weight.dtype,
    )
    return remote


def client_kwargs(server) -> dict:
    """A client's timeout, retries and error keys from ``TeacherServerSettings``."""
    return {"timeout": server.timeout, "retries": server.retries, "keys": (server.url_key, server.model_key)}
