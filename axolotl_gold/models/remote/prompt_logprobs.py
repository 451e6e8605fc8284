"""A teacher behind a server we do not run: vLLM's OpenAI-compatible ``prompt_logprobs``.

``teacher_server_mode: prompt_logprobs``. Per scoring batch, one ``POST /v1/completions`` with
every row's tokens as token ids, ``max_tokens: 1`` and ``prompt_logprobs: k``; vLLM answers,
per prompt token, the teacher's top-k log-probabilities at temperature 1 (plus the prompt
token's own where it is outside the top-k: k + 1 entries). The scored positions' entries
become ``TopKStates`` ``[B, C, k + 1]`` (ids, -1 where padded; log-probs), and the objective
(``scoring.topk.TopKTailObjective``) takes the top-k + tail JSD (``losses/topk_tail.py``).

Checked at start (``check_server``): ``GET /v1/models`` (the served name and its
``max_model_len``, which must hold ``sequence_len``), ``POST /tokenize`` of a probe text
against the teacher tokenizer, and one probe scoring request (the server accepts k, and
every id it answers is inside the teacher tokenizer's vocabulary; any answer's id outside
it raises, then and later). Retries, timeouts and errors are ``teacher.HttpTeacher``'s.
"""

from __future__ import annotations

import logging

import torch

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.models.remote import wire
from axolotl_gold.models.remote.teacher import DEFAULT_KEYS, HttpTeacher, TeacherServerError, client_kwargs
from axolotl_gold.scoring.topk import TopKStates

LOG = logging.getLogger(__name__)

VLLM_START_COMMAND = "vllm serve {model} --host <host> --port <port> --max-logprobs {k}"
# a probe with letters, digits, punctuation, spaces and non-ASCII: tokenizers that differ
# almost always split it differently
PROBE_TEXT = "The teacher: 12 + 30 = 42, d'accord? Ünïcødé -> ok.\n  end"


