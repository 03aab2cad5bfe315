"""`python -m bagel_vae_pp bagel ...`: BAGEL text to image, edit and understanding without ComfyUI.

The same engine calls and defaults as the BAGEL nodes (DEFAULT_GUIDANCE and the pipeline's DEFAULT_* values):
text-to-image and edit write the final LATENT (raw VAE space, key `samples`, safetensors) and the PNG decoded by
the checkpoint's own ae.safetensors on the model's device, as core VAE Decode would (pixels (x + 1) / 2 clamped
to [0, 1], then 8-bit). Understanding prints the answer. Bad input is one line on stderr and exit code 2;
Ctrl-C is exit code 130. Where BAGEL runs comes from `runner_for(devices)`: in this process, or a worker pool.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from dataclasses import replace

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..inputs import parse_devices
from .images import pil_to_unit, to_pil
from .loader import DTYPES, REQUIRED_FILES, VAE_LOCATIONS, find_vae_file, load_bagel, read_folder_params
from .pipeline import (
    DEFAULT_IMAGE_SIDE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_THINK_TOKENS,
    autoencoder_moments,
    check_image_size,
    edit_image,
    text_to_image,
    understand_image,
)
from .quantize import WEIGHT_DTYPES
from .sampler import DEFAULT_GUIDANCE, RENORM_TYPES, GuidanceOptions
from .split import parse_split

IN_PROCESS = "in-process"
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # torch.Generator.manual_seed takes 64 bits
# CLI option -> GuidanceOptions field; each is checked alone so that a refusal names its option.
GUIDANCE_OPTIONS = {
    "steps": "num_timesteps",
    "timestep_shift": "timestep_shift",
    "cfg_text_scale": "cfg_text_scale",
    "cfg_img_scale": "cfg_img_scale",
    "cfg_interval": "cfg_interval",
    "cfg_renorm_type": "cfg_renorm_type",
    "cfg_renorm_min": "cfg_renorm_min",
    "step_cache": "step_cache",
}


class UsageError(ValueError):
    """Bad input from the command line: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are one line (no usage block), like the run-time refusals."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class InProcessRunner:
    """BAGEL on one device of this process (the first GPU, else the CPU), as the nodes run it: whole, or within
    `vram_budget_gib` of it with the decoder layers that do not fit streamed from CPU memory."""

    def __init__(self, folder: str, dtype: str, weight_dtype: str, vram_budget_gib: float | None = None):
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        budget = None if vram_budget_gib is None else int(vram_budget_gib * 2**30)
        try:
            self.loaded = load_bagel(folder, device, dtype, weight_dtype=weight_dtype, device_budget_bytes=budget)
        except (ValueError, SafetensorError, OSError) as e:
            raise UsageError(f"MODEL_DIR {folder!r}: {e}") from e

    def text_to_image(self, prompt, width, height, seed, options, think, max_think_tokens, progress, interrupt):
        b = self.loaded
        return text_to_image(b.model, b.tokenizer, prompt, width, height, seed, options, think, max_think_tokens,
                             progress, interrupt)  # fmt: skip

    def edit(self, image, prompt, seed, options, think, max_think_tokens, progress, interrupt):
        b = self.loaded
        return edit_image(b.model, b.tokenizer, image, prompt, autoencoder_moments(b.vae), seed, options, think,
                          max_think_tokens, progress, interrupt)  # fmt: skip

    def understand(self, image, prompt, max_new_tokens, temperature, seed, think, progress, interrupt):
        b = self.loaded
        return understand_image(b.model, b.tokenizer, image, prompt, max_new_tokens, temperature, seed, think,
                                progress, interrupt)  # fmt: skip

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent [1, z, h, w] -> image [8h, 8w, 3] in [0, 1], fp32 CPU, with the checkpoint's autoencoder."""
        vae = self.loaded.vae
        x = vae.decode(latent.to(vae.decoder.conv_in.weight))  # [1, 3, 8h, 8w] in [-1, 1]
        return ((x[0].float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu()


class PoolRunner(InProcessRunner):
    """BAGEL held by a worker pool, its workers split into CFG groups × tensor parallel as --split says
    (bagel_job.PoolBagel). This process keeps the tokenizer and the autoencoder (fp32, CPU) for the edit's
    conditioning encode; the final latent is decoded through the same pool."""

    def __init__(self, folder: str, dtype: str, weight_dtype: str, devices: str, split: str = "auto"):
        from ..bagel_job import load_on_pool
        from ..pool import PoolSpec, get_pool

        try:
            self.pool = get_pool(PoolSpec.parse(devices, dtype))
            self.loaded = load_on_pool(self.pool, folder, self.pool.spec.dtype, weight_dtype=weight_dtype, split=split)
        except (ValueError, SafetensorError, OSError) as e:
            raise UsageError(f"MODEL_DIR {folder!r} / --devices {devices} / --split {split}: {e}") from e

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        self.loaded.model.release()  # the generation is done: free its contexts in the workers
        return self.pool.decode(self.loaded.vae, latent)[0]

    def understand(self, *args):
        try:
            return super().understand(*args)
        finally:
            self.loaded.model.release()


def runner_for(devices: str, split: str = "auto", vram_budget_gib: float | None = None):
    """The runner for --devices, --split and --vram-budget: called as runner(folder, dtype, weight_dtype), it
    loads the checkpoint."""
    if devices == IN_PROCESS:
        if split != "auto":
            raise UsageError(f"--split {split}: splits the workers of a pool; give --devices a pool (cpu:N, all, ids).")
        return functools.partial(InProcessRunner, vram_budget_gib=vram_budget_gib)
    if vram_budget_gib is not None:
        raise UsageError(f"--vram-budget applies to --devices {IN_PROCESS}; a worker pool splits BAGEL instead.")
    try:
        workers = len(parse_devices(devices, torch.cuda.device_count()))
    except ValueError as e:
        raise UsageError(f"--devices: {str(e).removeprefix('devices: ')}") from e
    try:
        parse_split(split, workers)
    except ValueError as e:
        raise UsageError(f"--split: {str(e).removeprefix('split: ')} (--devices {devices})") from e
    return functools.partial(PoolRunner, devices=devices, split=split)


def check_model_dir(folder: str) -> None:
    """Refuse, before loading anything, a folder without the checkpoint files; names the ones missing."""
    if not os.path.isdir(folder):
        raise UsageError(f"MODEL_DIR {folder!r} is not a folder; give a BAGEL-7B-MoT checkpoint folder.")
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, name))]
    if find_vae_file(folder) is None:
        missing.append(" or ".join(VAE_LOCATIONS))
    if missing:
        raise UsageError(
            f"MODEL_DIR {folder!r} is not a BAGEL checkpoint: it lacks {', '.join(missing)}. Download "
            "ByteDance-Seed/BAGEL-7B-MoT (all *.json, *.safetensors, *.txt) into it."
        )


