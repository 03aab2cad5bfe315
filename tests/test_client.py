"""The headless client against a fake ComfyUI on loopback: overrides, upload, websocket events, outputs, errors."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bagel_vae_pp import client

PROMPT_ID = "p-123"
BAGEL_T2I = {
    "1": {"class_type": "BagelVAEPP_LoadBagel", "inputs": {"model": "BAGEL-7B-MoT", "dtype": "bf16"}},
    "2": {
        "class_type": "BagelVAEPP_TextToImage",
        "inputs": {"bagel_model": ["1", 0], "prompt": "a cat", "seed": 0, "steps": 50},
        "_meta": {"title": "BAGEL Text to Image"},
    },
    "3": {
        "class_type": "BagelVAEPP_DistributedDecode",
        "inputs": {"samples": ["2", 0], "vae": ["1", 1], "mode": "exact"},
    },
    "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bagel"}},
}
CORE_SAMPLER = {
    "1": {"class_type": "CLIPTextEncode", "inputs": {"text": "old positive", "clip": ["9", 1]}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "old negative", "clip": ["9", 1]}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "positive": ["1", 0], "negative": ["2", 0]}},
}
PNG_BYTES = b"\x89PNG\r\n\x1a\nfake image"

RFC6455_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # written out: the server side checks the client's own constant


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked server-to-client frame, with 7-, 16- or 64-bit length."""
    first, n = (0x80 if fin else 0) | opcode, len(payload)
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def read_client_frame(rfile) -> tuple[int, bytes]:
    """One masked client-to-server frame: (opcode, unmasked payload)."""
    first, second = rfile.read(2)
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", rfile.read(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", rfile.read(8))
    mask = rfile.read(4)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(rfile.read(n)))


def event(kind: str, **data) -> bytes:
    return server_frame(0x1, json.dumps({"type": kind, "data": data}).encode())


def success_events() -> list[bytes]:
    """What ComfyUI sends for a prompt: another prompt's event, a preview, a ping, fragments, progress."""
    text = json.dumps({"type": "executing", "data": {"node": "3", "prompt_id": PROMPT_ID}}).encode()
    events = [
        event("status", status={"exec_info": {"queue_remaining": 1}}),
        event("executing", node="9", prompt_id="someone-else"),
        event("execution_start", prompt_id=PROMPT_ID),
        event("execution_cached", nodes=["1"], prompt_id=PROMPT_ID),
        event("executing", node="2", prompt_id=PROMPT_ID),
        server_frame(0x9, b"ping?"),
        server_frame(0x2, b"\x00\x00\x00\x01" + b"\xff" * 70_000),  # a preview image: 64-bit length
        *[event("progress", value=v, max=10, node="2", prompt_id=PROMPT_ID) for v in range(1, 11)],
        server_frame(0x1, text[:10], fin=False),  # one message in three fragments
        server_frame(0x0, text[10:20], fin=False),
        server_frame(0x0, text[20:]),
        event("progress", value=100, max=100, node="3", prompt_id=PROMPT_ID, padding="x" * 300),  # 16-bit length
        event("executed", node="5", output={"images": []}, prompt_id=PROMPT_ID),
        event("executing", node=None, prompt_id=PROMPT_ID),
    ]
    return events


