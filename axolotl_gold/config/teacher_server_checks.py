"""Checks on the raw YAML of a run whose teacher runs in a server: one
(``teacher_server_url``) or several by name (``teacher_servers``, each row's
``teacher_column`` choosing one). What needs the teacher's weights here, or images, is
refused until it is wired."""

from __future__ import annotations

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.schema import setting
from axolotl_gold.config.sharding_checks import zero_stage

SERVER_COMMAND = "`python -m axolotl_gold.models.teacher_server`"


def validate_teacher_servers(data: dict) -> None:
    """``GoldConfigError`` naming the key to change for a teacher-server setting that
    cannot run; nothing when no server is set (and no server key either)."""
    url, servers = data.get("teacher_server_url"), data.get("teacher_servers")
    if url and servers is not None:
        raise GoldConfigError(
            "`teacher_server_url` and `teacher_servers` are both set: keep `teacher_server_url` "
            "for one teacher, or `teacher_servers` (name -> URL) for several, not both."
        )
    if servers is not None:
        _check_servers(data, servers)
        key = "teacher_servers"
    elif url:
        _check_url("teacher_server_url", url)
        key = "teacher_server_url"
    else:
        for needs in ("teacher_models", "teacher_column"):
            if data.get(needs) is not None:
                raise GoldConfigError(
                    f"`{needs}` is set but `teacher_servers` is not: it names the teachers of "
                    f"several teacher servers. Set `teacher_servers` (name -> URL) or remove `{needs}`."
                )
        if setting(data, "teacher_server_mode") != "exact":
            raise GoldConfigError(
                f"`teacher_server_mode: {data['teacher_server_mode']}` needs `teacher_server_url` (the "
                "server's address, e.g. `http://10.0.0.5:8000` for `vllm serve`)."
            )
        return
    _check_common(data, key)


def _check_url(key: str, url) -> None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise GoldConfigError(
            f"`{key}: {url}` must be an http(s) URL, e.g. `http://10.0.0.5:8012` "
            f"(where {SERVER_COMMAND} listens)."
        )


def _check_servers(data: dict, servers) -> None:
    if not isinstance(servers, dict) or not servers:
        raise GoldConfigError(
            f"`teacher_servers: {servers}` must map each teacher's name to its server's URL, e.g. "
            "`{math: http://10.0.0.5:8012, code: http://10.0.0.6:8012}`; for one teacher set "
            "`teacher_server_url` instead."
        )
    for name, url in servers.items():
        _check_url(f"teacher_servers.{name}", url)
    models = data.get("teacher_models")
    if models is not None:
        if not isinstance(models, dict):
            raise GoldConfigError(f"`teacher_models` must map teacher names to checkpoints, got {models!r}.")
        unknown = [n for n in models if n not in servers]
        if unknown:
            raise GoldConfigError(
                f"`teacher_models` names {unknown}, which `teacher_servers` does not "
                f"({sorted(servers)}): use the names of `teacher_servers`."
            )
    column = setting(data, "teacher_column")
    if not isinstance(column, str) or not column:
        raise GoldConfigError(f"`teacher_column: {column!r}` must name a dataset column.")
    if data.get("use_uld_loss"):
        raise GoldConfigError(
            "`teacher_servers` with `use_uld_loss` is not supported yet: use one teacher "
            "(`teacher_server_url`) for cross-tokenizer distillation, or remove `use_uld_loss`."
        )


def _check_common(data: dict, key: str) -> None:
    if float(setting(data, "teacher_server_timeout")) <= 0:
        raise GoldConfigError("`teacher_server_timeout` must be > 0 (seconds per request).")
    if int(setting(data, "teacher_server_retries")) < 1:
        raise GoldConfigError("`teacher_server_retries` must be >= 1 (tries per request).")
    refused = [
        (data.get("seq_kd"), "`seq_kd: true` samples completions from the teacher, which the "
         "teacher server does not serve yet: set `seq_kd: false`"),
        (zero_stage(data.get("deepspeed")) == 3, "DeepSpeed ZeRO-3 (`deepspeed`) is not wired with "
         "a teacher server yet: use ZeRO-1/2 or DDP"),
        (data.get("fsdp") or data.get("fsdp_config") or data.get("fsdp_version"), "FSDP "
         "(`fsdp_config` / `fsdp_version`) is not wired with a teacher server yet: use DDP"),
        (data.get("processor_type"), "vision-language students (`processor_type`) are not served: "
         "the teacher server takes token ids only"),
        (data.get("gold_teacher_replicate"), "`gold_teacher_replicate` places a local teacher: "
         "remove it"),
    ]
    for wrong, why in refused:
        if wrong:
            raise GoldConfigError(f"`{key}` is set, but {why} (or remove `{key}`).")
    mode = setting(data, "teacher_server_mode")
    if mode not in ("exact", "prompt_logprobs"):
        raise GoldConfigError(
            f"`teacher_server_mode: {mode}` is not a mode: `exact` (our teacher server, full "
            "vocabulary) or `prompt_logprobs` (a vLLM OpenAI-compatible server, top-k + tail)."
        )
    if mode == "prompt_logprobs":
        if int(setting(data, "teacher_server_top_k")) < 1:
            raise GoldConfigError("`teacher_server_top_k` must be >= 1 (top-k ids per scored position).")
        if data.get("use_uld_loss"):
            raise GoldConfigError(
                "`teacher_server_mode: prompt_logprobs` gives the teacher's top-k only, and "
                "`use_uld_loss` (ULD sorts the teacher's full distribution) needs all of it: use "
                "`teacher_server_mode: exact` (our teacher server) for another tokenizer."
            )