def check_out_path(option: str, path: str | None) -> None:
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder and not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: the folder {folder!r} does not exist.")


def guidance_options(args, mode: str) -> GuidanceOptions:
    """The mode's defaults with the options given, each checked by the engine on its own (naming the option)."""
    options = DEFAULT_GUIDANCE[mode]
    for option, field in GUIDANCE_OPTIONS.items():
        value = getattr(args, option)
        if value is None:
            continue
        try:
            options = replace(options, **{field: tuple(value) if option == "cfg_interval" else value})
        except ValueError as e:
            raise UsageError(f"--{option.replace('_', '-')}: {e}") from e
    return options


def load_image(path: str) -> torch.Tensor:
    """An image file -> [H, W, 3] in [0, 1], as ComfyUI's Load Image gives it (EXIF orientation applied, RGB)."""
    try:
        with Image.open(path) as image:
            return pil_to_unit(ImageOps.exif_transpose(image).convert("RGB"))
    except FileNotFoundError as e:
        raise UsageError(f"--image {path!r}: no such file.") from e
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--image {path!r}: not an image file PIL can read ({e}).") from e


def print_progress(label: str):
    def progress(done: int, total: int) -> None:
        print(f"{label} {done}/{total}", file=sys.stderr, flush=True)

    return progress