class FakeComfy:
    """A loopback HTTP + websocket server that answers like ComfyUI for one prompt."""

    def __init__(self):
        self.posted: list[dict] = []
        self.uploads: list[bytes] = []
        self.pongs: list[bytes] = []
        self.submitted = threading.Event()
        self.events = success_events()
        self.reject: dict | None = None
        self.history = {
            PROMPT_ID: {
                "status": {"status_str": "success", "completed": True, "messages": []},
                "outputs": {"5": {"images": [{"filename": "bagel_00001_.png", "subfolder": "run", "type": "output"}]}},
            }
        }
        self.files = {"bagel_00001_.png": PNG_BYTES}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: bytes, kind: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/prompt":
                    fake.posted.append(json.loads(body))
                    if fake.reject is not None:
                        return self.reply(400, json.dumps(fake.reject).encode())
                    fake.submitted.set()
                    answer = {"prompt_id": PROMPT_ID, "number": 0, "node_errors": {}}
                    return self.reply(200, json.dumps(answer).encode())
                if self.path == "/upload/image":
                    assert self.headers["Content-Type"].startswith("multipart/form-data; boundary=")
                    fake.uploads.append(body)
                    return self.reply(200, json.dumps({"name": "up.png", "subfolder": "", "type": "input"}).encode())
                self.reply(404, b"{}")

            def do_GET(self):
                if self.path.startswith("/ws?clientId="):
                    return self.websocket()
                if self.path.startswith("/history/"):
                    return self.reply(200, json.dumps(fake.history).encode())
                if self.path.startswith("/view?"):
                    assert "subfolder=run" in self.path and "type=output" in self.path, self.path
                    name = self.path.split("filename=")[1].split("&")[0]
                    return self.reply(200, fake.files[name], "image/png")
                self.reply(404, b"{}")

            def websocket(self):
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1((key + RFC6455_GUID).encode()).digest()).decode()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.close_connection = True
                if not fake.submitted.wait(10):
                    return
                for frame in fake.events:
                    self.wfile.write(frame)
                    self.wfile.flush()
                    if frame[0] & 0x0F == 0x9:  # the client must answer a ping with a pong
                        opcode, payload = read_client_frame(self.rfile)
                        if opcode == 0xA:
                            fake.pongs.append(payload)
                try:  # hold the connection until the client closes it
                    while read_client_frame(self.rfile)[0] != 0x8:
                        pass
                except (ValueError, OSError):
                    pass

        return Handler


@pytest.fixture
def fake():
    server = FakeComfy()
    yield server
    server.close()


@pytest.fixture
def workflow(tmp_path):
    def write(prompt: dict) -> str:
        path = tmp_path / "workflow.json"
        path.write_text(json.dumps(prompt))
        return str(path)

    return write