class PromptLogprobsTeacher(HttpTeacher):
    """The teacher's top-k log-probabilities at the scored positions, from vLLM."""

    def __init__(
        self,
        url: str,
        config,
        vocab_size: int,
        *,
        top_k: int = 20,
        model_id: str = "<teacher_model>",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        keys: tuple[str, str] = DEFAULT_KEYS,
    ):
        super().__init__(url, model_id=model_id, timeout=timeout, retries=retries, backoff=backoff, keys=keys)
        self.config = config  # the teacher's HF config (its vocab_size for the shared vocabulary)
        self.vocab_size = int(vocab_size)  # the teacher tokenizer's: ids at or beyond it raise
        self.top_k = int(top_k)
        self.served_model: str | None = None
        self.max_model_len: int | None = None
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def start_command(self) -> str:
        return VLLM_START_COMMAND.format(model=self.model_id, k=max(self.top_k, 20))

    def refused(self, url: str, response) -> TeacherServerError:
        hint = ""
        if "logprobs" in response.text:
            hint = (
                f" The server caps `prompt_logprobs` below `teacher_server_top_k: {self.top_k}`: "
                f"start it with `--max-logprobs {self.top_k}` or lower `teacher_server_top_k`."
            )
        elif "max_model_len" in response.text or "maximum context length" in response.text:
            hint = " The sequence is longer than the server's `--max-model-len`: raise it or lower `sequence_len`."
        return TeacherServerError(
            f"the vLLM server at {url} (`{self.url_key}`) refused the request: HTTP "
            f"{response.status_code}: {response.text[:500]}.{hint}"
        )

    def forward(self, *args, **kwargs):
        raise TypeError(
            "a PromptLogprobsTeacher is not run here: the scoring code calls `completion_states` "
            "(the server answers top-k log-probabilities only)."
        )

    # --- scoring -------------------------------------------------------------
    def prepare(self, batch: dict):
        """The scored rows, their columns, and the prompts and positions to ask (host side)."""
        if batch.get("vision"):
            raise TeacherServerError("a prompt_logprobs teacher takes token ids only (no pixel_values)")
        labels = batch["completion_labels"]
        rows, width = labels.shape
        mask = batch["attention_mask"].to("cpu").bool()
        input_ids = batch["input_ids"].to("cpu")
        scored = (labels != -100).to("cpu")
        start = input_ids.shape[1] - width  # the completion region's first column
        real_index = mask.long().cumsum(-1) - 1  # column -> index among the row's real tokens
        asked = [b for b in range(rows) if scored[b].any()]
        prompts = [input_ids[b][mask[b]].tolist() for b in asked]
        columns = [scored[b].nonzero().flatten().tolist() for b in asked]
        positions = [[int(real_index[b, start + j]) for j in cols] for b, cols in zip(asked, columns)]
        return (rows, width), asked, columns, prompts, positions

    def fetch(self, request):
        _, asked, _, prompts, positions = request
        return self.prompt_logprobs(prompts, positions) if asked else []

    def place(self, request, answers, batch: dict, use_head_bypass: bool = True) -> TopKStates:
        """``TopKStates`` of the batch's completion region (``[B, C, K]``; K = k + 1)."""
        (rows, width), asked, columns, _, _ = request
        ids = torch.full((rows, width, self.top_k + 1), -1, dtype=torch.long)
        logprobs = torch.zeros((rows, width, self.top_k + 1), dtype=torch.float32)
        for b, cols, answer in zip(asked, columns, answers):
            for j, (got_ids, got_lp) in zip(cols, answer):
                ids[b, j, : len(got_ids)] = torch.tensor(got_ids)
                logprobs[b, j, : len(got_lp)] = torch.tensor(got_lp)
        device = batch["completion_labels"].device
        return TopKStates(ids=ids.to(device), logprobs=logprobs.to(device))

    def prompt_logprobs(
        self, prompts: list[list[int]], positions: list[list[int]], top_k: int | None = None
    ) -> list[list[tuple[list[int], list[float]]]]:
        """Per prompt, per asked position (an index into the prompt, >= 1), the teacher's
        (ids, log-probs) there, most likely first, from one ``POST /v1/completions``. vLLM
        answers a list per prompt token (None first, then dicts ``{token_id: {"logprob",
        "rank", "decoded_token"}}``); a malformed answer is retried, an id outside the
        teacher's vocabulary raises ``GoldConfigError`` at once."""
        import json

        if self.served_model is None:
            self.check_server()
        body = json.dumps({
            "model": self.served_model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": int(top_k or self.top_k),
        }).encode()
        received = []

        limit = int(top_k or self.top_k) + 1

        def decode(response):
            received.append(len(response.content))
            answers = _parse_choices(response, [len(p) for p in prompts])
            return [
                [_entry(answer[pos] if pos >= 1 else None, prompt[pos], pos, limit, self) for pos in asked]
                for prompt, answer, asked in zip(prompts, answers, positions)
            ]

        answers = self._request(
            "POST", "/v1/completions", decode, data=body, headers={"Content-Type": "application/json"}
        )
        self.requests += 1
        self.bytes_sent += len(body)
        self.bytes_received += received[-1]
        return answers

    # --- the check at start ------------------------------------------------
    def models(self) -> list[dict]:
        def decode(response):
            try:
                data = response.json()["data"]
                return [dict(m) for m in data]
            except (ValueError, KeyError, TypeError) as err:
                raise wire.PayloadError(f"/v1/models is not an OpenAI model list: {response.text[:200]}") from err

        return self._request("GET", "/v1/models", decode)

    def check_server(self, tokenizer=None, sequence_len: int | None = None) -> dict:
        """The served model: its name (used in every request), ``max_model_len`` (must hold
        ``sequence_len``), its tokenizer (``tokenizer``'s ids for a probe text) and one probe
        scoring request (accepts k; ids inside the teacher's vocabulary). ``GoldConfigError``
        naming the keys on any mismatch. Returns the model card."""
        import json

        cards = self.models()
        names = [str(c.get("id")) for c in cards]
        chosen = [c for c in cards if self.model_id in (c.get("id"), c.get("root"))] or (cards if len(cards) == 1 else [])
        if not chosen:
            raise GoldConfigError(
                f"`{self.url_key}: {self.url}` serves {names}, none of them `{self.model_key}: "
                f"{self.model_id}`: start it with `{self.start_command()}`."
            )
        card = chosen[0]
        self.served_model = str(card["id"])
        self.max_model_len = card.get("max_model_len")
        if sequence_len is not None and self.max_model_len is not None and int(self.max_model_len) <= sequence_len:
            raise GoldConfigError(
                f"`{self.url_key}: {self.url}` serves `{self.served_model}` with max_model_len "
                f"{self.max_model_len}, which does not hold `sequence_len: {sequence_len}` plus the one "
                f"token a completion request generates: start it with `--max-model-len {sequence_len + 1}` "
                "or more, or lower `sequence_len`."
            )
        probe = list(range(min(8, self.vocab_size)))
        if tokenizer is not None:
            want = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
            body = json.dumps({"model": self.served_model, "prompt": PROBE_TEXT, "add_special_tokens": False})
            try:
                got = self._request("POST", "/tokenize", _tokens, data=body, headers={"Content-Type": "application/json"})
            except TeacherServerError as err:  # a server without /tokenize: the probe below still runs
                LOG.warning("teacher server %s: no /tokenize (%s); vocabulary checked by ids only", self.url, err)
                got = want
            if got != want:
                raise GoldConfigError(
                    f"`{self.url_key}: {self.url}` serves `{self.served_model}`, whose tokenizer "
                    f"splits a probe text into {got[:12]}..., not {want[:12]}... as the tokenizer of "
                    f"`{self.model_key}: {self.model_id}` does: serve the checkpoint `{self.model_key}` names "
                    f"(or point `{self.model_key}` at the served one)."
                )
            probe = want
        self.prompt_logprobs([probe], [list(range(1, len(probe)))])
        LOG.info("GOLD teacher: vLLM at %s serves %s (max_model_len %s); top-%d log-probs",
                 self.url, self.served_model, self.max_model_len, self.top_k)
        return card


