"""Screenshot the saved workflows in ComfyUI's graph editor: docs/editor.png and the template thumbnails.

python tools/screenshot_editor.py --comfyui PATH [--python PY] [--chromium /usr/bin/chromium]
                                  [--editor-workflow bagel_text_to_image] [--thumbnails]

Starts a ComfyUI server (`main.py --cpu` on a free loopback port, every folder it writes in a temporary
directory, this repo loaded as a custom node through an extra_model_paths file, as tests/e2e does), opens the
editor in headless Chromium, loads each workflows/*.json through the frontend's `app.loadGraphData`, fits the
view and saves a screenshot over the DevTools protocol. Standard library only; the websocket client is
bagel_vae_pp.websocket. Thumbnails are written as workflows/<name>.jpg, as the template browser expects.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bagel_vae_pp.websocket import WebSocket  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--remote-debugging-port=0",
]  # fmt: skip
# Frontend settings for a clean first load: no template browser, no missing-model dialogs, no menu tour.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
}
THUMBNAIL_CROP = (60, 72)  # left sidebar and top bars of the editor: thumbnails show the canvas only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited (rc {proc.returncode})" + (f"; log {log}" if log else ""))
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s" + (f"; see {log}" if log else ""))


def start_comfyui(comfyui: Path, python: str, root: Path) -> tuple[subprocess.Popen, str]:
    """ComfyUI on a free loopback port with this repo as a custom node; everything it writes under `root`."""
    dirs = {name: root / name for name in ("custom_nodes", "input", "output", "temp", "user/default")}
    for path in dirs.values():
        path.mkdir(parents=True)
    (dirs["custom_nodes"] / "bagel-vae-pp").symlink_to(REPO, target_is_directory=True)
    (dirs["user/default"] / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    shutil.copy(REPO / "docs" / "icon.png", dirs["input"] / "example.png")  # LoadImage shows a preview
    yaml = root / "extra_model_paths.yaml"
    yaml.write_text(f"screenshot:\n    custom_nodes: {dirs['custom_nodes']}\n")
    port = free_port()
    command = [
        python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
        "--extra-model-paths-config", str(yaml), "--output-directory", str(dirs["output"]),
        "--input-directory", str(dirs["input"]), "--temp-directory", str(dirs["temp"]),
        "--user-directory", str(root / "user"),
    ]  # fmt: skip
    log = root / "comfyui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for("ComfyUI", lambda: urllib.request.urlopen(f"{url}/object_info", timeout=30).status == 200, 300, proc, log)
    return proc, url


class Page:
    """One Chromium tab driven over the DevTools protocol (commands in, results matched by id)."""

    def __init__(self, ws_url: str):
        self.ws = WebSocket(ws_url, timeout_s=30)
        self.ids = itertools.count(1)

    def call(self, method: str, timeout_s: float = 60, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(0x1, json.dumps({"id": call_id, "method": method, "params": params}).encode())
        self.ws.settimeout(timeout_s)
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str, timeout_s: float = 60):
        result = self.call("Runtime.evaluate", timeout_s, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


def open_page(chromium: str, profile: Path, url: str, width: int, height: int) -> tuple[subprocess.Popen, Page]:
    proc = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    port = wait_for("Chromium", lambda: port_file.exists() and port_file.read_text().split()[0], 60, proc)
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
    (tab,) = [t for t in targets if t["type"] == "page"][:1]
    page = Page(tab["webSocketDebuggerUrl"])
    page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    return proc, page


def show_workflow(page: Page, ui_path: Path) -> None:
    """Load a UI-format workflow into the editor and fit it to the view."""
    graph = json.loads(ui_path.read_text())
    page.evaluate(f"window.app.loadGraphData({json.dumps(graph)}, true, true, {json.dumps(ui_path.stem)})")
    page.evaluate("window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    time.sleep(1.5)  # let the canvas redraw (images, widgets) before the capture


def to_thumbnail(png: bytes, width: int) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.crop((*THUMBNAIL_CROP, image.width, image.height))
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a Comfy-Org/ComfyUI checkout")
    parser.add_argument("--python", default=sys.executable, help="Python with ComfyUI's requirements")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--editor-workflow", default="bagel_text_to_image", help="workflow shown in docs/editor.png")
    parser.add_argument("--thumbnails", action="store_true", help="also write workflows/<name>.jpg for each")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bagel_vae_pp_screenshot-"))
    server, browser = None, None
    try:
        server, url = start_comfyui(args.comfyui.resolve(), args.python, root)
        browser, page = open_page(args.chromium, root / "profile", url, args.width, args.height)
        wait_for("the editor", lambda: page.evaluate("!!(window.app && window.app.graph && window.app.canvas)"), 120)
        time.sleep(2)
        names = sorted(p.stem for p in (REPO / "workflows").glob("*.json")) if args.thumbnails else []
        for name in sorted({*names, args.editor_workflow}):
            show_workflow(page, REPO / "workflows" / f"{name}.json")
            png = page.screenshot()
            if name in names:
                (REPO / "workflows" / f"{name}.jpg").write_bytes(to_thumbnail(png, 800))
                print(f"wrote workflows/{name}.jpg")
            if name == args.editor_workflow:
                (REPO / "docs").mkdir(exist_ok=True)
                (REPO / "docs" / "editor.png").write_bytes(png)
        print("wrote docs/editor.png")
    finally:
        for proc in (browser, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        if os.environ.get("KEEP_SCREENSHOT_TMP"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
