"""pyproject.toml carries what the Comfy Registry requires (docs.comfy.org/registry/specifications)."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())
# The values ComfyUI's comfy_config/config_parser.py accepts after "Environment :: ".
ACCELERATORS = {
    "GPU :: NVIDIA CUDA",
    "GPU :: AMD ROCm",
    "GPU :: Intel Arc",
    "NPU :: Huawei Ascend",
    "GPU :: Apple Metal",
}


class TestRegistryMetadata:
    def test_name_is_a_valid_node_id(self):
        name = CONFIG["project"]["name"]
        assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
        assert "comfyui" not in name.lower()

    def test_version_is_semver_and_matches_the_engine(self):
        version = CONFIG["project"]["version"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
        assert f'__version__ = "{version}"' in (REPO / "bagel_vae_pp" / "__init__.py").read_text()

    def test_license_file_and_repository(self):
        assert (REPO / CONFIG["project"]["license"]["file"]).is_file()
        assert CONFIG["project"]["urls"]["Repository"].startswith("https://github.com/")

    def test_tool_comfy_fields(self):
        comfy = CONFIG["tool"]["comfy"]
        assert comfy["PublisherId"] and comfy["DisplayName"]
        repo = CONFIG["project"]["urls"]["Repository"].removeprefix("https://github.com/")
        prefix = f"https://raw.githubusercontent.com/{repo}/main/"
        assert comfy["Icon"].startswith(prefix), comfy["Icon"]
        assert (REPO / comfy["Icon"].removeprefix(prefix)).is_file(), "the icon URL names a file not in the repo"

    def test_classifiers_are_ones_the_registry_reads(self):
        for classifier in CONFIG["project"].get("classifiers", []):
            kind, _, value = classifier.partition(" :: ")
            if kind == "Operating System":
                assert value.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")), classifier
            elif kind == "Environment":
                assert value in ACCELERATORS, classifier
