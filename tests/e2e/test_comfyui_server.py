"""End-to-end: the pack inside a real ComfyUI server (`COMFYUI_PATH`), driven over HTTP and the websocket.

One server per module (see conftest.py). The tests run in file order and the last one stops the server:
the pack loads, lists its nodes, runs the saved round-trip workflow on two CPU workers (and matches core
VAEEncode/VAEDecode), stops on Cancel and then returns each job's own pixels, rejects bad inputs readably,
and leaves no worker behind once ComfyUI is gone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import SERVER_MARKS, node_id, run_ok, saved_images, write_png
from roundtrip import (
    DEVICES,
    ROUNDTRIP,
    assert_decodes_match_core,
    checked_roundtrip_prompt,
    core_roundtrip_prompt,
    roundtrip_prompt,
)

pytestmark = SERVER_MARKS

REPO = Path(__file__).resolve().parents[2]
WORKER_MODULE = "bagel_vae_pp.worker"
OUR_NODES = ("BagelVAEPP_WorkerPool", "BagelVAEPP_DistributedDecode", "BagelVAEPP_DistributedEncode")
# Frontend-only widgets that follow an input with these options (see tests/test_workflows.py).
UI_ONLY_WIDGET_FLAGS = ("control_after_generate", "image_upload")


def widget_names(spec: dict) -> list[str | None]:
    """Widget order as the frontend builds it from an /object_info entry (None = frontend-only widget)."""
    names = []
    for section in ("required", "optional"):
        for name in spec.get("input_order", {}).get(section, []):
            kind, opts = (spec["input"][section][name] + [{}])[:2]
            widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            if widget and not opts.get("forceInput"):
                names.append(name)
                names.extend(None for flag in UI_ONLY_WIDGET_FLAGS if opts.get(flag))
    return names


class TestPackLoads:
    """ComfyUI imports the pack cleanly and serves its node definitions."""

    def test_no_import_error(self, comfy_server):
        bad = [
            line
            for line in comfy_server.log().splitlines()
            if ("IMPORT FAILED" in line or "Cannot import" in line) and comfy_server.pack_dir_name in line
        ]
        assert not bad, "\n".join(bad) + "\n--- log tail ---\n" + comfy_server.log_tail(120)
        # The import-time summary lists every custom node root it loaded.
        assert re.search(rf"seconds: .*{re.escape(comfy_server.pack_dir_name)}\s*$", comfy_server.log(), re.M), (
            f"{comfy_server.pack_dir_name} not in the custom-node import summary\n{comfy_server.log_tail(120)}"
        )

    def test_object_info_lists_nodes(self, comfy_server):
        info = comfy_server.get_json("/object_info")
        missing = [node for node in OUR_NODES if node not in info]
        assert not missing, f"/object_info lacks {missing}; pack-related ids: {[k for k in info if 'Bagel' in k]}"
        assert info["BagelVAEPP_WorkerPool"]["output"][0] == "VAE_POOL"
        assert info["BagelVAEPP_DistributedDecode"]["output"][0] == "IMAGE"
        assert info["BagelVAEPP_DistributedEncode"]["output"][0] == "LATENT"

    def test_test_vae_is_listed(self, comfy_server):
        combo = comfy_server.get_json("/object_info/VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
        assert comfy_server.vae_name in combo, combo

    def test_saved_workflows_match_live_nodes(self, comfy_server):
        """Every saved UI workflow's widgets_values line up with the widgets the live server declares."""
        info = comfy_server.get_json("/object_info")
        for ui_path in sorted((REPO / "workflows").glob("*.json")):
            ui = json.loads(ui_path.read_text())
            for node in ui["nodes"]:
                if node["type"] not in info:
                    continue  # frontend-only (notes) or from another pack
                names = widget_names(info[node["type"]])
                assert len(node.get("widgets_values", [])) == len(names), (
                    f"{ui_path.name} node {node['id']} ({node['type']}): widgets_values "
                    f"{node.get('widgets_values')} but the server declares widgets {names}"
                )


