"""A server started in a subprocess on loopback for a test module, shared by the tests
that run one (the vLLM rollout server, vLLM's OpenAI server as a teacher)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server subprocess; kill it if it has not exited after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def served(cmd: list[str], log_path, ready_path: str, seconds: float, port: int, **env_extra):
    """Run ``cmd`` (listening on ``port``) with its output in ``log_path``; yield its URL once
    ``GET ready_path`` answers, stop it afterwards. Distributed variables are not passed on."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU build otherwise takes most of RAM
    env.update(env_extra)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + seconds
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[2]} exited: see {log_path}")
                if time.time() > deadline:
                    raise RuntimeError(f"{cmd[2]} did not start in {seconds:g} s: see {log_path}")
                try:
                    if requests.get(url + ready_path, timeout=2).ok:
                        break
                except requests.RequestException:
                    time.sleep(1)
            yield url
        finally:
            stop(proc)