def _tokens(response) -> list[int]:
    try:
        return [int(t) for t in response.json()["tokens"]]
    except (ValueError, KeyError, TypeError) as err:
        raise wire.PayloadError(f"/tokenize answered no token list: {response.text[:200]}") from err


def _parse_choices(response, lengths: list[int]) -> list[list]:
    try:
        choices = sorted(response.json()["choices"], key=lambda c: int(c.get("index", 0)))
        answers = [c["prompt_logprobs"] for c in choices]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise wire.PayloadError(f"no `choices[].prompt_logprobs` in the answer: {response.text[:200]}") from err
    if len(answers) != len(lengths):
        raise wire.PayloadError(f"{len(answers)} choices for {len(lengths)} prompts")
    for n, answer in zip(lengths, answers):
        if not isinstance(answer, list) or len(answer) != n:
            got = len(answer) if isinstance(answer, list) else type(answer).__name__
            raise wire.PayloadError(f"prompt_logprobs of {got} entries for a prompt of {n} tokens")
    return answers


def _entry(entry, token: int, pos: int, limit: int, teacher) -> tuple[list[int], list[float]]:
    """(ids, log-probs) of one position, most likely first; its own token must be listed, at
    most ``limit`` (k + 1) entries, every id inside the teacher tokenizer's vocabulary."""
    if not isinstance(entry, dict) or not entry:
        raise wire.PayloadError(f"no prompt_logprobs at position {pos}: {entry!r}"[:300])
    try:
        pairs = sorted(((int(k), float(v["logprob"])) for k, v in entry.items()), key=lambda p: -p[1])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise wire.PayloadError(f"a malformed entry at position {pos}: {entry!r}"[:300]) from err
    if len(pairs) > limit:
        raise wire.PayloadError(f"{len(pairs)} log-probs at position {pos}, more than top-k + 1 = {limit}")
    ids = [i for i, _ in pairs]
    vocab_size = teacher.vocab_size
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise GoldConfigError(
            f"`{teacher.url_key}: {teacher.url}` answered token id {outside[0]}, outside the vocabulary "
            f"of {vocab_size} ids of `{teacher.model_key}: {teacher.model_id}`'s tokenizer: the server serves "
            f"another model or vocabulary. Serve the checkpoint `{teacher.model_key}` names."
        )
    if token not in ids:
        raise wire.PayloadError(
            f"the prompt's own token {token} is not listed at position {pos} (vLLM always lists it)"
        )
    return ids, [lp for _, lp in pairs]


def connect_prompt_logprobs_teacher(settings) -> PromptLogprobsTeacher:
    """The teacher of ``settings`` (``GoldSettings``) behind a vLLM server, checked."""
    from transformers import AutoConfig, AutoTokenizer

    teacher = settings.teacher
    config = AutoConfig.from_pretrained(teacher.model, revision=teacher.revision)
    tokenizer = AutoTokenizer.from_pretrained(teacher.tokenizer, revision=teacher.revision)
    server = settings.teacher_server
    remote = PromptLogprobsTeacher(
        server.url, config, len(tokenizer), top_k=server.top_k, model_id=teacher.model, **client_kwargs(server)
    )
    remote.check_server(tokenizer, settings.sequence_len)
    if settings.loss_temperature > 1.0:
        LOG.warning(
            "`loss_temperature: %g` with `teacher_server_mode: prompt_logprobs`: flattening moves most "
            "of both distributions' mass into the tail bucket, whose teacher share is then assumed "
            "uniform (benchmarks/bench_topk_tail.py: the loss error exceeds 90%% at 2.0); use 1.0 or "
            "below, or `teacher_server_mode: exact`", settings.loss_temperature,
        )
    return remote
