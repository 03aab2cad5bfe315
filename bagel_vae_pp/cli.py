"""`python -m bagel_vae_pp bench`: time the single-process VAE against the worker pool, and check exactness;
`python -m bagel_vae_pp bagel ...`: BAGEL without ComfyUI (bagel/cli.py).

With no `--vae` the model is a seeded random-weight autoencoder of the full `--vae-arch` architecture (FLUX, or
a Wan 2.1 / 2.2 or HunyuanVideo video VAE on a `--frames` video), so the bench runs anywhere. Errors are
max |x - ref| (abs) and that divided by max |ref| (rel), against the single-process fp32 full-image result on
the same input.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from .autoencoder import random_autoencoder
from .bagel.cli import add_bagel_parser, run_bagel
from .hunyuan_video import random_hunyuan_video
from .ltx_video import LTXVideoVAE, random_ltx_video
from .pool import PoolSpec, WorkerError, get_pool, shutdown_all
from .vae_kinds import is_video, vae_from_state_dict
from .wan import random_wan
from .wan22 import random_wan22

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANDOM_VAES = {
    "flux": lambda: random_autoencoder("flux"),
    "wan2.1": lambda: random_wan("wan2.1"),
    "wan2.2": lambda: random_wan22("wan2.2"),
    "hunyuan-video": lambda: random_hunyuan_video("hunyuan-video"),
    "ltx-video": lambda: random_ltx_video(0),  # version 0, the smallest (0.4 G parameters; 1 and 2: 0.9 and 1.2 G)
}


def test_image(size: int, batch: int = 1, phase: float = 0.0) -> torch.Tensor:
    """A smooth synthetic picture (gradients, a disc, stripes) as an IMAGE [B, H, W, 3] in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).float()
    stripes = 0.5 + 0.5 * torch.sin(40 * x + 10 * y + phase)
    img = torch.stack([0.8 * x + 0.2 * disc, 0.5 * y + 0.5 * disc * stripes, 1 - 0.7 * x * y], dim=-1)
    return img.clamp(0, 1)[None].repeat(batch, 1, 1, 1)


def test_video(size: int, frames: int) -> torch.Tensor:
    """test_image with its stripes moving from frame to frame: the frames of one video, an IMAGE [T, H, W, 3]."""
    return torch.cat([test_image(size, 1, 0.3 * t) for t in range(frames)])


def load_vae(path: str | None, arch: str = "flux"):
    """The VAE in a .safetensors file (any kind the pool runs), or a random one of `arch`; every refusal names the
    file. Pickle checkpoints are never opened."""
    if path is None:
        return RANDOM_VAES[arch]()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.endswith(".safetensors"):
        raise ValueError(
            f"--vae: '{path}' is not a .safetensors file; pickle checkpoints (.ckpt, .pt, .bin) are never loaded "
            "because unpickling runs code. Convert it to safetensors first."
        )
    try:
        sd = load_file(path)  # parses a JSON header and maps raw tensors: nothing in the file is executed
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"--vae: '{path}' is not a readable safetensors file ({e}); it may be truncated (download it again) "
            "or be another format under a .safetensors name."
        ) from e
    try:
        return vae_from_state_dict(sd)
    except ValueError as e:
        raise ValueError(f"--vae: '{path}': {e}") from e


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float()).abs().max().item()
    return {"max_abs_err": diff, "max_rel_err": diff / max(ref.float().abs().max().item(), 1e-12)}


def timed(fn, repeat: int, device: torch.device):
    times, result = [], None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return result, 1000 * statistics.median(times)


def single_process(ae, op, data, device, dtype, model=None, seed=0):
    """The plain full-image forward in this process, in ComfyUI's layouts, as the reference path.

    Runs on a copy (or on `model`, a copy made earlier): casting `ae` itself to bf16 and back would round the
    weights that the pool gets next.
    """
    model = model or copy.deepcopy(ae).to(device, dtype)
    with torch.inference_mode():
        if op == "decode":
            noise = {"seed": seed} if isinstance(model, LTXVideoVAE) else {}  # the one VAE that draws noise
            x = model.decode(data.to(device, dtype), **noise)
            if x.ndim == 5:  # [B, 3, T, H, W]: the frames one video after the other, as core VAE Decode gives them
                x = x.transpose(1, 2).flatten(0, 1)
            return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        x = data.to(device).permute(0, 3, 1, 2) * 2 - 1
        if is_video(ae.params):  # the IMAGE batch is one video's frames: [1, 3, T, H, W]
            x = x.transpose(0, 1)[None]
        return model.encode(x.to(dtype)).float().cpu()


