"""`python -m bagel_vae_pp bagel`: the nodes' engine calls and defaults on the tiny checkpoint, and its refusals."""

import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bagel_vae_pp import cli
from bagel_vae_pp.bagel import cli as bagel_cli
from bagel_vae_pp.bagel.loader import load_bagel
from bagel_vae_pp.bagel.pipeline import autoencoder_moments, edit_image, text_to_image, understand_image
from bagel_vae_pp.bagel.sampler import GuidanceOptions
from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.timeout(180)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The official app's settings (the nodes' defaults), written out here rather than read from the engine, so that a
# default the CLI gets wrong, or a changed shared default, shows.
APP_TEXT_TO_IMAGE = GuidanceOptions(50, 3.0, 4.0, 1.5, (0.4, 1.0), "global", 0.0)
APP_EDIT = GuidanceOptions(50, 3.0, 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("bagel") / "tiny"))  # a 32-wide random ae


@pytest.fixture(scope="module")
def reference(folder):
    """The checkpoint loaded separately, for direct engine calls."""
    return load_bagel(folder, "cpu", torch.float32)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("photo") / "photo.png")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(path)
    return path


def bagel(*args) -> int:
    """The exit code of `python -m bagel_vae_pp bagel ARGS` (argparse's refusals exit from inside main)."""
    try:
        return cli.main(["bagel", *map(str, args)])
    except SystemExit as e:
        return e.code


