"""Time BAGEL text-to-image at full size with random weights built in memory (no 29 GB checkpoint needed).

    python bench/bench_bagel.py                          # 7b-mot, bf16, 1024x1024, 50 steps, app defaults, cuda:0
    python bench/bench_bagel.py --devices cuda:0,cuda:1  # CFG-parallel: each guidance pass on its own GPU
    python bench/bench_bagel.py --config tiny --devices cpu --size 64 --steps 4 --dtype fp32   # CPU check
    python bench/bench_bagel.py --weight-dtype fp8_e4m3fn   # decoder-layer Linears in FP8 (bagel/quantize.py)
    python bench/bench_bagel.py --memory-cap 24             # a 24 GiB card: layers that don't fit are streamed
    python bench/bench_bagel.py --config tiny --devices cpu --size 64 --steps 4 --dtype fp32 --resident-layers 0
    python bench/bench_bagel.py --passes sequential         # a step's guidance passes one after the other

Reports wall time of one generation (after a short warm-up run), model passes, and peak memory per GPU
(allocated and reserved). `--passes batched` (the default, as in-process) runs the guidance passes of a step
through each layer together (Bagel.velocities); `sequential` runs them one after the other. With --memory-cap the
model is built whole on the device, then its decoder layers that do not fit the cap are moved to pinned CPU memory
(bagel/stream.py), and the caching allocator is limited to the cap (torch.cuda.set_per_process_memory_fraction)
before the warm-up.
The prompt is a fixed block of `--prompt-tokens` token ids (content does not change the cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.bagel.config import CONFIGS  # noqa: E402
from bagel_vae_pp.bagel.loader import DTYPES  # noqa: E402
from bagel_vae_pp.bagel.model import Bagel, Context  # noqa: E402
from bagel_vae_pp.bagel.pipeline import batched_passes, sequential_passes, text_to_image  # noqa: E402
from bagel_vae_pp.bagel.quantize import WEIGHT_DTYPES, check_weight_dtype, quantize_llm_  # noqa: E402
from bagel_vae_pp.bagel.sampler import GuidanceOptions  # noqa: E402
from bagel_vae_pp.bagel.stream import fit_, stream_layers_  # noqa: E402
from bagel_vae_pp.bagel.tokenizer import SpecialTokens  # noqa: E402
from bagel_vae_pp.kernels import LAYER_FUSION_SWITCH  # noqa: E402


class SyntheticTokenizer:
    """Stands in for the Qwen2.5 tokenizer: every text is the same `n` ordinary token ids."""

    def __init__(self, n: int):
        self.special = SpecialTokens(151644, 151645, 151652, 151653)
        self.ids = [1000 + i for i in range(n)]

    def text_block(self, text: str) -> list[int]:
        return [self.special.bos, *self.ids, self.special.eos]


PASSES = {"batched": batched_passes, "sequential": sequential_passes}


class Passes:
    """A step's velocity passes, `batched` or `sequential` (pipeline.py) on each replica; with n replicas
    (CFG-parallel) pass k runs on replica k mod n, each replica's passes in its own thread, concurrently."""

    def __init__(self, models: list[Bagel], mode: str):
        self.models, self.mode = models, mode
        self.moved: dict[tuple[int, int], Context] = {}  # (id(ctx), replica) -> the context on that device
        self.executor = ThreadPoolExecutor(len(models)) if len(models) > 1 else None
        self.count = 0

    def context_on(self, ctx: Context, i: int) -> Context:
        if i == 0 or ctx.kv is None:
            return ctx
        key = (id(ctx), i)
        if key not in self.moved:
            dev = self.models[i].device
            self.moved[key] = Context(tuple((k.to(dev), v.to(dev)) for k, v in ctx.kv), ctx.length, ctx.rope)
        return self.moved[key]

    def run(self, i: int, contexts: list[Context], block: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            model = self.models[i]
            return PASSES[self.mode](model)([self.context_on(c, i) for c in contexts], block.to(model.device))

    def __call__(self, contexts: list[Context], block: torch.Tensor) -> list[torch.Tensor]:
        self.count += len(contexts)
        n = len(self.models)
        if n == 1:
            return self.run(0, contexts, block)
        futures = [self.executor.submit(self.run, i, contexts[i::n], block) for i in range(min(n, len(contexts)))]
        out: list[torch.Tensor] = [None] * len(contexts)
        for i, f in enumerate(futures):
            out[i::n] = [v.to(self.models[0].device) for v in f.result()]
        return out


def build_models(config: str, devices: list[str], dtype: torch.dtype, weight_dtype: str, seed: int) -> list[Bagel]:
    """Random-weight models, one per device; with an FP8 weight dtype the bf16 model is built whole, then its
    decoder Linears are quantized one by one (the build peaks at the bf16 size; timed peaks come after)."""
    from bagel_vae_pp.bagel.tiny import random_bagel

    models = []
    for d in devices:
        check_weight_dtype(weight_dtype, d, dtype)
        models.append(quantize_llm_(random_bagel(CONFIGS[config], seed, device=d, dtype=dtype), weight_dtype))
        if d.startswith("cuda"):
            torch.cuda.empty_cache()  # hand back the freed bf16 weights' blocks
    return models


def place(model: Bagel, device: str, cap_gib: float | None, resident: int | None) -> int | None:
    """Stream the model's decoder layers but `resident` of them, or as the plan for `cap_gib` of `device` says;
    then hold the caching allocator to the cap. Returns the number of resident layers (None: no plan asked)."""
    if resident is not None:
        stream_layers_(model, resident, device)
    elif cap_gib is not None:
        resident = fit_(model, device, int(cap_gib * 2**30))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the streamed layers' blocks
        if cap_gib is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
    return resident


def streamed_gib(model: Bagel) -> float:
    stream = model.language_model.model.stream
    return 0.0 if stream is None else round(stream.streamed_bytes() / 2**30, 3)


def parameter_gib(model: Bagel) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30


def synchronize(devices: list[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def generate(models, tokenizer, args, options, steps: int) -> tuple[float, int, torch.Tensor]:
    """Seconds, model passes and the final latent of one text to image."""
    passes = Passes(models, args.passes)
    run_options = dataclasses.replace(options, num_timesteps=steps)
    synchronize(args.devices)
    start = time.perf_counter()
    latent, _ = text_to_image(models[0], tokenizer, "prompt", args.size, args.size, 0, run_options, passes=passes)
    synchronize(args.devices)
    assert latent.shape == (1, 16, args.size // 8, args.size // 8) and torch.isfinite(latent).all()
    return time.perf_counter() - start, passes.count, latent


VARIANTS = ("sequential", "unfused")


def variant(name: str, models, tokenizer, args, options, main_latent: torch.Tensor) -> dict:
    """One more timed generation on the same model: a step's passes one after the other, or the layers' torch path."""
    env = os.environ.copy()
    if name == "unfused":
        os.environ[LAYER_FUSION_SWITCH] = "0"
    run_args = argparse.Namespace(**{**vars(args), "passes": "sequential" if name == "sequential" else args.passes})
    try:
        seconds, passes, latent = generate(models, tokenizer, run_args, options, args.steps)
    finally:
        os.environ.clear()
        os.environ.update(env)
    error = float((latent - main_latent).norm() / main_latent.norm())
    return {"seconds": round(seconds, 3), "ms_per_pass": round(1000 * seconds / passes, 2),
            "latent_rel_l2_vs_main": round(error, 5)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="7b-mot", help="named model size")
    parser.add_argument("--devices", default="cuda:0", help="comma list; two or more = CFG-parallel replicas")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="bf16",
                        help="storage of the decoder-layer Linears (bf16 = --dtype)")  # fmt: skip
    parser.add_argument("--size", type=int, default=1024, help="square image side in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=50, help="num_timesteps (steps - 1 evaluations)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up run (0: none)")
    parser.add_argument("--cfg-text-scale", type=float, default=4.0)
    parser.add_argument("--cfg-img-scale", type=float, default=1.5, help="1.5 = official app (no extra pass)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.4, 1.0))
    parser.add_argument("--renorm", default="global")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--passes", choices=list(PASSES), default="batched",
                        help="a step's guidance passes through each layer at once, or one after the other")  # fmt: skip
    parser.add_argument("--memory-cap", type=float, metavar="GIB",
                        help="one device only: at most GIB of it, decoder layers streamed as needed")  # fmt: skip
    parser.add_argument("--resident-layers", type=int, metavar="K",
                        help="one device only: stream all decoder layers but K (not the cap's plan)")  # fmt: skip
    parser.add_argument("--step-cache", type=float, default=0.0,
                        help="StepCache threshold (sampler.py); above 0 the uncached run is timed too, for the "
                        "speed-up and the latent's error")  # fmt: skip
    parser.add_argument("--also", default="",
                        help="comma list of variants timed after the main run on the same model, with their latent's "
                        "error against it: sequential (one pass at a time), unfused (the decoder layers' torch path, "
                        f"{LAYER_FUSION_SWITCH}=0)")  # fmt: skip
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if set(filter(None, args.also.split(","))) - set(VARIANTS):
        parser.error(f"--also: variants are {', '.join(VARIANTS)}; got '{args.also}'")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the streaming plan, on stderr
    args.devices = [d.strip() for d in args.devices.split(",")]
    if (args.memory_cap is not None or args.resident_layers is not None) and len(args.devices) > 1:
        parser.error("--memory-cap and --resident-layers take one device")
    options = GuidanceOptions(args.steps, 3.0, args.cfg_text_scale, args.cfg_img_scale, tuple(args.cfg_interval),
                              args.renorm, 0.0, args.step_cache)  # fmt: skip
    models = build_models(args.config, args.devices, DTYPES[args.dtype], args.weight_dtype, seed=0)
    resident = place(models[0], args.devices[0], args.memory_cap, args.resident_layers)
    tokenizer = SyntheticTokenizer(args.prompt_tokens)
    if args.warmup_steps:
        generate(models, tokenizer, args, options, max(2, args.warmup_steps))
    for d in args.devices:
        if d.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(d)
    seconds, passes, latent = generate(models, tokenizer, args, options, args.steps)
    cache = {}
    if args.step_cache > 0:  # the same generation without the cache: speed-up and error
        uncached = dataclasses.replace(options, step_cache=0.0)
        uncached_s, uncached_passes, want = generate(models, tokenizer, args, uncached, args.steps)
        cache = {"step_cache": args.step_cache, "uncached_seconds": round(uncached_s, 3),
                 "uncached_passes": uncached_passes, "speedup": round(uncached_s / seconds, 3),
                 "latent_rel_l2_vs_uncached": round(float((latent - want).norm() / want.norm()), 5)}  # fmt: skip
    variants = {v: variant(v, models, tokenizer, args, options, latent) for v in filter(None, args.also.split(","))}
    result = {
        "config": args.config, "devices": args.devices, "dtype": args.dtype, "weight_dtype": args.weight_dtype,
        "parameter_gib": round(parameter_gib(models[0]), 2), "size": args.size, "steps": args.steps,
        "cfg": [args.cfg_text_scale, args.cfg_img_scale, list(args.cfg_interval), args.renorm],
        "passes_mode": args.passes, "seconds": round(seconds, 3), "passes": passes,
        "ms_per_pass": round(1000 * seconds / passes, 2),
        "peak_gib": {d: round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in args.devices
                     if d.startswith("cuda")},
        "peak_reserved_gib": {d: round(torch.cuda.max_memory_reserved(d) / 2**30, 2) for d in args.devices
                              if d.startswith("cuda")},
        "memory_cap_gib": args.memory_cap, "layers": len(models[0].language_model.model.layers),
        "resident_layers": resident, "streamed_gib_per_pass": streamed_gib(models[0]),
        "gpu": [torch.cuda.get_device_name(d) for d in args.devices if d.startswith("cuda")],
        "torch": torch.__version__,
        "fused_layers": os.environ.get(LAYER_FUSION_SWITCH, "1") != "0",
        **cache,
        **variants,
    }  # fmt: skip
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
