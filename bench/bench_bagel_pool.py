"""GPU benchmark: BAGEL text to image through the worker pool against the same checkpoint in this process.

One run on one machine: the pool first (so this process's resident memory shows what the host holds while the
workers hold the model), then in-process. Reports seconds per generation, the ratio, the host's peak resident
memory, and each worker's peak device memory. The checkpoint is a random full-size one written once to --folder
(29 GB in bf16) unless the folder holds one already.

    python bench/bench_bagel_pool.py --folder /tmp/bagel-random --devices 0 --size 1024 --steps 50

`--devices 0,0 --split 1x2` places two workers on GPU 0 (gloo, tensor parallel 2): the TP code path at full size
on one card. `--save-latent` / `--compare-latent` compare two runs' final latents (e.g. TP 2 against 1 worker).
`--weight-dtype fp8_e4m3fn` stores the decoder layers in FP8 on the workers and in-process alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.autoencoder import random_autoencoder  # noqa: E402
from bagel_vae_pp.bagel.loader import load_bagel  # noqa: E402
from bagel_vae_pp.bagel.pipeline import text_to_image  # noqa: E402
from bagel_vae_pp.bagel.quantize import WEIGHT_DTYPES  # noqa: E402
from bagel_vae_pp.bagel.sampler import DEFAULT_GUIDANCE  # noqa: E402
from bagel_vae_pp.bagel.tiny import CONFIGS, config_files, random_bagel, tokenizer_files  # noqa: E402
from bagel_vae_pp.bagel_job import load_on_pool  # noqa: E402
from bagel_vae_pp.inputs import parse_devices  # noqa: E402
from bagel_vae_pp.pool import PoolSpec, get_pool, shutdown_all  # noqa: E402

DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the script on a small config


def write_random_checkpoint(folder: str, config: str) -> None:
    """A random BAGEL of `config`'s sizes in the real layout, made on the GPU in bf16 (no fp32 copy anywhere)."""
    params = CONFIGS[config]
    os.makedirs(folder, exist_ok=True)
    for name, content in {**config_files(params), **tokenizer_files()}.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(content if isinstance(content, str) else json.dumps(content, indent=2))
    model = random_bagel(params, 0, device=DEVICE, dtype=torch.bfloat16)
    save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "ema.safetensors"))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    save_file(random_autoencoder("tiny", seed=0).state_dict(), os.path.join(folder, "ae.safetensors"))


def host_rss_gib() -> tuple[float, float]:
    """(resident now, peak resident) of this process, GiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))


def timed(model, tokenizer, args, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds of one generation with the app's text-to-image guidance, and its latent."""
    options = dataclasses.replace(DEFAULT_GUIDANCE["text_to_image"], num_timesteps=steps)
    start = time.perf_counter()
    latent, _ = text_to_image(model, tokenizer, "a red fox in snow", args.size, args.size, 7, options)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(time.perf_counter() - start, 3), latent


def pool_spec(devices: str) -> PoolSpec:
    """The pool of --devices; GPU ids named more than once put that many workers on the GPU (gloo)."""
    ids = [d.strip() for d in devices.split(",")]
    if len(set(ids)) == len(ids):
        return PoolSpec.parse(devices, "bf16", 600)
    found = [parse_devices(i, torch.cuda.device_count())[0] for i in ids]
    return PoolSpec(tuple(found), "bf16", 600.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="checkpoint folder (written with random weights if empty)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="7b-mot")
    parser.add_argument("--devices", default="0", help="the pool's devices; an id twice: two workers on that GPU")
    parser.add_argument("--split", default="auto", help="GROUPSxTP (bagel/split.py) or auto")
    parser.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="bf16")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--save-latent", help="write the pool's final latent here (torch.save)")
    parser.add_argument("--compare-latent", help="report the max relative difference to this saved latent")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.folder, "ema.safetensors")):
        start = time.perf_counter()
        write_random_checkpoint(args.folder, args.config)
        print(f"wrote {args.folder} in {time.perf_counter() - start:.0f} s", flush=True)
    result = {"config": args.config, "devices": args.devices, "weight_dtype": args.weight_dtype, "size": args.size,
              "steps": args.steps,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}  # fmt: skip
    pool = get_pool(pool_spec(args.devices))
    start = time.perf_counter()
    loaded = load_on_pool(pool, args.folder, "bf16", weight_dtype=args.weight_dtype, split=args.split)
    result["pool_load_s"], result["split"] = round(time.perf_counter() - start, 1), str(loaded.model.split)
    if args.warmup_steps:
        timed(loaded.model, loaded.tokenizer, args, args.warmup_steps)
    result["pool_s"], pool_latent = timed(loaded.model, loaded.tokenizer, args, args.steps)
    result["host_rss_gib"], result["host_peak_rss_gib"] = (round(x, 2) for x in host_rss_gib())
    result["worker_peak_gib"] = [b and round(b / 2**30, 2) for b in loaded.model.peak_bytes()]
    if args.save_latent:
        torch.save(pool_latent, args.save_latent)
    if args.compare_latent:
        other = torch.load(args.compare_latent)
        result["vs_saved_latent_max_rel_diff"] = float((pool_latent - other).abs().max() / other.abs().max())
    print(json.dumps(result), flush=True)
    shutdown_all()
    if not args.skip_in_process:
        local = load_bagel(args.folder, DEVICE, torch.bfloat16, weight_dtype=args.weight_dtype)
        if args.warmup_steps:
            timed(local.model, local.tokenizer, args, args.warmup_steps)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result["in_process_s"], latent = timed(local.model, local.tokenizer, args, args.steps)
        if torch.cuda.is_available():
            result["in_process_peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        result["pool_over_in_process"] = round(result["pool_s"] / result["in_process_s"], 4)
        result["latent_max_rel_diff"] = float((pool_latent - latent).abs().max() / latent.abs().max())
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
