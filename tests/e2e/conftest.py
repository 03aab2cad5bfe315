"""A real ComfyUI server with the pack loaded, for the `server` tests (needs `COMFYUI_PATH`).

The server runs from a ComfyUI checkout outside the repo (`COMFYUI_PATH`, Python `COMFYUI_PYTHON` or this
interpreter) on a free loopback port, with every folder it writes to in a temporary directory: an
`extra_model_paths.yaml` adds a `custom_nodes` root holding a symlink to this repo named `bagel-vae-pp`, and
`vae` / `bagel` model folders (written once per session): a random-weight test VAE, and a tiny random BAGEL
checkpoint in the real layout whose `ae.safetensors` is that same VAE. Nothing in the ComfyUI checkout or the
repo is touched. Mirrors ComfyUI's own tests/execution fixture (../shared/notes/comfyui_host.md §6).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "bagel-vae-pp"
TEST_VAE_NAME = "bagel_vae_pp_e2e_ae.safetensors"
# ComfyUI's VAELoader builds the FLUX-layout VAE with fixed widths (ch=128, ch_mult 1,2,4,4: comfy/sd.py
# ~line 368) and refuses other widths with "size mismatch", so the test VAE must be full-size ("tiny" is not
# loadable by the core loader). Random weights, 84M parameters, ~335 MB in fp32.
TEST_VAE_SIZE = "flux"
# models/bagel/<name>: the tiny BAGEL (tools/make_tiny_bagel.py) with the test VAE above as ae.safetensors in
# bf16 (168 MB): the loader's VAE output must be one that core VAEDecode accepts.
TEST_BAGEL_NAME = "bagel_vae_pp_e2e_tiny"
READY_TIMEOUT_S = float(os.environ.get("BAGEL_E2E_READY_TIMEOUT_S", 240))
PROMPT_TIMEOUT_S = float(os.environ.get("BAGEL_E2E_PROMPT_TIMEOUT_S", 600))
WORKER_MODULE = "bagel_vae_pp.worker"
# Put in the server's environment, inherited by its workers, so we find *our* workers in /proc even after
# they were re-parented, and never confuse them with another session's pool.
TOKEN_VAR = "BAGEL_VAE_PP_E2E_TOKEN"


def pytest_configure(config):
    config.addinivalue_line("markers", "server: needs a real ComfyUI (COMFYUI_PATH); starts main.py --cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_test_models(vae_dir: Path, bagel_dir: Path) -> None:
    """A seeded random FLUX-layout `ae.safetensors` (`encoder.*` / `decoder.*`, fp32), as ComfyUI's VAELoader
    reads, in `vae_dir`; a tiny BAGEL checkpoint folder with the same VAE (bf16) in `bagel_dir`."""
    sys.path.insert(0, str(REPO))
    try:
        from bagel_vae_pp.autoencoder import random_autoencoder
        from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint
    finally:
        sys.path.remove(str(REPO))
    import torch
    from safetensors.torch import save_file

    model = random_autoencoder(TEST_VAE_SIZE, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(vae_dir / TEST_VAE_NAME))
    write_tiny_checkpoint(str(bagel_dir / TEST_BAGEL_NAME), seed=0, vae=model, vae_dtype=torch.bfloat16)


def read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


def proc_state(pid: int) -> str:
    stat = read_proc(pid, "stat").decode(errors="replace")
    return stat.rsplit(")", 1)[1].split()[0] if ")" in stat else ""


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> set[int]:
    """Live descendants of `root`, from /proc/*/stat parent ids."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        stat = read_proc(pid, "stat").decode(errors="replace")
        if ")" in stat:
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    return read_proc(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


@dataclass
class ComfyServer:
    """A running ComfyUI: its process, URL, log and temporary folders."""

    proc: subprocess.Popen
    port: int
    root: Path
    log_path: Path
    token: str
    input_dir: Path
    output_dir: Path
    vae_name: str
    worker_pids_seen: set[int] = field(default_factory=set)
    bagel_name: str = TEST_BAGEL_NAME
    pack_dir_name: str = PACK_DIR_NAME

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM the server (only the main process: the pack must clean up its own workers), then wait."""
        if self.is_alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def our_workers(self) -> set[int]:
        """Live (non-zombie) pool workers of this server: descendants, or any process carrying our token."""
        found = set()
        live_descendants = descendants(self.proc.pid) if self.is_alive() else set()
        for pid in all_pids():
            if WORKER_MODULE not in cmdline(pid) or proc_state(pid) in ("Z", "X", ""):
                continue
            if pid in live_descendants or f"{TOKEN_VAR}={self.token}".encode() in read_proc(pid, "environ"):
                found.add(pid)
        self.worker_pids_seen |= found
        return found

    # --- HTTP / websocket client ---

    def get_json(self, path: str, timeout_s: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
            return json.loads(response.read())

    def post_prompt(self, prompt: dict, client_id: str) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, JSON body) for 200 and 400 alike."""
        body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def post_json(self, path: str, payload: dict) -> int:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status

    def run_prompt(self, prompt: dict, timeout_s: float = PROMPT_TIMEOUT_S, on_event=None) -> PromptRun:
        """Submit an API graph and follow the websocket until `executing` with `node: null` for it.

        Args:
            prompt: an API-format graph.
            timeout_s: overall limit; the error carries the events so far and the server log tail.
            on_event: called as `on_event(run, message)` for each of this prompt's websocket messages.
        """
        import websocket  # websocket-client; imported here so that collection works without it

        client_id = str(uuid.uuid4())
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=5)
        try:
            status, body = self.post_prompt(prompt, client_id)
            run = PromptRun(http_status=status, response=body)
            if status != 200:
                return run
            run.prompt_id = body["prompt_id"]
            deadline = time.monotonic() + timeout_s
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"prompt {run.prompt_id} not done after {timeout_s:.0f} s; events {run.event_types()}\n"
                        f"--- server log tail ---\n{self.log_tail()}"
                    )
                if not self.is_alive():
                    raise RuntimeError(f"ComfyUI exited (rc {self.proc.returncode})\n{self.log_tail()}")
                try:
                    frame = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if not isinstance(frame, str):  # binary preview frames
                    continue
                message = json.loads(frame)
                data = message.get("data", {})
                if data.get("prompt_id") != run.prompt_id:
                    continue
                run.events.append(message)
                if on_event is not None:
                    on_event(run, message)
                if message["type"] == "executing" and data.get("node") is None:
                    break
        finally:
            ws.close()
        run.history = self.get_json(f"/history/{run.prompt_id}").get(run.prompt_id, {})
        return run


@dataclass
class PromptRun:
    """What one submitted prompt produced: the /prompt answer, its websocket events and /history entry."""

    http_status: int
    response: dict
    prompt_id: str | None = None
    events: list[dict] = field(default_factory=list)
    history: dict = field(default_factory=dict)

    def event_types(self) -> list[str]:
        return [event["type"] for event in self.events]

    def errors(self) -> list[dict]:
        return [event["data"] for event in self.events if event["type"] == "execution_error"]

    @property
    def status_str(self) -> str | None:
        return self.history.get("status", {}).get("status_str")

    def describe(self) -> str:
        """A readable account of a failed run, for assertion messages."""
        parts = [f"HTTP {self.http_status}: {json.dumps(self.response)[:2000]}"]
        for error in self.errors():
            parts.append(
                f"execution_error in node {error.get('node_id')} ({error.get('node_type')}): "
                f"{error.get('exception_type')}: {error.get('exception_message')}\n"
                + "".join(error.get("traceback", []))[-3000:]
            )
        if self.history:
            parts.append(f"history status: {json.dumps(self.history.get('status'))[:2000]}")
        return "\n".join(parts)


def wait_until_ready(server: ComfyServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.is_alive():
            pytest.fail(f"ComfyUI exited during start-up (rc {server.proc.returncode}):\n{server.log_tail()}")
        try:
            server.get_json("/object_info", timeout_s=30)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(1)
    pytest.fail(f"ComfyUI not ready after {READY_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def e2e_models(tmp_path_factory) -> dict[str, Path]:
    """The `vae` and `bagel` model folders, written once for all server modules, deleted after the session."""
    root = tmp_path_factory.mktemp("models")
    dirs = {"vae": root / "vae", "bagel": root / "bagel"}
    for path in dirs.values():
        path.mkdir()
    try:
        write_test_models(dirs["vae"], dirs["bagel"])
        yield dirs
    finally:  # pytest keeps the last few temp roots; the 500 MB of random weights need not stay with them
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory, request) -> ComfyServer:
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH is not set: point it at a Comfy-Org/ComfyUI checkout to run the server tests")
    comfy_path = Path(comfy_path).resolve()
    if not (comfy_path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={comfy_path} has no main.py; expected a Comfy-Org/ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable

    root = tmp_path_factory.mktemp("comfyui")
    dirs = {name: root / name for name in ("custom_nodes", "input", "output", "temp", "user")}
    for path in dirs.values():
        path.mkdir(parents=True)
    (dirs["custom_nodes"] / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
    models = request.getfixturevalue("e2e_models")  # after the COMFYUI_PATH check: no weights when skipped
    dirs.update({f"models/{name}": path for name, path in models.items()})
    yaml_path = root / "extra_model_paths.yaml"
    yaml_path.write_text(
        "bagel_vae_pp_e2e:\n"
        f"    custom_nodes: {dirs['custom_nodes']}\n"
        f"    vae: {dirs['models/vae']}\n"
        f"    bagel: {dirs['models/bagel']}\n"
    )

    port, token = free_port(), uuid.uuid4().hex
    log_path = root / "comfyui.log"
    command = [
        python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
        "--extra-model-paths-config", str(yaml_path),
        "--output-directory", str(dirs["output"]), "--temp-directory", str(dirs["temp"]),
        "--user-directory", str(dirs["user"]), "--input-directory", str(dirs["input"]),
    ]  # fmt: skip
    env = {**os.environ, TOKEN_VAR: token, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=comfy_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ComfyServer(
        proc=proc, port=port, root=root, log_path=log_path, token=token,
        input_dir=dirs["input"], output_dir=dirs["output"], vae_name=TEST_VAE_NAME,
    )  # fmt: skip
    try:
        wait_until_ready(server)
        yield server
    finally:
        server.stop()
        # Last resort for a failed run: end the workers this server started (by pid), after the tests looked.
        for pid in server.our_workers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