def write_outputs(runner, latent: torch.Tensor, thinking: str, args) -> None:
    if args.latent:
        save_file({"samples": latent.contiguous()}, args.latent)
        print(f"wrote {args.latent}", file=sys.stderr)
    out = args.out or f"bagel_{args.seed}.png"
    to_pil(runner.decode(latent)).save(out)
    print(f"wrote {out}", file=sys.stderr)
    if thinking:
        print(thinking)


def run_text_to_image(runner, args, image: None) -> None:
    options = guidance_options(args, "text_to_image")
    latent, thinking = runner.text_to_image(args.prompt, args.width, args.height, args.seed, options, args.think,
                                            args.max_think_tokens, print_progress("step"), None)  # fmt: skip
    write_outputs(runner, latent, thinking, args)


def run_edit(runner, args, image: torch.Tensor) -> None:
    options = guidance_options(args, "edit")
    latent, thinking = runner.edit(image, args.prompt, args.seed, options, args.think,
                                   args.max_think_tokens, print_progress("step"), None)  # fmt: skip
    write_outputs(runner, latent, thinking, args)


def run_understand(runner, args, image: torch.Tensor) -> None:
    print(runner.understand(image, args.prompt, args.max_new_tokens, args.temperature, args.seed,
                            args.think, print_progress("token"), None))  # fmt: skip


MODES = {"text-to-image": run_text_to_image, "edit": run_edit, "understand": run_understand}


def check_size(args) -> None:
    """Fill in the default --width/--height and refuse a size the checkpoint can't draw, from its headers."""
    try:
        params = read_folder_params(args.model_dir)
    except (ValueError, SafetensorError, OSError) as e:
        raise UsageError(f"MODEL_DIR {args.model_dir!r}: {e}") from e
    side = min(DEFAULT_IMAGE_SIDE, params.max_image_size)  # the nodes' 1024 on the released checkpoint
    args.width, args.height = args.width or side, args.height or side
    try:
        check_image_size(args.width, args.height, params)
    except ValueError as e:
        raise UsageError(f"--{e}") from e  # the message starts with "width" or "height"


def check_inputs(args) -> torch.Tensor | None:
    """Refuse what can be refused without the model, before loading it; returns the --image pixels, if any."""
    check_model_dir(args.model_dir)
    if args.mode == "text-to-image":
        check_size(args)
    if args.mode in ("text-to-image", "edit"):
        guidance_options(args, args.mode.replace("-", "_"))
        check_out_path("--out", args.out)
        check_out_path("--latent", args.latent)
    return load_image(args.image) if args.mode in ("edit", "understand") else None