class TestRun:
    """A whole run: overrides and upload reach /prompt, events become progress lines, outputs land in --out."""

    def test_runs_and_saves_outputs(self, fake, workflow, tmp_path, capsys):
        image = tmp_path / "in.png"
        image.write_bytes(PNG_BYTES)
        out = tmp_path / "out"
        args = [workflow(BAGEL_T2I), "--server", fake.url + "/", "--out", str(out), "--prompt", "a red fox"]
        args += ["--seed", "42", "--image", str(image), "--set", "BAGEL Text to Image.steps=12"]
        args += ["--set", "1.dtype=fp32", "--set", "BagelVAEPP_DistributedDecode.mode=tiled"]
        assert client.main(args) == 0
        (posted,) = fake.posted
        graph = posted["prompt"]
        assert graph["2"]["inputs"] == {"bagel_model": ["1", 0], "prompt": "a red fox", "seed": 42, "steps": 12}
        assert graph["1"]["inputs"]["dtype"] == "fp32" and graph["3"]["inputs"]["mode"] == "tiled"
        assert graph["4"]["inputs"]["image"] == "up.png"
        assert posted["client_id"]
        (upload,) = fake.uploads
        assert b'name="image"; filename="in.png"' in upload and PNG_BYTES in upload
        assert (out / "run" / "bagel_00001_.png").read_bytes() == PNG_BYTES
        assert fake.pongs == [b"ping?"]
        lines = capsys.readouterr().out.splitlines()
        assert "cached: node 1 (BagelVAEPP_LoadBagel)" in lines
        assert "running node 2 (BAGEL Text to Image)" in lines
        assert "running node 9 (?)" not in lines  # another client's prompt
        progress = [line.strip() for line in lines if line.startswith("  node 2")]
        assert progress[0] == "node 2 (BAGEL Text to Image): 1/10" and progress[-1].endswith(": 10/10")
        assert "running node 3 (BagelVAEPP_DistributedDecode)" in lines  # the fragmented message
        assert f"saved {out / 'run' / 'bagel_00001_.png'}" in lines

    def test_execution_error_exits_1_naming_the_node(self, fake, workflow, tmp_path, capsys):
        fake.events = [
            event("executing", node="3", prompt_id=PROMPT_ID),
            event("execution_error", node_id="3", node_type="BagelVAEPP_DistributedDecode", prompt_id=PROMPT_ID,
                  exception_type="WorkerError", exception_message="worker 1 died"),
        ]  # fmt: skip
        assert client.main([workflow(BAGEL_T2I), "--server", fake.url, "--out", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert "node 3 (BagelVAEPP_DistributedDecode) failed: WorkerError: worker 1 died" in err

    def test_no_end_before_timeout_exits_1(self, fake, workflow, tmp_path, capsys):
        fake.events = [event("executing", node="2", prompt_id=PROMPT_ID)]
        assert client.main([workflow(BAGEL_T2I), "--server", fake.url, "--timeout", "0.5"]) == 1
        assert "not finished within the timeout" in capsys.readouterr().err


class TestRejected:
    """HTTP 400 validation errors come out readable, with exit status 2."""

    def test_node_errors_are_listed(self, fake, workflow, capsys):
        fake.reject = {
            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}},
            "node_errors": {"3": {"class_type": "BagelVAEPP_DistributedDecode", "dependent_outputs": ["5"],
                                  "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                              "details": "mode: 'fast' not in ['exact', 'tiled']",
                                              "extra_info": {}}]}},
        }  # fmt: skip
        assert client.main([workflow(BAGEL_T2I), "--server", fake.url, "--set", "3.mode=fast"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "prompt refused: Prompt outputs failed validation"
        assert err[1].strip() == "node 3 (BagelVAEPP_DistributedDecode):"
        assert err[2].strip() == "- Value not in list: mode: 'fast' not in ['exact', 'tiled']"

    def test_ui_format_is_refused_before_sending(self, fake, workflow, capsys):
        assert client.main([workflow({"nodes": [], "links": []}), "--server", fake.url]) == 2
        assert "UI-format" in capsys.readouterr().err and not fake.posted

    def test_unreachable_server_exits_1(self, workflow, capsys):
        fake = FakeComfy()
        url = fake.url
        fake.close()
        assert client.main([workflow(BAGEL_T2I), "--server", url]) == 1
        assert "cannot reach ComfyUI" in capsys.readouterr().err


class TestOverrides:
    """--set, --prompt, --seed and --image edit the right inputs or say why they cannot."""

    def test_set_parses_json_else_keeps_text(self):
        prompt = json.loads(json.dumps(BAGEL_T2I))
        client.apply_set(prompt, "2.steps=30")
        client.apply_set(prompt, "2.prompt=a cat = a dog")
        client.apply_set(prompt, "BagelVAEPP_LoadBagel.model=0,1")
        assert prompt["2"]["inputs"]["steps"] == 30 and prompt["2"]["inputs"]["prompt"] == "a cat = a dog"
        assert prompt["1"]["inputs"]["model"] == "0,1"

    @pytest.mark.parametrize(
        ("assignment", "message"),
        [
            ("2.stepz=3", "node 2 (BagelVAEPP_TextToImage) has no input 'stepz'; its inputs are ['bagel_model',"),
            ("7.steps=3", "no node '7' in the workflow; its nodes are 1 (BagelVAEPP_LoadBagel), "),
            ("steps=3", "expected NODE.INPUT=VALUE"),
            ("2.steps", "expected NODE.INPUT=VALUE"),
        ],
    )
    def test_set_errors_name_what_exists(self, assignment, message):
        with pytest.raises(client.RejectedError) as error:
            client.apply_set(json.loads(json.dumps(BAGEL_T2I)), assignment)
        assert message in str(error.value)

    def test_prompt_and_seed_fall_back_to_the_core_sampler(self):
        prompt = json.loads(json.dumps(CORE_SAMPLER))
        assert client.set_prompt_text(prompt, "a lighthouse") == ["1"]
        assert client.set_seed(prompt, 5) == ["3"]
        assert prompt["1"]["inputs"]["text"] == "a lighthouse" and prompt["2"]["inputs"]["text"] == "old negative"
        assert prompt["3"]["inputs"]["seed"] == 5

    def test_image_needs_exactly_one_load_image(self):
        prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "a"}}}
        prompt["2"] = prompt["1"]
        with pytest.raises(client.RejectedError, match="2 LoadImage nodes"):
            client.set_image(prompt, "up.png")

    def test_no_seed_input_is_an_error(self):
        with pytest.raises(client.RejectedError, match="no node with a seed"):
            client.set_seed({"1": {"class_type": "VAELoader", "inputs": {}}}, 1)


def test_saved_workflows_accept_the_documented_overrides():
    """The README's client examples apply to the shipped API workflows without an override error."""
    api = Path(__file__).resolve().parents[1] / "workflows" / "api"
    for path in sorted(api.glob("*.json")):
        prompt = json.loads(path.read_text())
        if any(node["class_type"] in client.SEED_INPUTS for node in prompt.values()):
            client.set_seed(prompt, 1)
        if any(node["class_type"] == "LoadImage" for node in prompt.values()):
            client.set_image(prompt, "up.png")
