"""HTTP routes of the pack on ComfyUI's server: GET /bagel_vae_pp/status, the worker pools' state as JSON.

The pack's `__init__` registers them on `server.PromptServer.instance.routes`, which ComfyUI adds to its app
after the custom nodes load (also under /api/). Without the server (unit tests, scripts) nothing is registered.
"""

from __future__ import annotations

import os

from ..bagel_vae_pp.pool import pool_states

STATUS_PATH = "/bagel_vae_pp/status"


def status_payload() -> dict:
    """{"pools": [{devices, dtype, timeout_s, running, worker_pids, last_timing}], "host_pid": pid}."""
    return {"pools": pool_states(), "host_pid": os.getpid()}


async def status(request):
    from aiohttp import web  # ComfyUI's web framework; only imported when the route is served

    return web.json_response(status_payload())


def register(routes) -> None:
    """Add the pack's routes to an aiohttp RouteTableDef (ComfyUI's `PromptServer.instance.routes`)."""
    routes.get(STATUS_PATH)(status)


def register_with_server() -> bool:
    """Register on ComfyUI's route table when a PromptServer runs in this process; whether it did."""
    try:
        from server import PromptServer
    except ImportError:  # no ComfyUI server: unit tests, scripts
        return False
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is None:
        return False
    register(routes)
    return True