def bench_op(ae, op, data, args, device) -> list[dict]:
    """Single process (full image, in --dtype) and the pool, both against the single-process fp32 result."""
    ref = single_process(ae, op, data, device, torch.float32, seed=args.seed)
    base = {"op": op, "size": args.size, "batch": args.batch, "frames": args.frames, "dtype": args.dtype}
    base["device"] = args.device
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the peak is what the allocator holds: start from nothing cached
        torch.cuda.reset_peak_memory_stats(device)
    model = copy.deepcopy(ae).to(device, DTYPES[args.dtype])
    out, ms = timed(
        lambda: single_process(ae, op, data, device, DTYPES[args.dtype], model, args.seed), args.repeat, device
    )
    peak = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    rows = [{**base, "mode": "full", "workers": 1, "ms": ms, "peak_gib": peak, **errors(out, ref)}]
    pool = get_pool(PoolSpec.parse(pool_devices(args), args.dtype, args.timeout_s))
    run = pool.decode if op == "decode" else pool.encode
    kwargs = {"mode": args.mode, "tile_px": args.tile, "overlap_px": args.overlap}
    kwargs |= {"temporal_size": args.temporal_size, "temporal_overlap": args.temporal_overlap}
    if op == "decode":
        kwargs["seed"] = args.seed
    run(ae, data, **kwargs)  # warm-up: starts workers, sends weights
    out, ms = timed(lambda: run(ae, data, **kwargs), args.repeat, torch.device("cpu"))
    peaks = [r.get("peak_bytes") for r in pool.last_replies]
    peak = max(peaks) / 2**30 if all(p is not None for p in peaks) else None
    rows.append(
        {**base, "mode": args.mode, "workers": len(pool.spec.devices), "ms": ms, "peak_gib": peak, **errors(out, ref)}
    )
    return rows


def bench(args) -> list[dict]:
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    ae = load_vae(args.vae, args.vae_arch).float()
    if args.size % ae.params.downscale:
        raise ValueError(f"--size {args.size}: this VAE needs a multiple of {ae.params.downscale} pixels.")
    video = is_video(ae.params)
    args.frames = args.frames if video else 1
    if video and args.batch != 1:
        raise ValueError(f"--batch {args.batch}: a video VAE bench runs one video; set its length with --frames.")
    pixels = test_video(args.size, args.frames) if video else test_image(args.size, args.batch)
    latent = single_process(ae, "encode", pixels, device, torch.float32)
    return bench_op(ae, "decode", latent, args, device) + bench_op(ae, "encode", pixels, args, device)


def pool_devices(args) -> str:
    if args.devices:
        return args.devices
    return f"cpu:{args.workers}" if args.device == "cpu" else ",".join(map(str, range(args.workers)))


def print_table(rows: list[dict]) -> None:
    print("| op | mode | workers | size | frames | dtype | ms | peak GiB/worker | max abs err | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(
            f"| {r['op']} | {r['mode']} | {r['workers']} | {r['size']} | {r['frames']} | {r['dtype']} | {r['ms']:.1f} "
            f"| {peak} | {r['max_abs_err']:.2e} | {r['max_rel_err']:.2e} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bagel_vae_pp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="single process vs worker pool: time, memory, error")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--workers", type=int, default=2, help="pool size (GPUs 0..N-1, or N CPU processes)")
    b.add_argument("--devices", default=None, help="explicit pool devices, e.g. '0,2' (overrides --workers)")
    b.add_argument("--size", type=int, default=None, help="image side in pixels (default 256 on CPU, 1024 on GPU)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    b.add_argument("--mode", choices=["exact", "tiled"], default="exact")
    b.add_argument("--tile", type=int, default=512, help="tiled mode: tile side in pixels")
    b.add_argument("--overlap", type=int, default=64, help="tiled mode: overlap in pixels")
    b.add_argument("--temporal-size", type=int, default=64, help="tiled mode, video VAEs: frames per temporal tile")
    b.add_argument("--temporal-overlap", type=int, default=8, help="tiled mode, video VAEs: frames of overlap")
    b.add_argument("--seed", type=int, default=0, help="LTX-Video VAE: the seed of its decode noise")
    b.add_argument("--repeat", type=int, default=3, help="timed runs per case (median reported)")
    b.add_argument("--timeout-s", type=float, default=120.0)
    b.add_argument("--vae", default=None, help="a VAE .safetensors file (default: a random VAE of --vae-arch)")
    b.add_argument("--vae-arch", choices=list(RANDOM_VAES), default="flux", help="the random VAE's architecture")
    b.add_argument("--frames", type=int, default=5, help="video VAEs: frames of the test video (1 + 4k are all used)")
    b.add_argument("--json", action="store_true", help="one JSON object per line per case")
    add_bagel_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bagel":
        return run_bagel(args)
    args.size = args.size or (1024 if args.device == "cuda" else 256)
    if args.size % 8:
        parser.error(f"--size must be a multiple of 8, got {args.size}")
    if args.frames < 1:
        parser.error(f"--frames must be at least 1, got {args.frames}")
    try:
        rows = bench(args)
    except (WorkerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_all()
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print_table(rows)
    failed = inexact(rows)
    for r in failed:
        print(f"exactness check failed: {r['op']} through the pool is off by {r['max_rel_err']:.2e}", file=sys.stderr)
    return 1 if failed else 0


def inexact(rows: list[dict]) -> list[dict]:
    """Exact-mode pool rows further from the fp32 reference than the bound: 1e-4 relative in fp32; in bf16/fp16,
    1.25x the single-process module's own rounding error in that dtype (or 1e-4, whichever is larger)."""
    full = {r["op"]: r["max_rel_err"] for r in rows if r["mode"] == "full"}
    return [
        r
        for r in rows
        if r["mode"] == "exact"
        and r["max_rel_err"] > (1e-4 if r["dtype"] == "fp32" else max(1e-4, 1.25 * full[r["op"]]))
    ]
