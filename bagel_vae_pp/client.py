"""Headless client for a ComfyUI server: submit an API-format workflow, override inputs, follow progress, save outputs.

python -m bagel_vae_pp.client WORKFLOW --server URL [--set NODE.INPUT=VALUE ...] [--prompt TEXT] [--seed N]
                              [--image PATH] [--out DIR] [--timeout S]

It speaks ComfyUI's HTTP API (POST /prompt, POST /upload/image, GET /history/<id>, GET /view) and follows
the prompt over the websocket (`/ws?clientId=`) until `executing` with `node: null`, as ComfyUI's own
script_examples do. Standard library only (its RFC 6455 client is `websocket.py`), so it runs from any Python 3.10
without installing anything: the machine that drives a render server needs neither ComfyUI nor torch.

Exit status: 0 done, 1 the prompt failed (execution error, interrupt, timeout), 2 refused (HTTP 400 with the
node errors printed, or a bad override).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .websocket import WebSocket

# Where --prompt and --seed go, by node type. BAGEL nodes first; core samplers are the fallback for seeds.
PROMPT_INPUTS = {
    "BagelVAEPP_TextToImage": "prompt",
    "BagelVAEPP_ImageEdit": "prompt",
    "BagelVAEPP_Understanding": "prompt",
}
SEED_INPUTS = {
    "BagelVAEPP_TextToImage": "seed",
    "BagelVAEPP_ImageEdit": "seed",
    "BagelVAEPP_Understanding": "seed",
    "KSampler": "seed",
    "KSamplerAdvanced": "noise_seed",
    "RandomNoise": "noise_seed",
}
# Samplers whose `positive` input names the text encoder that --prompt fills when no BAGEL node is present.
POSITIVE_SAMPLERS = ("KSampler", "KSamplerAdvanced")
PROGRESS_STEP = 0.1  # print a node's progress every 10% (and at its end)


class RejectedError(RuntimeError):
    """The server refused the prompt (HTTP 400), or an override names no node or input of the workflow."""


class FailedError(RuntimeError):
    """The prompt ran and failed: an execution error, an interrupt, or no end before the timeout."""


# ---- workflow overrides ----


def find_node(prompt: dict, ref: str) -> str:
    """The id of the node `ref` names: an id, a unique `_meta.title`, or a unique class_type."""
    if ref in prompt:
        return ref
    by_title = [i for i, node in prompt.items() if node.get("_meta", {}).get("title") == ref]
    by_type = [i for i, node in prompt.items() if node["class_type"] == ref]
    for found in (by_title, by_type):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise RejectedError(f"--set: {ref!r} matches nodes {found}; use a node id.")
    raise RejectedError(f"--set: no node {ref!r} in the workflow; its nodes are {describe_nodes(prompt)}.")


def describe_nodes(prompt: dict) -> str:
    return ", ".join(f"{i} ({node['class_type']})" for i, node in prompt.items())


def parse_value(text: str):
    """JSON when it parses (numbers, true/false, lists), else the text itself: `seed=7`, `devices=0,1`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_set(prompt: dict, assignment: str) -> None:
    """Apply one `NODE.INPUT=VALUE` override in place (NODE: id, title or class_type)."""
    target, sep, value = assignment.partition("=")
    ref, dot, name = target.rpartition(".")
    if not sep or not dot or not ref or not name:
        raise RejectedError(f"--set {assignment!r}: expected NODE.INPUT=VALUE, e.g. --set 3.devices=0,1")
    node = prompt[find_node(prompt, ref)]
    if name not in node["inputs"]:
        raise RejectedError(
            f"--set {assignment!r}: node {ref} ({node['class_type']}) has no input {name!r}; "
            f"its inputs are {sorted(node['inputs'])}."
        )
    node["inputs"][name] = parse_value(value)


def set_by_type(prompt: dict, inputs_by_type: dict, value) -> list[str]:
    """Set `value` on every node whose type is a key of `inputs_by_type`; the ids set."""
    done = [i for i, node in prompt.items() if node["class_type"] in inputs_by_type]
    for i in done:
        prompt[i]["inputs"][inputs_by_type[prompt[i]["class_type"]]] = value
    return done


def set_prompt_text(prompt: dict, text: str) -> list[str]:
    """--prompt: the BAGEL nodes' prompt, else the text encoder wired to a core sampler's `positive`."""
    done = set_by_type(prompt, PROMPT_INPUTS, text)
    if not done:
        for node in prompt.values():
            link = node["inputs"].get("positive") if node["class_type"] in POSITIVE_SAMPLERS else None
            if isinstance(link, list) and "text" in prompt[link[0]]["inputs"]:
                prompt[link[0]]["inputs"]["text"] = text
                done.append(link[0])
    if not done:
        raise RejectedError(
            f"--prompt: the workflow has no BAGEL node and no sampler with a text prompt ({describe_nodes(prompt)}); "
            "use --set NODE.INPUT=TEXT."
        )
    return done