class TestRoundTrip:
    """The saved workflow runs: LoadImage → Distributed Encode → Distributed Decode → SaveImage."""

    @pytest.mark.parametrize(("width", "height"), [(96, 64), (100, 70)], ids=["96x64", "100x70-cropped"])
    def test_roundtrip_workflow(self, comfy_server, width, height):
        image_name = f"e2e_{width}x{height}.png"
        write_png(comfy_server.input_dir / image_name, width, height)
        run = run_ok(comfy_server, roundtrip_prompt(comfy_server, image_name, f"e2e/roundtrip_{width}x{height}"))
        (path,) = saved_images(comfy_server, run)
        assert path.is_file(), f"{path} not on disk; history outputs {run.history.get('outputs')}"
        from PIL import Image

        # Sides are cropped to multiples of 8, like core VAEEncode.
        assert Image.open(path).size == (width // 8 * 8, height // 8 * 8)
        assert comfy_server.our_workers(), f"no `{WORKER_MODULE}` process runs under the server after a pool job"

    def test_exact_mode_matches_core_vae(self, comfy_server):
        """Exact mode on 2 workers gives what core VAEEncode + VAEDecode give (PNG values, ±2/255)."""
        import numpy as np
        from PIL import Image

        image_name = "e2e_match_core.png"
        write_png(comfy_server.input_dir / image_name, 128, 72)
        ours = run_ok(comfy_server, roundtrip_prompt(comfy_server, image_name, "e2e/match_ours"))
        core = run_ok(comfy_server, core_roundtrip_prompt(comfy_server, image_name, "e2e/match_core"))
        (ours_path,), (core_path,) = saved_images(comfy_server, ours), saved_images(comfy_server, core)
        a = np.asarray(Image.open(ours_path), dtype=np.int16)
        b = np.asarray(Image.open(core_path), dtype=np.int16)
        assert a.shape == b.shape
        diff = np.abs(a - b)
        assert diff.max() <= 2, f"max |ours - core| = {diff.max()}/255, mean {diff.mean():.3f}"


class TestInterrupt:
    """Cancel (POST /interrupt) stops a distributed job inside the running node, not at the next node."""

    DELAY_S = 3.0  # after the encode node starts: the pool is up and a job is running
    STOP_WITHIN_S = 30.0

    def test_interrupt_stops_running_job(self, comfy_server):
        image_name = "e2e_interrupt_1024.png"
        write_png(comfy_server.input_dir / image_name, 1024, 1024)
        prompt = roundtrip_prompt(comfy_server, image_name, "e2e/interrupted")
        ours = {i for i, node in prompt.items() if node["class_type"].startswith("BagelVAEPP_Distributed")}
        (encode_id,) = [i for i in ours if prompt[i]["class_type"] == "BagelVAEPP_DistributedEncode"]
        state = {}

        def interrupt():
            state["node_at_interrupt"] = state["executing"]
            state["sent_at"] = time.monotonic()
            comfy_server.post_json("/interrupt", {})

        def on_event(run, message):
            if message["type"] == "executing":
                state["executing"] = message["data"].get("node")
                if state["executing"] == encode_id and "timer" not in state:
                    state["timer"] = threading.Timer(self.DELAY_S, interrupt)
                    state["timer"].start()

        run = comfy_server.run_prompt(prompt, on_event=on_event)
        done = time.monotonic()
        if "timer" in state:
            state["timer"].cancel()
        assert "timer" in state, f"the encode node never started executing: {run.describe()}"
        if state.get("node_at_interrupt") not in ours:
            pytest.skip(f"no distributed node was running {self.DELAY_S} s after the encode started")
        interrupted = [e["data"] for e in run.events if e["type"] == "execution_interrupted"]
        assert interrupted, run.describe()
        # ComfyUI itself checks the flag between nodes; only the pack can stop the node that was running.
        assert interrupted[0]["node_id"] == state["node_at_interrupt"], (
            f"interrupt sent while node {state['node_at_interrupt']} ran, but it took effect at node "
            f"{interrupted[0]['node_id']}: the running job ignored it"
        )
        assert done - state["sent_at"] < self.STOP_WITHIN_S, f"took {done - state['sent_at']:.1f} s to stop"

    # Small images, a few of them: an encode layer takes ~10 ms on 2 CPU workers, the whole job about a second.
    CANCEL_SIZE, CANCEL_BATCH, OTHER_SIZE = (64, 64), 4, (96, 48)
    CANCEL_ROUNDS = 2

    def cancel_encode(self, comfy_server, image_name: str, prefix: str) -> None:
        """Run the round trip and press Cancel on the encode node's first progress message."""
        prompt, _, _ = checked_roundtrip_prompt(comfy_server, image_name, prefix, self.CANCEL_BATCH)
        encode = node_id(prompt, "BagelVAEPP_DistributedEncode")
        sent = []

        def on_event(run, message):
            if message["type"] == "progress" and message["data"]["node"] == encode and not sent:
                sent.append(message["data"]["value"])
                comfy_server.post_json("/interrupt", {})

        run = comfy_server.run_prompt(prompt, on_event=on_event)
        assert sent, f"the encode node sent no progress: {run.describe()}"
        interrupted = [e["data"] for e in run.events if e["type"] == "execution_interrupted"]
        assert interrupted and interrupted[0]["node_id"] == encode, (
            f"Cancel sent during the encode job (at progress {sent[0]}) but not stopped there: {run.describe()}"
        )

    def test_jobs_after_cancel_match_core(self, comfy_server):
        """After a Cancel, the next jobs (the same shape, another shape) return their own pixels: core
        VAEDecode's of the same latent, within 1/255. A pool that leaves the cancelled job's workers running
        hands its replies to the next job, which then returns too early with another job's pixels.

        The Cancel arrives on the encode's first progress message, while the pool polls its workers: every
        50 ms it advances ComfyUI's ProgressBar if a layer finished, then checks the interrupt. The real
        progress hook (main.py) raises the interrupt from inside ProgressBar.update_absolute, so with layers
        shorter than a poll most Cancels reach the pool that way, from its progress callback (9 of 10 measured
        on 2 busy cores); two rounds make it near certain that one does.
        """
        for round_ in range(self.CANCEL_ROUNDS):
            names = [f"e2e_cancel_{round_}_{what}.png" for what in ("cancelled", "same", "other")]
            sizes = [self.CANCEL_SIZE, self.CANCEL_SIZE, self.OTHER_SIZE]
            for variant, (name, (w, h)) in enumerate(zip(names, sizes, strict=True)):
                write_png(comfy_server.input_dir / name, w, h, variant=3 * round_ + variant)
            self.cancel_encode(comfy_server, names[0], f"e2e/cancelled_{round_}")
            for name, batch, what in [(names[1], self.CANCEL_BATCH, "same shape"), (names[2], 1, "other shape")]:
                prompt, ours, core = checked_roundtrip_prompt(comfy_server, name, f"e2e/after_cancel_{round_}", batch)
                run = run_ok(comfy_server, prompt)
                assert_decodes_match_core(comfy_server, run, ours, core, batch, f"round {round_}, {what} after Cancel")


class TestBadInputs:
    """A bad input is refused with a message that names it; the server keeps serving."""

    @staticmethod
    def image(server) -> str:
        write_png(server.input_dir / "e2e_bad_inputs.png", 96, 64)
        return "e2e_bad_inputs.png"

    def test_unknown_vae_name(self, comfy_server):
        prompt = roundtrip_prompt(comfy_server, self.image(comfy_server), "e2e/bad_vae")
        (vae_id,) = [node_id for node_id, node in prompt.items() if node["class_type"] == "VAELoader"]
        prompt[vae_id]["inputs"]["vae_name"] = "no_such_vae.safetensors"
        run = comfy_server.run_prompt(prompt)
        assert run.http_status == 400, run.describe()
        errors = run.response["node_errors"][vae_id]["errors"]
        assert any("no_such_vae.safetensors" in json.dumps(e) for e in errors), errors

    def test_bad_devices(self, comfy_server):
        prompt = roundtrip_prompt(comfy_server, self.image(comfy_server), "e2e/bad_devices")
        (pool_id,) = [node_id for node_id, node in prompt.items() if node["class_type"] == "BagelVAEPP_WorkerPool"]
        prompt[pool_id]["inputs"]["devices"] = "7,7"
        run = comfy_server.run_prompt(prompt, timeout_s=300)
        if run.http_status == 400:  # refused by VALIDATE_INPUTS
            assert pool_id in run.response["node_errors"], run.describe()
            message = json.dumps(run.response["node_errors"][pool_id]["errors"])
        else:  # refused when the node runs
            assert run.status_str == "error", run.describe()
            (error,) = run.errors()
            assert error["node_id"] == pool_id or error["node_type"].startswith("BagelVAEPP_"), run.describe()
            message = error["exception_message"]
            assert "Traceback" not in message and len(message) < 2000, message
        assert "devices" in message and "7" in message, f"message does not name the input and value: {message}"

    def test_out_of_range_timeout(self, comfy_server):
        """ComfyUI's own min/max check still applies to timeout_s (min 5)."""
        prompt = roundtrip_prompt(comfy_server, self.image(comfy_server), "e2e/bad_timeout")
        (pool_id,) = [node_id for node_id, node in prompt.items() if node["class_type"] == "BagelVAEPP_WorkerPool"]
        prompt[pool_id]["inputs"]["timeout_s"] = 1
        run = comfy_server.run_prompt(prompt, timeout_s=300)
        assert run.http_status == 400, f"timeout_s=1 (min 5) was accepted: {run.describe()}"
        assert "timeout_s" in json.dumps(run.response["node_errors"].get(pool_id)), run.describe()

    def test_server_still_serves(self, comfy_server):
        """After the refused prompts and the interrupted jobs, the pool runs a job again, with its own pixels."""
        image_name = "e2e_after_errors.png"
        write_png(comfy_server.input_dir / image_name, 64, 64)
        prompt, ours, core = checked_roundtrip_prompt(comfy_server, image_name, "e2e/after_errors")
        run = run_ok(comfy_server, prompt)
        assert_decodes_match_core(comfy_server, run, ours, core, 1, "after the refused and interrupted prompts")


class TestProgressAndStatus:
    """The distributed nodes report progress over the websocket; GET /bagel_vae_pp/status shows the pool."""

    def test_decode_sends_progress(self, comfy_server):
        write_png(comfy_server.input_dir / "e2e_progress.png", 96, 64)
        prompt = roundtrip_prompt(comfy_server, "e2e_progress.png", "e2e/progress")
        (decode_id,) = [i for i, node in prompt.items() if node["class_type"] == "BagelVAEPP_DistributedDecode"]
        run = run_ok(comfy_server, prompt)
        progress = [e["data"] for e in run.events if e["type"] == "progress" and e["data"]["node"] == decode_id]
        assert progress, f"no progress message for the decode node {decode_id}; events {run.event_types()}"
        assert progress[-1]["value"] == progress[-1]["max"], progress

    def test_status_route_lists_running_workers(self, comfy_server):
        if not comfy_server.our_workers():
            write_png(comfy_server.input_dir / "e2e_status.png", 64, 64)
            run_ok(comfy_server, roundtrip_prompt(comfy_server, "e2e_status.png", "e2e/status"))
        for path in ("/bagel_vae_pp/status", "/api/bagel_vae_pp/status"):
            status = comfy_server.get_json(path)
            assert status["host_pid"] == comfy_server.proc.pid, status
            running = [pool for pool in status["pools"] if pool["running"]]
            assert any(pool["devices"] == ["cpu", "cpu"] and pool["dtype"] == "fp32" for pool in running), status
            pids = {pid for pool in running for pid in pool["worker_pids"]}
            assert pids == comfy_server.our_workers(), f"{path}: {status}"


class TestClient:
    """`python -m bagel_vae_pp.client` drives the real server: upload, overrides, progress, outputs, refusals."""

    @staticmethod
    def client(comfy_server, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bagel_vae_pp.client", str(ROUNDTRIP), "--server", comfy_server.url]
        command += ["--set", f"VAELoader.vae_name={comfy_server.vae_name}", "--set", f"3.devices={DEVICES}", *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)

    def test_runs_the_saved_workflow(self, comfy_server, tmp_path):
        image = tmp_path / "client_in.png"
        write_png(image, 96, 64)
        out = tmp_path / "out"
        done = self.client(comfy_server, "--image", str(image), "--set", "SaveImage.filename_prefix=e2e/client",
                           "--out", str(out), "--timeout", "600")  # fmt: skip
        assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        (saved,) = out.rglob("*.png")
        from PIL import Image

        assert Image.open(saved).size == (96, 64)
        assert "running node 5 (Distributed VAE Decode)" in done.stdout, done.stdout
        assert re.search(r"node 5 \(Distributed VAE Decode\): (\d+)/\1", done.stdout), done.stdout

    def test_validation_error_is_readable(self, comfy_server, tmp_path):
        write_png(comfy_server.input_dir / "e2e_client_bad.png", 64, 64)
        done = self.client(comfy_server, "--set", "1.image=e2e_client_bad.png", "--set", "4.mode=fast")
        assert done.returncode == 2, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        assert "node 4 (BagelVAEPP_DistributedEncode, Distributed VAE Encode):" in done.stderr, done.stderr
        assert "fast" in done.stderr and "exact" in done.stderr, done.stderr


class TestQueueAndFree:
    """Two prompts queued at once both finish; "Free model and node cache" stops the pool until the next prompt."""

    @staticmethod
    def wait_for(condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"{what} not after {timeout_s:.0f} s"
            time.sleep(0.5)

    def test_two_prompts_back_to_back(self, comfy_server):
        image_name = "e2e_queue.png"
        write_png(comfy_server.input_dir / image_name, 64, 48)
        ids = []
        for prefix in ("e2e/queue_a", "e2e/queue_b"):
            status, body = comfy_server.post_prompt(roundtrip_prompt(comfy_server, image_name, prefix), "e2e-queue")
            assert status == 200, body
            ids.append(body["prompt_id"])

        def history(prompt_id):
            return comfy_server.get_json(f"/history/{prompt_id}").get(prompt_id, {}).get("status", {})

        self.wait_for(lambda: all(history(i).get("completed") is not None for i in ids), 600, "both prompts done")
        assert [history(i).get("status_str") for i in ids] == ["success", "success"], comfy_server.log_tail()

    def test_free_stops_the_workers_and_the_next_prompt_starts_them(self, comfy_server):
        image_name = "e2e_free.png"
        write_png(comfy_server.input_dir / image_name, 64, 64)
        if not comfy_server.our_workers():
            run_ok(comfy_server, roundtrip_prompt(comfy_server, image_name, "e2e/before_free"))
        before = comfy_server.our_workers()
        assert before
        assert comfy_server.post_json("/free", {"unload_models": True, "free_memory": True}) == 200
        self.wait_for(lambda: not comfy_server.our_workers(), 30, "workers gone after /free")
        run_ok(comfy_server, roundtrip_prompt(comfy_server, image_name, "e2e/after_free"))
        after = comfy_server.our_workers()
        assert after and not after & before


class TestShutdown:
    """Runs last: SIGTERM the server and check that no pool worker outlives it."""

    def test_no_worker_left(self, comfy_server):
        if not comfy_server.our_workers():  # earlier tests deselected or failed: start a pool first
            image_name = f"e2e_shutdown_{uuid.uuid4().hex[:6]}.png"
            write_png(comfy_server.input_dir / image_name, 64, 64)
            run_ok(comfy_server, roundtrip_prompt(comfy_server, image_name, "e2e/shutdown"))
        before = comfy_server.our_workers()
        assert before, f"no `{WORKER_MODULE}` process found under the server before shutdown"
        rc = comfy_server.stop()
        deadline = time.monotonic() + 10
        left = comfy_server.our_workers()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = comfy_server.our_workers()
        assert not left, (
            f"workers {sorted(left)} (of {sorted(before)}) still alive 10 s after ComfyUI exited (rc {rc})\n"
            f"--- server log tail ---\n{comfy_server.log_tail()}"
        )
