"""GPU benchmark: single-GPU VAE vs the worker pool on 1, 2, 4 GPUs, exact and tiled, decode and encode.

One run on one machine. For each case: median time through the pool as a node sees it (CPU tensor in,
CPU tensor out), median engine time (slowest worker's compute), peak memory per GPU as the caching allocator
held it (max reserved: CUDA-graph pools and blocks cached between jobs included), and
max abs / max rel error against the single-GPU fp32 full-image result where that fits on one GPU.
Writes JSON lines to --out and prints a markdown table last.

    python bench/bench_vae.py --sizes 1024,2048,4096 --workers 1,2,4 --out results.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.autoencoder import random_autoencoder  # noqa: E402
from bagel_vae_pp.cli import errors, single_process, test_image  # noqa: E402
from bagel_vae_pp.pool import PoolSpec, WorkerPool  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def inputs_for(ae, size: int, device) -> dict:
    """The test image and its latent; above 1024 the latent is the 1024 one upsampled (cheap, realistic)."""
    base = single_process(ae, "encode", test_image(1024), device, torch.float32)
    latent = base if size == 1024 else F.interpolate(base, size=(size // 8, size // 8), mode="bilinear")
    return {"decode": latent.contiguous(), "encode": test_image(size)}


def references(ae, sizes, ops, dtype, ref_max, single_max, device, repeat, emit, pool_only=False):
    """Single-GPU fp32 references and the single-GPU run in the bench dtype, where they fit."""
    refs, rows = {}, []
    for size in sizes:
        data = inputs_for(ae, size, device)
        for op in ops:
            if size <= ref_max:
                try:
                    refs[(op, size)] = single_process(ae, op, data[op], device, torch.float32)
                except Exception as e:
                    if not is_oom(e):
                        raise
                    print(f"fp32 reference {op} {size}: out of memory on one GPU", flush=True)
                torch.cuda.empty_cache()
            if size > single_max or pool_only:
                continue
            row = {
                "impl": "engine, 1 GPU, in-process",
                "op": op,
                "size": size,
                "mode": "full",
                "workers": 1,
                "dtype": dtype,
            }
            try:
                times, out = [], None
                model = copy.deepcopy(ae).to(device, DTYPES[dtype])
                torch.cuda.reset_peak_memory_stats(device)
                for _ in range(repeat + 1):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    out = single_process(ae, op, data[op], device, DTYPES[dtype], model)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                row["ms"] = 1000 * statistics.median(times[1:])
                row["peak_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
                if (op, size) in refs:
                    row.update(errors(out, refs[(op, size)]))
            except Exception as e:
                if not is_oom(e):
                    raise
                row["ms"] = "OOM"
            model = out = None
            torch.cuda.empty_cache()
            rows.append(emit(row))
    return refs, rows


def pool_cases(ae, workers, sizes, ops, modes, dtype, refs, repeat, tile, overlap, device, max_size_for, emit):
    spec = PoolSpec.parse(",".join(map(str, range(workers))), dtype, timeout_s=600)
    pool = WorkerPool(spec)
    rows = []
    try:
        start = time.perf_counter()
        pool.start()
        print(f"pool of {workers} started in {time.perf_counter() - start:.1f} s", flush=True)
        for size in sizes:
            if size > max_size_for.get(workers, 1 << 30):
                continue
            data = inputs_for(ae, size, device)
            for mode in modes:
                for op in ops:
                    row = {"impl": "pool", "op": op, "size": size, "mode": mode, "workers": workers, "dtype": dtype}
                    run = pool.decode if op == "decode" else pool.encode
                    try:
                        walls, engine, out = [], [], None
                        for _ in range(repeat + 1):
                            start = time.perf_counter()
                            out = run(ae, data[op], mode=mode, tile_px=tile, overlap_px=overlap)
                            walls.append(time.perf_counter() - start)
                            engine.append(max(r.get("seconds", 0.0) for r in pool.last_replies))
                        row["ms"] = 1000 * statistics.median(walls[1:])
                        row["engine_ms"] = 1000 * statistics.median(engine[1:])
                        row["peak_gib"] = max(r.get("peak_bytes", 0) for r in pool.last_replies) / 2**30
                        row.update(pool.last_timing)
                        if (op, size) in refs:
                            row.update(errors(out, refs[(op, size)]))
                        del out
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        row["ms"] = "OOM"
                        pool.shutdown()
                    rows.append(emit(row))
    finally:
        pool.shutdown()
    return rows


def fmt(v, spec):
    return "-" if v is None else (v if isinstance(v, str) else format(v, spec))


def print_table(rows):
    print(
        "| impl | op | mode | GPUs | size | dtype | ms (through pool) | engine ms | peak GiB/GPU | max abs err "
        "| max rel err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['impl']} | {r['op']} | {r['mode']} | {r['workers']} | {r['size']}² | {r['dtype']} "
            f"| {fmt(r.get('ms'), '.1f')} | {fmt(r.get('engine_ms'), '.1f')} | {fmt(r.get('peak_gib'), '.2f')} "
            f"| {fmt(r.get('max_abs_err'), '.2e')} | {fmt(r.get('max_rel_err'), '.2e')} |"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,2048,4096,8192")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--ops", default="decode,encode")
    p.add_argument("--modes", default="exact,tiled")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--ref-max", type=int, default=4096, help="largest size for single-GPU fp32 references")
    p.add_argument(
        "--single-max", type=int, default=4096, help="largest size for single-GPU runs (in-process and 1-worker pool)"
    )
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--pool-only", action="store_true", help="no in-process single-GPU rows (references still run)")
    p.add_argument("--out", default=None, help="append JSON lines here, one per case as it finishes")
    args = p.parse_args()
    device = torch.device("cuda:0")
    sizes = [int(s) for s in args.sizes.split(",")]
    ops, modes = args.ops.split(","), args.modes.split(",")
    ae = random_autoencoder("flux", seed=0)
    card = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    print(f"torch {torch.__version__}, {card}", flush=True)
    run_info = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    def emit(row: dict) -> dict:
        """Print a finished case and append it to --out at once: a run stopped by a time limit keeps its rows."""
        row = {**row, **run_info}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    refs, rows = references(
        ae, sizes, ops, args.dtype, args.ref_max, args.single_max, device, args.repeat, emit, args.pool_only
    )
    for workers in [int(w) for w in args.workers.split(",")]:
        rows += pool_cases(
            ae,
            workers,
            sizes,
            ops,
            modes,
            args.dtype,
            refs,
            args.repeat,
            args.tile,
            args.overlap,
            device,
            {1: args.single_max},
            emit,
        )
    print_table(rows)


if __name__ == "__main__":
    main()