def set_seed(prompt: dict, seed: int) -> list[str]:
    done = set_by_type(prompt, SEED_INPUTS, seed)
    if not done:
        raise RejectedError(
            f"--seed: no node with a seed in the workflow ({describe_nodes(prompt)}); use --set NODE.INPUT=N."
        )
    return done


def set_image(prompt: dict, name: str) -> str:
    """--image: the one LoadImage node gets the uploaded file's name."""
    loads = [i for i, node in prompt.items() if node["class_type"] == "LoadImage"]
    if len(loads) != 1:
        raise RejectedError(
            f"--image: the workflow has {len(loads)} LoadImage nodes, expected one; upload the file and use "
            "--set NODE.image=NAME instead."
        )
    prompt[loads[0]]["inputs"]["image"] = name
    return loads[0]


# ---- HTTP ----


def http_json(url: str, data: bytes | None = None, content_type: str = "application/json", timeout_s: float = 60):
    """GET (or POST `data`) and parse the JSON answer; an HTTP error raises urllib's HTTPError."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def submit(server: str, prompt: dict, client_id: str) -> str:
    """POST /prompt; the prompt id, or RejectedError carrying the readable node errors of an HTTP 400."""
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    try:
        return http_json(f"{server}/prompt", body)["prompt_id"]
    except urllib.error.HTTPError as error:
        if error.code != 400:
            raise
        raw = error.read()
        try:
            answer = json.loads(raw)
        except json.JSONDecodeError:
            raise RejectedError(f"the server refused the prompt (HTTP 400): {raw[:2000]!r}") from None
        raise RejectedError(format_rejection(answer, prompt)) from None


def format_rejection(answer: dict, prompt: dict) -> str:
    """The 400 body of POST /prompt as lines: the overall error, then each node's errors with id and type."""
    error = answer.get("error", {})
    if isinstance(error, str):
        error = {"message": error}
    details = f": {error['details']}" if error.get("details") else ""
    lines = [f"prompt refused: {error.get('message', 'invalid prompt')}{details}"]
    for node_id, entry in answer.get("node_errors", {}).items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title")
        lines.append(f"  node {node_id} ({entry.get('class_type', '?')}{', ' + title if title else ''}):")
        for e in entry.get("errors", []):
            detail = f": {e['details']}" if e.get("details") else ""
            lines.append(f"    - {e.get('message', e.get('type', 'error'))}{detail}")
    return "\n".join(lines)


def upload_image(server: str, path: Path) -> str:
    """POST /upload/image (multipart, overwrite); the name LoadImage takes (`subfolder/name` when in one)."""
    boundary = uuid.uuid4().hex
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n".encode(),
        path.read_bytes(),
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    answer = http_json(f"{server}/upload/image", b"".join(parts), f"multipart/form-data; boundary={boundary}")
    return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


def download_outputs(server: str, history: dict, out_dir: Path) -> list[Path]:
    """Save every file a node reported in its ui outputs (images, gifs, ...) via GET /view; the paths written."""
    saved = []
    for output in history.get("outputs", {}).values():
        for items in output.values():
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, dict) or "filename" not in item:
                    continue
                query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
                subfolder = Path(*[p for p in Path(item.get("subfolder", "")).parts if p not in ("..", "/")])
                path = out_dir / subfolder / Path(item["filename"]).name
                path.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(f"{server}/view?{query}", timeout=120) as response:
                    path.write_bytes(response.read())
                saved.append(path)
    return saved


# ---- following a prompt ----


@dataclass
class Run:
    """One submitted prompt: its id, the events seen, the /history entry and the files saved."""

    prompt_id: str
    events: list[dict] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def node_label(prompt: dict, node_id) -> str:
    node = prompt.get(str(node_id), {})
    return f"node {node_id} ({node.get('_meta', {}).get('title') or node.get('class_type', '?')})"


