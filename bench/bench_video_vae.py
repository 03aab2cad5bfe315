"""GPU benchmark: a video VAE through the worker pool against ComfyUI's own VAE Decode / Encode, on one card.

For each size: the fp32 reference (ComfyUI's `comfy.sd.VAE` in fp32 when --comfyui is given, else our own fp32
single-process module), ComfyUI's VAE in the bench dtype as core VAE Decode runs it (`VAE.decode`: latent in,
IMAGE frames out on the CPU), our engine in-process, and the pool (CPU latent in, CPU frames out, as the node sees
it). Median of --repeat after one warm-up; peak = the caching allocator's max reserved in the process that ran it
(the pool's worker reports its own). Random seeded weights of the full architecture; the latent is seeded noise.

    python bench/bench_video_vae.py --arch wan2.1 --sizes 832x480,1280x720 --frames 81 --comfyui /path/to/ComfyUI
    python bench/bench_video_vae.py --arch wan2.2 --sizes 1280x704 --frames 121 --comfyui ... --json out.jsonl

--profile W×H prints the top CUDA kernels of ours and core's raw decode of 3 latent frames instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.cli import RANDOM_VAES, errors  # noqa: E402
from bagel_vae_pp.pool import PoolSpec, WorkerPool  # noqa: E402
from bagel_vae_pp.vae_kinds import in_memory_format  # noqa: E402
from bagel_vae_pp.video_jobs import DECODE_STEP_SWITCH  # noqa: E402
from bagel_vae_pp.video_layout import to_layout  # noqa: E402
from bagel_vae_pp.worker import CUDNN_BENCHMARK_SWITCH  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def import_comfy(path: str, device):
    """ComfyUI's comfy.sd from a checkout, without its startup (its default options; --cpu for a CPU run)."""
    sys.path.insert(0, os.path.abspath(path))
    argv, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if device.type == "cpu" else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.sd

        return comfy.sd
    finally:
        sys.argv = argv


class TiledFallback(logging.Handler):
    """Notes whether ComfyUI's VAE.decode ran out of memory and retried tiled (it only logs a warning)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record) -> None:
        self.seen |= "tiled" in record.getMessage()

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)


class Core:
    """ComfyUI's VAE as its VAE Loader builds it from the state dict; decode/encode as core's nodes call them."""

    def __init__(self, comfy_sd, sd: dict, dtype: torch.dtype):
        self.vae = comfy_sd.VAE(sd=sd, dtype=dtype)
        self.name = f"ComfyUI VAE {self.vae.vae_dtype}"

    @torch.inference_mode()  # as ComfyUI's executor runs every node: without it autograd keeps every activation
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with TiledFallback() as watch:
            images = self.vae.decode(latent)
        self.went_tiled = watch.seen
        return images.reshape(-1, *images.shape[-3:])  # VAEDecode flattens [B, T, H, W, 3]

    @torch.inference_mode()
    def raw_decode(self, latent: torch.Tensor) -> torch.Tensor:
        """ComfyUI's model on the whole latent, without VAE.decode's tiled retry: the reference must not be tiled."""
        self.vae.patcher.model.to(self.vae.device)
        x = self.vae.first_stage_model.decode(latent.to(self.vae.device, self.vae.vae_dtype))
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1).cpu()

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(frames)


class Ours:
    """Our single-process module in-process (the engine without the pool), NCDHW or NDHWC (as GPU workers run)."""

    def __init__(self, ae, dtype: torch.dtype, device, ndhwc: bool = False):
        model = copy.deepcopy(ae).to(device, dtype)
        self.model = in_memory_format(model, torch.channels_last) if ndhwc else model
        self.dtype, self.device, self.ndhwc = dtype, device, ndhwc
        self.name = f"engine in-process {'NDHWC' if ndhwc else 'NCDHW'} {dtype}"

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.model.decode(to_layout(latent.to(self.device, self.dtype), self.ndhwc))  # [B, 3, T, H, W]
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1).cpu()

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.to(self.device).permute(3, 0, 1, 2)[None] * 2 - 1
        return self.model.encode(to_layout(x.to(self.dtype), self.ndhwc)).float().cpu()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, arg, repeat: int, device):
    """(last result, median ms of `repeat` runs after one warm-up (0: the one run), peak GiB reserved here)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    for _ in range(repeat + 1):
        out = None
        sync(device)
        start = time.perf_counter()
        out = fn(arg)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0
    return out, 1000 * statistics.median(times[1:] or times), peak


def parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def profile(ae, comfy_sd, size, dtype, device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    w, h = size
    s = ae.params.downscale
    latent = torch.randn(1, ae.params.z_channels, 3, h // s, w // s, generator=torch.Generator().manual_seed(0))
    runners = [Ours(ae, dtype, device), Ours(ae, dtype, device, ndhwc=True)]
    if comfy_sd is not None:
        runners.append(Core(comfy_sd, ae.state_dict(), dtype))
    for r in runners:
        r.decode(latent)  # warm-up
        sync(device)
        cuda = device.type == "cuda"
        with prof(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as p:
            r.decode(latent)
            sync(device)
        print(f"== {r.name}, {w}x{h}, 3 latent frames")
        print(p.key_averages().table(sort_by=f"{device.type}_time_total", row_limit=18, max_name_column_width=70))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wan2.1", choices=[a for a in RANDOM_VAES if a != "flux"])
    p.add_argument("--sizes", default="832x480,1280x720", help="W x H, comma-separated")
    p.add_argument("--frames", type=int, default=81, help="output frames (1 + 4k)")
    p.add_argument("--ops", default="decode", help="decode, encode or both")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--comfyui", default=None, help="a ComfyUI checkout: time its VAE and use it as fp32 reference")
    p.add_argument("--skip", default="", help="comma-separated rows to leave out: ref, core, engine, pool")
    p.add_argument("--profile", default=None, help="W x H: profile one short decode of ours and core's instead")
    p.add_argument("--json", default=None, help="append one JSON line per row")
    p.add_argument("--device", default="cuda:0", help="cpu: a smoke run of the script itself")
    p.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN time its conv algorithms, here and in the worker"
    )
    p.add_argument(
        "--wan-decode-frames", type=int, default=1, help="the pool's latent frames per Wan decode chunk (default 1)"
    )
    args = p.parse_args()
    os.environ[DECODE_STEP_SWITCH] = str(args.wan_decode_frames)  # read by the worker at each job
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        os.environ[CUDNN_BENCHMARK_SWITCH] = "1"
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    comfy_sd = import_comfy(args.comfyui, device) if args.comfyui else None
    ae = RANDOM_VAES[args.arch]().float()
    if args.profile:
        profile(ae, comfy_sd, parse_size(args.profile), dtype, device)
        return
    skip = set(args.skip.split(","))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    info["wan_decode_frames"] = args.wan_decode_frames
    print(json.dumps(info), flush=True)
    sd, s, zc = ae.state_dict(), ae.params.downscale, ae.params.z_channels
    pool = WorkerPool(PoolSpec.parse(str(device.index or 0) if device.type == "cuda" else "cpu", args.dtype, 600))
    rows = []
    try:
        for w, h in map(parse_size, args.sizes.split(",")):
            t = 1 + (args.frames - 1) // 4
            latent = torch.randn(1, zc, t, h // s, w // s, generator=torch.Generator().manual_seed(0))
            frames = None
            for op in args.ops.split(","):
                base = {**info, "arch": args.arch, "op": op, "size": f"{w}x{h}", "frames": 1 + 4 * (t - 1)}
                ref_runner = Core(comfy_sd, sd, torch.float32) if comfy_sd else Ours(ae, torch.float32, device)
                ref_decode = ref_runner.raw_decode if comfy_sd else ref_runner.decode
                if op == "encode" and frames is None:
                    frames = ref_decode(latent)  # realistic pixels: the reference decode of the latent
                data = latent if op == "decode" else frames
                ref, ms, peak = timed(ref_decode if op == "decode" else ref_runner.encode, data, 0, device)
                del ref_runner
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"fp32 reference ({'ComfyUI' if comfy_sd else 'engine'}) {op} {w}x{h}: {ms:.0f} ms", flush=True)
                if op == "decode":
                    frames = ref
                runners = []
                if comfy_sd is not None and "core" not in skip:
                    runners.append(lambda: Core(comfy_sd, sd, dtype))
                if "engine" not in skip:
                    runners.append(lambda: Ours(ae, dtype, device))
                    runners.append(lambda: Ours(ae, dtype, device, ndhwc=True))
                for make in runners:
                    try:  # one failing row (out of memory, say) leaves the others their say
                        r = make()
                        out, ms, peak = timed(getattr(r, op), data, args.repeat, device)
                    except Exception as e:
                        print(f"{op} {w}x{h}: {type(e).__name__}: {e}", flush=True)
                        continue
                    row = {**base, "impl": r.name, "ms": ms, "peak_gib": peak, **errors(out, ref)}
                    if getattr(r, "went_tiled", False):
                        row["impl"] += " (ran out of memory, retried tiled)"
                    rows.append(emit(row, args))
                    del r, out
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if "pool" not in skip:
                    run = pool.decode if op == "decode" else pool.encode
                    walls = []
                    for _ in range(args.repeat + 1):
                        start = time.perf_counter()
                        out = run(ae, data)
                        walls.append(time.perf_counter() - start)
                    peak = max(r.get("peak_bytes", 0) for r in pool.last_replies) / 2**30
                    row = {**base, "impl": "pool, 1 worker", "ms": 1000 * statistics.median(walls[1:])}
                    rows.append(emit({**row, "peak_gib": peak, **errors(out, ref)}, args))
                    del out
    finally:
        pool.shutdown()
    print("| arch | op | size | frames | impl | ms | peak GiB | max abs err | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['op']} | {r['size']} | {r['frames']} | {r['impl']} | {r['ms']:.0f} "
            f"| {r['peak_gib']:.2f} | {r['max_abs_err']:.2e} | {r['max_rel_err']:.2e} |"
        )


def emit(row: dict, args) -> dict:
    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
