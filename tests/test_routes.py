"""GET /bagel_vae_pp/status inside a stubbed host: registered on the server's route table, reports the pools."""

import asyncio
import json
import sys
import types

import pytest
import torch
from pack_import import imported_as_comfyui, path_name

PACK_NAME = path_name("bagel-vae-pp-routes")


class RouteTable:
    """What the pack uses of aiohttp's RouteTableDef: `routes.get(path)(handler)`."""

    def __init__(self):
        self.gets = {}

    def get(self, path):
        def add(handler):
            self.gets[path] = handler
            return handler

        return add


def host_modules(routes: RouteTable | None) -> dict:
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = "/nonexistent/models"
    folder_paths.add_model_folder_path = lambda name, path, is_default=False: None
    folder_paths.get_folder_paths = lambda name: []
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unload_all_models = lambda: None
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total: None
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    modules = {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils}
    if routes is not None:
        server = types.ModuleType("server")
        server.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(routes=routes)})
        modules["server"] = server
    return modules


def import_pack(routes: RouteTable | None):
    """Import the pack as ComfyUI does, with the host stubbed (and a PromptServer when `routes` is given)."""
    with imported_as_comfyui(PACK_NAME, host_modules(routes)) as module:
        return module, sys.modules[PACK_NAME + ".nodes.routes"], sys.modules[PACK_NAME + ".bagel_vae_pp.pool"]


class TestStatusRoute:
    def test_registered_on_the_servers_route_table(self):
        table = RouteTable()
        _, routes, _ = import_pack(table)
        assert table.gets == {"/bagel_vae_pp/status": routes.status}

    def test_without_a_server_nothing_is_registered(self):
        assert "server" not in sys.modules
        _, routes, _ = import_pack(None)
        assert routes.register_with_server() is False

    def test_reports_devices_dtype_running_and_worker_pids(self):
        _, routes, pool = import_pack(RouteTable())
        assert routes.status_payload()["pools"] == []
        workers = pool.get_pool(pool.PoolSpec.parse("cpu:2", "fp32", 60))
        try:
            workers.start()
            (state,) = routes.status_payload()["pools"]
            assert state["devices"] == ["cpu", "cpu"] and state["dtype"] == "fp32" and state["running"]
            assert state["worker_pids"] == [proc.pid for proc in workers.procs]
        finally:
            pool.shutdown_all()
        (state,) = routes.status_payload()["pools"]
        assert not state["running"] and state["worker_pids"] == []

    def test_handler_answers_json(self):
        pytest.importorskip("aiohttp", reason="aiohttp comes with ComfyUI; not needed by the engine")
        _, routes, _ = import_pack(RouteTable())
        response = asyncio.run(routes.status(None))
        assert response.content_type == "application/json"
        assert set(json.loads(response.body)) == {"pools", "host_pid"}