def follow(ws: WebSocket, run: Run, prompt: dict, deadline: float, log) -> None:
    """Print this prompt's events until `executing` with node null; FailedError on error, interrupt or timeout."""
    shown: dict[str, float] = {}
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FailedError(f"prompt {run.prompt_id} not finished within the timeout; it may still be running")
        ws.settimeout(min(left, 5.0))
        try:
            message = ws.recv()
        except TimeoutError:
            continue
        if message is None:
            raise FailedError("the server closed the websocket before the prompt finished")
        if not isinstance(message, str):
            continue  # binary frames: previews
        event = json.loads(message)
        kind, data = event.get("type"), event.get("data", {})
        if data.get("prompt_id") != run.prompt_id:
            continue
        run.events.append(event)
        if kind == "execution_cached" and data.get("nodes"):
            log(f"cached: {', '.join(node_label(prompt, n) for n in data['nodes'])}")
        elif kind == "executing" and data.get("node") is None:
            return
        elif kind == "executing":
            log(f"running {node_label(prompt, data['node'])}")
        elif kind == "progress":
            node, value, total = str(data.get("node")), data["value"], data["max"]
            if value >= total or value - shown.get(node, -1e9) >= PROGRESS_STEP * total:
                shown[node] = value
                log(f"  {node_label(prompt, node)}: {value}/{total}")
        elif kind == "execution_error":
            raise FailedError(
                f"{node_label(prompt, data.get('node_id'))} failed: {data.get('exception_type')}: "
                f"{data.get('exception_message')}"
            )
        elif kind == "execution_interrupted":
            raise FailedError(f"interrupted at {node_label(prompt, data.get('node_id'))}")


def run_workflow(server: str, prompt: dict, out_dir: Path | None, timeout_s: float = 3600, log=print) -> Run:
    """Submit an API-format graph, follow it to its end and save its output files.

    Args:
        server: base URL, e.g. http://127.0.0.1:8188.
        prompt: the API-format graph (`{id: {class_type, inputs}}`), overrides already applied.
        out_dir: where the outputs go (None: not downloaded).
        timeout_s: overall limit for the prompt to finish, queue time included.
        log: called with each progress line.
    """
    server = server.rstrip("/")
    client_id = uuid.uuid4().hex
    ws_url = "ws" + server[len("http") :] + f"/ws?clientId={client_id}"
    ws = WebSocket(ws_url)  # before submitting, so no event is missed
    try:
        run = Run(submit(server, prompt, client_id))
        log(f"queued prompt {run.prompt_id}")
        follow(ws, run, prompt, time.monotonic() + timeout_s, log)
    finally:
        ws.close()
    run.history = http_json(f"{server}/history/{run.prompt_id}").get(run.prompt_id, {})
    status = run.history.get("status", {})
    if status.get("status_str") == "error":
        raise FailedError(f"prompt {run.prompt_id} ended with an error: {json.dumps(status.get('messages'))[:2000]}")
    if out_dir is not None:
        run.files = download_outputs(server, run.history, out_dir)
    return run


def build_prompt(args) -> dict:
    prompt = json.loads(Path(args.workflow).read_text())
    if "nodes" in prompt and "links" in prompt:
        raise RejectedError(
            f"{args.workflow} is a UI-format workflow; the server takes the API format (workflows/api/, or "
            "File > Export (API) in the editor)."
        )
    for assignment in args.set:
        apply_set(prompt, assignment)
    if args.prompt is not None:
        set_prompt_text(prompt, args.prompt)
    if args.seed is not None:
        set_seed(prompt, args.seed)
    return prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bagel_vae_pp.client", description=__doc__.splitlines()[0])
    parser.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/vae_roundtrip_4k.json)")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI base URL")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="override an input; NODE is an id, title or class_type; VALUE is JSON or text",
    )
    parser.add_argument("--prompt", help="text for the BAGEL node (else the sampler's positive text encoder)")
    parser.add_argument("--seed", type=int, help="seed for the BAGEL node(s) and core samplers")
    parser.add_argument("--image", type=Path, help="upload this file and use it in the LoadImage node")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the output files")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the prompt to finish")
    args = parser.parse_args(argv)
    try:
        prompt = build_prompt(args)
        if args.image is not None:
            if not args.image.is_file():
                raise RejectedError(f"--image {args.image}: no such file.")
            set_image(prompt, upload_image(args.server.rstrip("/"), args.image))
        run = run_workflow(args.server, prompt, args.out, args.timeout)
    except RejectedError as error:
        print(error, file=sys.stderr)
        return 2
    except FailedError as error:
        print(error, file=sys.stderr)
        return 1
    except urllib.error.HTTPError as error:
        print(f"ComfyUI at {args.server} answered {error.url}: HTTP {error.code} {error.reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError) as error:
        print(f"cannot reach ComfyUI at {args.server}: {error}", file=sys.stderr)
        return 1
    for path in run.files:
        print(f"saved {path}")
    print(f"done: prompt {run.prompt_id}, {len(run.files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
