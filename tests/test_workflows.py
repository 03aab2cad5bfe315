"""The saved workflows in `workflows/` are consistent fixtures (CPU, no ComfyUI needed).

Every API-format graph in `workflows/api/` has a UI-format twin in `workflows/` (same file name) with the same
node ids, node types, links and widget values, and every node type is either a core ComfyUI node we know the
widget order of or one of the pack's registered nodes. The UI format is positional (`widgets_values` follows
the widget order, see ../shared/notes/comfyui_host.md §4.2), so this test also pins the pack's widget order:
reordering a node's inputs breaks every saved workflow, and this test says which.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from unittest import mock

import pytest
from pack_import import imported_as_comfyui

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))

# Widget names of the core nodes our workflows may use, in the frontend's widget order (ComfyUI 0.3.64).
# None marks a widget the frontend adds that has no API input: LoadImage's upload button, a seed's
# "control_after_generate".
CORE_WIDGETS = {
    "LoadImage": ["image", None],
    "VAELoader": ["vae_name"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "VAEDecode": [],
    "VAEEncode": [],
    "VAEDecodeTiled": ["tile_size", "overlap", "temporal_size", "temporal_overlap"],
    "VAEEncodeTiled": ["tile_size", "overlap", "temporal_size", "temporal_overlap"],
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "CLIPLoader": ["clip_name", "type", "device"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "FluxGuidance": ["guidance"],
    "ImageScale": ["upscale_method", "width", "height", "crop"],
    "EmptyHunyuanLatentVideo": ["width", "height", "length", "batch_size"],  # the latent core's Wan templates use
    "CreateVideo": ["fps"],  # comfy_extras/nodes_video.py; its optional `audio` is a socket
    "SaveVideo": ["filename_prefix", "format", "codec"],
}
# Frontend-only nodes: they never reach the API graph.
UI_ONLY_TYPES = {"Note", "MarkdownNote"}

# The lead's node contract, used only while the pack's registry cannot be read (see pack_widgets).
CONTRACT_WIDGETS = {
    "BagelVAEPP_WorkerPool": ["devices", "dtype", "timeout_s"],
    "BagelVAEPP_DistributedDecode": ["mode", "tile_size", "overlap", "temporal_size", "temporal_overlap"],
    "BagelVAEPP_DistributedEncode": ["mode", "tile_size", "overlap", "temporal_size", "temporal_overlap"],
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
HOST_MODULES = ("folder_paths", "comfy", "comfy.model_management", "comfy.utils", "comfy.sd", "server")


def widget_names(input_types: dict) -> list[str | None]:
    """Widget order the frontend builds from a V1 `INPUT_TYPES()` dict (required, then optional)."""
    names: list[str | None] = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            is_widget = isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES
            if not is_widget or opts.get("forceInput"):
                continue
            names.append(name)
            if opts.get("control_after_generate") or opts.get("image_upload"):
                names.append(None)
    return names


def load_pack_registry() -> dict | None:
    """NODE_CLASS_MAPPINGS of the pack, imported the way ComfyUI does (path-named package), host stubbed.

    Returns None while the registry does not exist yet.
    """
    init = REPO / "nodes" / "__init__.py"
    if not init.exists() or "NODE_CLASS_MAPPINGS" not in init.read_text():
        return None
    stubs = {mod: mock.MagicMock(name=mod) for mod in HOST_MODULES}
    with imported_as_comfyui("bagel_vae_pp_pack_under_test", stubs) as module:
        mappings = dict(module.NODE_CLASS_MAPPINGS)
        return {node_id: widget_names(cls.INPUT_TYPES()) for node_id, cls in mappings.items()}


@pytest.fixture(scope="module")
def known_widgets() -> dict[str, list[str | None]]:
    pack = load_pack_registry()
    if pack is None:
        # TODO(lead): nodes/__init__.py with NODE_CLASS_MAPPINGS does not exist yet; drop this fallback then.
        pack = CONTRACT_WIDGETS
    clashes = set(pack) & set(CORE_WIDGETS)
    assert not clashes, f"pack node ids clash with core nodes: {sorted(clashes)}"
    return {**CORE_WIDGETS, **pack}


def load_pair(api_path: Path) -> tuple[dict, dict]:
    ui_path = WORKFLOWS / api_path.name
    assert ui_path.exists(), f"{api_path.relative_to(REPO)} has no UI-format twin {ui_path.relative_to(REPO)}"
    return json.loads(api_path.read_text()), json.loads(ui_path.read_text())


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def test_workflows_exist():
    assert API_FILES, "workflows/api/ holds no API-format workflow"


class TestUIFormat:
    """The UI files are well-formed version-0.4 graphs whose link table agrees with the node sockets."""

    @pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
    def test_structure(self, api_path):
        _, ui = load_pair(api_path)
        assert ui["version"] == 0.4
        uuid.UUID(ui["id"])
        nodes = {n["id"]: n for n in ui["nodes"]}
        assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
        assert ui["last_node_id"] >= max(nodes)
        assert ui["last_link_id"] >= max((link[0] for link in ui["links"]), default=0)
        for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
            out = nodes[src]["outputs"][src_slot]
            assert link_id in (out["links"] or []), f"link {link_id} missing from node {src} output {src_slot}"
            assert out["type"] == kind, f"link {link_id}: type {kind} but node {src} outputs {out['type']}"
            socket = nodes[dst]["inputs"][dst_slot]
            assert socket["link"] == link_id, f"link {link_id} not on node {dst} input {dst_slot}"
            assert socket["type"] == kind, f"link {link_id}: type {kind} into {socket['type']} ({socket['name']})"
        linked = {link[0] for link in ui["links"]}
        for node in ui["nodes"]:
            for socket in node.get("inputs", []):
                assert socket["link"] is None or socket["link"] in linked, f"node {node['id']}: dangling link"


class TestApiMatchesUI:
    """Each API graph is exactly what File → Export (API) would give for its UI twin."""

    @pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
    def test_same_nodes(self, api_path):
        api, ui = load_pair(api_path)
        ui_types = {str(n["id"]): n["type"] for n in ui["nodes"] if n["type"] not in UI_ONLY_TYPES}
        api_types = {node_id: node["class_type"] for node_id, node in api.items()}
        assert api_types == ui_types

    @pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
    def test_same_links(self, api_path):
        api, ui = load_pair(api_path)
        nodes = {n["id"]: n for n in ui["nodes"]}
        ui_links = {
            (str(src), src_slot, str(dst), nodes[dst]["inputs"][dst_slot]["name"])
            for _, src, src_slot, dst, dst_slot, _ in ui["links"]
        }
        api_links = {
            (value[0], value[1], node_id, name)
            for node_id, node in api.items()
            for name, value in node["inputs"].items()
            if is_link(value)
        }
        assert api_links == ui_links

    @pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
    def test_same_widget_values(self, api_path, known_widgets):
        api, ui = load_pair(api_path)
        for node in ui["nodes"]:
            if node["type"] in UI_ONLY_TYPES:
                continue
            names = known_widgets[node["type"]]
            values = node.get("widgets_values", [])
            where = f"{api_path.name} node {node['id']} ({node['type']})"
            assert len(values) == len(names), f"{where}: widgets_values {values} but widgets are {names}"
            inputs = api[str(node["id"])]["inputs"]
            from_ui = {
                name: value for name, value in zip(names, values, strict=True) if name and not is_link(inputs.get(name))
            }
            constants = {name: value for name, value in inputs.items() if not is_link(value)}
            assert constants == from_ui, f"{where}: API inputs differ from the UI widgets"


class TestNodeTypes:
    """Every node a workflow uses is a core node or one of ours."""

    @pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
    def test_registered(self, api_path, known_widgets):
        api, ui = load_pair(api_path)
        used = {node["class_type"] for node in api.values()} | {
            n["type"] for n in ui["nodes"] if n["type"] not in UI_ONLY_TYPES
        }
        unknown = sorted(used - set(known_widgets))
        assert not unknown, f"{api_path.name}: node types neither core (allowlist) nor registered: {unknown}"