def read_unit(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255  # [H, W, 3]


def decoded(loaded, latent) -> torch.Tensor:
    """What core VAE Decode shows for a FLUX latent: (x + 1) / 2 clamped, [H, W, 3]."""
    with torch.no_grad():
        x = loaded.vae.decode(latent)  # [1, 3, H, W]
    return ((x[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0)


class TestRuns:
    def test_text_to_image_is_the_pipeline_with_the_app_defaults(self, folder, reference, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
        monkeypatch.chdir(tmp_path)
        assert bagel("text-to-image", folder, "--prompt", "the cat", "--seed", 7, "--width", 64, "--height", 48,
                     "--dtype", "fp32", "--latent", "cat.safetensors") == 0  # fmt: skip
        expected, _ = text_to_image(reference.model, reference.tokenizer, "the cat", 64, 48, 7, APP_TEXT_TO_IMAGE)
        latent = load_file(tmp_path / "cat.safetensors")["samples"]
        torch.testing.assert_close(latent, expected, atol=1e-6, rtol=0)
        png = read_unit(tmp_path / "bagel_7.png")  # the default name
        assert png.shape == (48, 64, 3)
        assert (png - decoded(reference, expected)).abs().max() <= 1 / 255 + 1e-6
        err = capsys.readouterr().err.splitlines()
        assert [line for line in err if line.startswith("step")] == [f"step {i}/49" for i in range(1, 50)]

    def test_edit_is_the_pipeline_with_the_edit_defaults(self, folder, reference, photo, tmp_path):
        out, lat = tmp_path / "edit.png", tmp_path / "edit.safetensors"
        assert bagel("edit", folder, "--image", photo, "--prompt", "make it winter", "--seed", 3, "--dtype", "fp32",
                     "--steps", 12, "--out", out, "--latent", lat) == 0  # fmt: skip
        image, options = read_unit(photo), replace(APP_EDIT, num_timesteps=12)
        expected, _ = edit_image(reference.model, reference.tokenizer, image, "make it winter",
                                 autoencoder_moments(reference.vae), 3, options)  # fmt: skip
        torch.testing.assert_close(load_file(lat)["samples"], expected, atol=1e-6, rtol=0)
        assert (read_unit(out) - decoded(reference, expected)).abs().max() <= 1 / 255 + 1e-6

    def test_understand_prints_the_greedy_answer(self, folder, reference, photo, capsys):
        assert bagel("understand", folder, "--image", photo, "--prompt", "what is it", "--dtype", "fp32",
                     "--max-new-tokens", 12) == 0  # fmt: skip
        expected = understand_image(reference.model, reference.tokenizer, read_unit(photo), "what is it", 12)
        assert capsys.readouterr().out == expected + "\n"

    def test_understand_defaults_are_the_nodes(self, folder, photo, monkeypatch, capsys):
        calls = []
        monkeypatch.setattr(bagel_cli, "understand_image", lambda *args: calls.append(args[4:8]) or "answer")
        assert bagel("understand", folder, "--image", photo, "--prompt", "what is it") == 0
        assert calls == [(512, 0.0, 0, False)]  # max_new_tokens, temperature (greedy), seed, think
        assert capsys.readouterr().out == "answer\n"

    def test_ctrl_c_stops_within_a_step_with_exit_code_130(self, folder, tmp_path):
        argv = [sys.executable, "-m", "bagel_vae_pp", "bagel", "text-to-image", folder, "--prompt", "x", "--steps",
                "500", "--dtype", "fp32", "--out", str(tmp_path / "never.png")]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stderr.read().splitlines()
        assert proc.wait(timeout=60) == 130
        assert rest[-1] == "interrupted"
        assert len([line for line in rest if line.startswith("step")]) <= 3  # the steps already under way
        assert not (tmp_path / "never.png").exists()


T2I = ["text-to-image", "{folder}", "--prompt", "x", "--dtype", "fp32"]
EDIT = ["edit", "{folder}", "--prompt", "x", "--dtype", "fp32"]


class TestWeightDtype:
    @pytest.mark.parametrize("where, rel_tol", [(["--devices", "in-process"], 1e-6),
                                                (["--devices", "cpu:2", "--split", "1x2"], 1e-5)])  # fmt: skip
    def test_fp8_storage_is_the_pipeline_on_the_fp8_model(self, folder, tmp_path, monkeypatch, where, rel_tol):
        """In this process, and split over 2 CPU workers (tensor parallel): the in-process FP8 model's latent."""
        monkeypatch.chdir(tmp_path)
        assert bagel("text-to-image", folder, "--prompt", "the cat", "--seed", 7, "--width", 32, "--height", 32,
                     "--steps", 4, "--dtype", "fp32", "--weight-dtype", "fp8_e4m3fn", *where,
                     "--latent", "cat.safetensors") == 0  # fmt: skip
        fp8 = load_bagel(folder, "cpu", torch.float32, weight_dtype="fp8_e4m3fn")
        expected, _ = text_to_image(fp8.model, fp8.tokenizer, "the cat", 32, 32, 7,
                                    replace(APP_TEXT_TO_IMAGE, num_timesteps=4))  # fmt: skip
        latent = load_file(tmp_path / "cat.safetensors")["samples"]
        assert ((latent - expected).abs().max() / expected.abs().max()).item() <= rel_tol

    def test_fp8_gemms_are_refused_without_fp8_tensor_cores(self, folder, tmp_path, monkeypatch, capsys):
        monkeypatch.chdir(tmp_path)
        assert bagel("text-to-image", folder, "--prompt", "x", "--weight-dtype", "fp8_e4m3fn_fast") == 2
        err = capsys.readouterr().err
        assert "fp8_e4m3fn_fast needs FP8 tensor cores" in err and err.count("\n") == 1, err


class TestOnThePool:
    def test_text_to_image_on_2_workers_is_the_in_process_result(self, folder, reference, tmp_path, monkeypatch):
        """BAGEL split over a pool of 2 CPU workers (tensor parallel); the PNG decoded through the same pool."""
        monkeypatch.chdir(tmp_path)
        assert bagel("text-to-image", folder, "--prompt", "the cat", "--seed", 7, "--width", 64, "--height", 48,
                     "--steps", 6, "--dtype", "fp32", "--devices", "cpu:2", "--split", "1x2",
                     "--latent", "cat.safetensors") == 0  # fmt: skip
        expected, _ = text_to_image(reference.model, reference.tokenizer, "the cat", 64, 48, 7,
                                    replace(APP_TEXT_TO_IMAGE, num_timesteps=6))  # fmt: skip
        latent = load_file(tmp_path / "cat.safetensors")["samples"]
        assert ((latent - expected).abs().max() / expected.abs().max()).item() <= 1e-5
        assert (read_unit(tmp_path / "bagel_7.png") - decoded(reference, expected)).abs().max() <= 1 / 255 + 1e-5

    def test_understanding_on_2_workers(self, folder, reference, photo, capsys):
        assert bagel("understand", folder, "--image", photo, "--prompt", "what?", "--max-new-tokens", 6,
                     "--dtype", "fp32", "--devices", "cpu:2") == 0  # fmt: skip
        image = read_unit(photo)
        want = understand_image(reference.model, reference.tokenizer, image, "what?", 6)
        assert capsys.readouterr().out.strip() == want.strip()


class TestRefusals:
    @pytest.mark.parametrize(
        "argv,message",
        [
            (["text-to-image", "{empty}", "--prompt", "x"], "error: MODEL_DIR '{empty}' is not a BAGEL checkpoint: "
             "it lacks llm_config.json, vit_config.json, ema.safetensors, tokenizer.json, ae.safetensors or "
             "vae/ae.safetensors."),
            ([*T2I, "--width", "40"], "error: --width is 40; it must be a multiple of 16 from 16 to 128"),
            ([*T2I, "--height", "144"], "error: --height is 144; it must be a multiple of 16 from 16 to 128"),
            ([*T2I, "--cfg-renorm-type", "local"], "error: --cfg-renorm-type: cfg_renorm_type is 'local'; allowed "
             "values are global, channel, text_channel."),
            ([*T2I, "--steps", "1"], "error: --steps: steps is 1; use at least 2"),
            ([*T2I, "--step-cache", "2"], "error: --step-cache: step_cache is 2.0; allowed range is 0.0 (off) to 1.0."),
            ([*EDIT, "--image", "{empty}/none.png"], "error: --image '{empty}/none.png': no such file."),
            ([*EDIT, "--image", "{folder}/llm_config.json"], "error: --image '{folder}/llm_config.json': not an "
             "image file PIL can read"),
            ([*T2I, "--devices", "cpu:0"], "error: --devices: 'cpu:0' is not valid; use 'cpu:N' with N from 1"),
            ([*T2I, "--devices", "gpu1"], "error: --devices: 'gpu1' is not valid; use 'all', 'cpu:N', or GPU ids"),
            ([*T2I, "--devices", "cpu:2", "--split", "2x2"], "error: --split: '2x2' needs 4 workers; the pool has 2. "
             "(--devices cpu:2)"),
            ([*T2I, "--split", "1x2"], "error: --split 1x2: splits the workers of a pool; give --devices a pool"),
            ([*T2I, "--devices", "cpu:2", "--weight-dtype", "fp8_e4m3fn_fast"], "error: MODEL_DIR '{folder}' / "
             "--devices cpu:2 / --split auto: weight dtype fp8_e4m3fn_fast needs FP8 tensor cores"),
            ([*T2I, "--out", "{empty}/no/such/folder.png"], "error: --out '{empty}/no/such/folder.png': the folder"),
            ([*T2I, "--seed", "-1"], "error: argument --seed: -1 is not a seed from 0 to 18446744073709551615"),
        ],
    )  # fmt: skip
    def test_bad_input_is_one_line_and_exit_code_2(self, folder, tmp_path, monkeypatch, capsys, argv, message):
        monkeypatch.chdir(tmp_path)
        fill = {"folder": folder, "empty": str(tmp_path)}
        assert bagel(*(a.format(**fill) for a in argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith(message.format(**fill)) and err.count("\n") == 1, err
        assert os.listdir(tmp_path) == []  # nothing written

    def test_a_bad_size_is_refused_before_the_model_loads(self, folder, monkeypatch, capsys):
        cli = sys.modules["bagel_vae_pp.bagel.cli"]
        monkeypatch.setattr(cli, "load_bagel", lambda *a, **k: pytest.fail("the model was loaded"))
        monkeypatch.setattr(cli, "PoolRunner", lambda *a, **k: pytest.fail("a pool was started"))
        for devices in ("in-process", "cpu:2"):
            assert bagel("text-to-image", folder, "--prompt", "x", "--width", 40, "--devices", devices) == 2
            assert capsys.readouterr().err.startswith("error: --width is 40; it must be a multiple of 16")