def run_bagel(args) -> int:
    """Run one `bagel` subcommand; returns the exit code (0, 2 for bad input, 130 for Ctrl-C).

    Ctrl-C raises KeyboardInterrupt at the next Python line, between two torch ops of a step, so the engine gets
    no interrupt callback here (the nodes need one: ComfyUI's Cancel is a flag).
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even where SIGINT came in ignored
    try:
        runner_class = runner_for(args.devices, args.split, args.vram_budget)
        image = check_inputs(args)
        MODES[args.mode](runner_class(args.model_dir, args.dtype, args.weight_dtype), args, image)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def seed_value(text: str) -> int:
    seed = int(text)
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{seed} is not a seed from 0 to {MAX_SEED}")
    return seed


def positive_gib(text: str) -> float:
    gib = float(text)
    if not gib > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of GiB")
    return gib


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a BAGEL-7B-MoT checkpoint folder")
    p.add_argument("--prompt", required=True, help="the text BAGEL follows (no chat template)")
    p.add_argument("--seed", type=seed_value, default=0, help="seeds the CPU generator (official draw order)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights and compute; the VAE stays fp32")
    p.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="bf16",
                   help="storage of the language model's layers, in this process or on each worker of a pool: "
                   "bf16, fp8_e4m3fn (computed in --dtype), fp8_e4m3fn_fast (FP8 GEMMs: bf16, GPUs of compute "
                   "capability 8.9+)")  # fmt: skip
    where = (
        f"{IN_PROCESS}: the first GPU, else the CPU; cpu:N, all or GPU ids 0,1,...: a worker pool, BAGEL split "
        "over its workers (see --split)"
    )
    p.add_argument("--devices", default=IN_PROCESS, help=where)
    split = (
        "a pool's workers as GROUPSxTP: CFG groups that run the guidance passes side by side, each of TP "
        "tensor-parallel workers (e.g. 2x2); auto: from free memory"
    )
    p.add_argument("--split", default="auto", help=split)
    p.add_argument("--vram-budget", type=positive_gib, metavar="GIB",
                   help=f"{IN_PROCESS} only: use at most GIB of the device; the language model's layers that do "
                   "not fit are streamed from CPU memory at each pass (slower)")  # fmt: skip
    p.add_argument("--think", action="store_true", help="let BAGEL reason in text first (printed)")


def add_generation(p: argparse.ArgumentParser, mode: str) -> None:
    d = DEFAULT_GUIDANCE[mode]
    p.add_argument(
        "--steps", type=int, help=f"schedule points, steps - 1 model evaluations (default {d.num_timesteps})"
    )
    p.add_argument(
        "--cfg-text-scale", type=float, help=f"text guidance; <= 1 turns guidance off (default {d.cfg_text_scale})"
    )
    p.add_argument("--cfg-img-scale", type=float, help=f"image guidance (default {d.cfg_img_scale})")
    p.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        metavar=("START", "END"),
        help=f"guidance where START < t <= END (default {d.cfg_interval[0]} {d.cfg_interval[1]})",
    )
    p.add_argument("--timestep-shift", type=float, help=f"schedule shift (default {d.timestep_shift})")
    p.add_argument("--cfg-renorm-type", help=f"{', '.join(RENORM_TYPES)} (default {d.cfg_renorm_type})")
    p.add_argument(
        "--cfg-renorm-min", type=float, help=f"renorm factor lower bound, 0 to 1 (default {d.cfg_renorm_min})"
    )
    cache = (
        "reuse the last velocity while the latent moved less than this (relative L1) and guidance did not switch: "
        "faster, changes the image (default 0 = off)"
    )
    p.add_argument("--step-cache", type=float, help=cache)
    p.add_argument("--max-think-tokens", type=int, default=DEFAULT_MAX_THINK_TOKENS, help="--think: planning tokens")
    p.add_argument("--out", help="the decoded PNG (default bagel_<seed>.png in the current folder)")
    p.add_argument("--latent", help="also write the final LATENT here (safetensors, key 'samples', raw VAE space)")


def add_bagel_parser(sub) -> None:
    """The `bagel` subcommand of `python -m bagel_vae_pp` (its subparsers action `sub`), with its three modes."""
    bagel = sub.add_parser("bagel", help="BAGEL text to image, edit, understanding (the nodes' engine and defaults)")
    modes = bagel.add_subparsers(dest="mode", required=True, parser_class=OneLineParser)
    t2i = modes.add_parser("text-to-image", help="draw an image from a prompt (the official app's guidance)")
    add_common(t2i)
    for side in ("width", "height"):
        t2i.add_argument(f"--{side}", type=int, help=f"multiple of 16 up to the checkpoint's limit (default "
                         f"{DEFAULT_IMAGE_SIDE}, or the limit if smaller)")  # fmt: skip
    add_generation(t2i, "text_to_image")
    edit = modes.add_parser("edit", help="edit an image following an instruction (the official edit guidance)")
    add_common(edit)
    edit.add_argument("--image", required=True, help="the image to edit (resized as the official app does)")
    add_generation(edit, "edit")
    understand = modes.add_parser("understand", help="answer a question about an image; prints the answer")
    add_common(understand)
    understand.add_argument("--image", required=True, help="the image to look at")
    understand.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="answer length limit")
    understand.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample with --seed")
