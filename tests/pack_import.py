"""Import the pack the way ComfyUI does, with stand-ins for the host modules, for the tests that need it."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def path_name(folder: str) -> str:
    """The module name ComfyUI gives a pack in custom_nodes/`folder`: its path, dots escaped."""
    return str(REPO / "custom_nodes" / folder).replace(".", "_x_")


@contextmanager
def imported_as_comfyui(name: str, host_modules: dict):
    """Run the root `__init__.py` as package `name` (relative imports, as in ComfyUI) with `host_modules` in
    sys.modules; afterwards put back what was there and drop the pack. Nothing else is removed: dropping torch
    or the engine would force a second torch import in this process, which breaks."""
    saved = {m: sys.modules.get(m) for m in host_modules}
    sys.modules.update(host_modules)
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        for m, previous in saved.items():
            if previous is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = previous


@contextmanager
def submodule_as_comfyui(package: str, module: str, host_modules: dict):
    """Import `package`.`module` (e.g. nodes.bagel_nodes) with the pack as a path-named package and the host
    modules not yet imported stood in by `host_modules`, without running the root `__init__.py`; afterwards drop
    the pack and those stand-ins."""
    before = set(sys.modules)
    stubs = {k: v for k, v in host_modules.items() if k not in sys.modules}
    sys.modules.update(stubs)
    pack = types.ModuleType(package)
    pack.__path__ = [str(REPO)]
    sys.modules[package] = pack
    try:
        yield importlib.import_module(f"{package}.{module}")
    finally:
        for key in set(sys.modules) - before:
            if key in stubs or key.startswith(package):
                del sys.modules[key]
