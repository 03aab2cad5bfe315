"""GPU self-check and micro-benchmark of the Triton kernels against the torch code they replace.

One run on one GPU: (1) the two ceilings (device copy GB/s, bf16 matmul TFLOP/s); (2) a self-check of
both kernels on odd shapes, both q/k/v layouts, fp16/bf16/fp32; (3) the D=512 mid-block attention at
(Lq, L) = (4096, 16384), (16384, 65536), (65536, 262144): every config screened at the middle size in the
engine's layout, the fastest few at every size in both layouts, and SDPA on contiguous inputs;
(4) GroupNorm statistics and fused apply(+SiLU) at band shapes, the same values in NCHW and in channels_last
(NHWC), every config of each layout's kernels, and the torch code path.
Errors: ||out - ref|| / ||ref|| and max abs against float64 (attention: on 256 random query rows).
Outputs are poisoned with NaN before each checked run. Times: median over repeats, CUDA events.
Prints a markdown table last; --out writes JSON lines.

    python bench/bench_kernels.py [--quick] [--out kernels.jsonl]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.kernels import is_nhwc  # noqa: E402
from bench.timing import cuda_call_ms  # noqa: E402

# `kernels.attention` is the function; the module (configs, the jit kernel) is reached by its full name
attn_mod = importlib.import_module("bagel_vae_pp.kernels.attention")
gn_mod = importlib.import_module("bagel_vae_pp.kernels.group_norm")

DEVICE = "cuda"
D = 512
ATTN_SIZES = [(4096, 16384), (16384, 65536), (65536, 262144)]
GN_SHAPES = [(1, 128, 1024, 4096), (1, 256, 1024, 4096), (1, 512, 512, 2048)]
GROUPS = 32
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def median_ms(fn, budget_ms: float = 300.0, max_reps: int = 50) -> float:
    fn()  # warm-up: compilation, allocator
    torch.cuda.synchronize()
    times = []
    while len(times) < 3 or (sum(times) < budget_ms and len(times) < max_reps):
        times.append(cuda_call_ms(fn))
    return statistics.median(times)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = out.double() - ref
    return {
        "rel": (diff.norm() / ref.norm()).item(),
        "max_abs": diff.abs().max().item(),
        "nan": out.isnan().any().item(),
    }


def kernel_report(jit_fn, before: set) -> dict:
    """Registers, spills, shared memory and whether wgmma is in the PTX of the newest compiled variant."""
    try:
        cache = jit_fn.device_caches[torch.cuda.current_device()][0]
        new = [k for key, k in cache.items() if key not in before] or list(cache.values())[-1:]
        k = new[-1]
        k = k.result() if hasattr(k, "result") else k
        return {"regs": k.n_regs, "spills": k.n_spills, "smem_kib": k.metadata.shared // 1024,
                "wgmma": "wgmma" in k.asm.get("ptx", "")}  # fmt: skip
    except Exception as e:  # best effort: the cache layout is Triton-internal
        return {"report": f"n/a ({type(e).__name__})"}


def cache_keys(jit_fn) -> set:
    try:
        return set(jit_fn.device_caches[torch.cuda.current_device()][0])
    except Exception:
        return set()


# ---- inputs and references ----


def qkv(Lq: int, L: int, d: int, layout: str, dtype=torch.bfloat16, seed: int = 0):
    """Random q, k, v, [1, 1, n, d]: 'contig' (d contiguous) or 'engine' (tokens contiguous, as to_tokens gives)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def one(n, scale, shift):
        if layout == "contig":
            return (torch.randn(1, 1, n, d, device=DEVICE, generator=g) * scale + shift).to(dtype)
        t = (torch.randn(1, d, n, device=DEVICE, generator=g) * scale + shift).to(dtype)
        return t[:, None].transpose(-1, -2)  # [1, 1, n, d], stride 1 along n

    return one(Lq, 1.0, 0.1), one(L, 1.0, 0.1), one(L, 2.0, 0.5)


def attention_ref_rows(q, k, v, rows):
    """float64 attention for the query rows `rows` only: [len(rows), D]."""
    d = q.shape[-1]
    s = (q[0, 0, rows].double() @ k[0, 0].double().T) / d**0.5  # [R, L]
    return torch.softmax(s, dim=-1) @ v[0, 0].double()


def run_attention(q, k, v, config, rows, check: bool):
    if config == "sdpa":
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        fn = lambda: F.scaled_dot_product_attention(qc, kc, vc)
        row = {}
    else:
        out = torch.full_like(q, float("nan"))
        fn = lambda: attn_mod.attention(q, k, v, config=config, out=out)
        before = cache_keys(attn_mod._attention_kernel)
        fn()  # first call writes the poisoned buffer: checked below
        torch.cuda.synchronize()
        row = kernel_report(attn_mod._attention_kernel, before)
        row["unwritten"] = out.isnan().any().item()
    if check:
        row.update(errors(fn()[0, 0, rows], attention_ref_rows(q, k, v, rows)))
    budget = 2000.0 if q.shape[2] >= 65536 else 300.0
    row["ms"] = median_ms(fn, budget_ms=budget)
    Lq, L = q.shape[2], k.shape[2]
    row["tflops"] = 4 * Lq * L * q.shape[-1] / row["ms"] / 1e9
    return row


def fits(c) -> bool:
    """Configs worth compiling at D = 512: the fp32 accumulator fits the registers, resident Q + K/V stages fit smem."""
    regs_ok = c.block_m * D <= 64 * 512
    return regs_ok and (c.qk_chunk > 0 or (c.block_m + 2 * c.num_stages * c.block_n) * D * 2 <= 227 * 1024)


# ---- sections ----


def ceilings() -> list[dict]:
    x = torch.randn(256 * 2**20, device=DEVICE)  # 1 GiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    mm = median_ms(lambda: a @ b)
    return [
        {"section": "ceiling", "case": "copy 1 GiB (read+write)", "ms": ms, "gbps": 2 * x.numel() * 4 / ms / 1e6},
        {"section": "ceiling", "case": "bf16 matmul 8192^3", "ms": mm, "tflops": 2 * 8192**3 / mm / 1e9},
    ]


def self_check() -> list[dict]:
    rows = []
    for Lq, L, d, layout, dtype in [
        (100, 1000, 512, "engine", torch.bfloat16),
        (4097, 3000, 512, "contig", torch.bfloat16),
        (333, 777, 128, "engine", torch.float16),
        (64, 65, 256, "contig", torch.float16),
        (50, 70, 512, "contig", torch.float32),
    ]:
        q, k, v = qkv(Lq, L, d, layout, dtype, seed=Lq + L)
        out = torch.full_like(q, float("nan"))
        o = attn_mod.attention(q, k, v, out=out)
        row = errors(o[0, 0], attention_ref_rows(q, k, v, torch.arange(Lq, device=DEVICE)))
        ok = not row["nan"] and row["rel"] < (1e-3 if dtype == torch.float32 else 1e-2)  # fp32: SDPA, maybe tf32
        rows.append({"section": "check", "case": f"attention {Lq}x{L} D={d} {layout} {dtype}", "ok": ok, **row})
    for shape, dtype, silu in [
        ((2, 64, 33, 47), torch.bfloat16, True),
        ((1, 96, 130, 257), torch.float16, False),
        ((3, 32, 17, 19), torch.float32, True),
        ((1, 64, 300, 1000), torch.bfloat16, True),
    ]:
        x = (torch.randn(shape, device=DEVICE) * 3 + 2).to(dtype)
        w, b = torch.randn(shape[1], device=DEVICE) + 1, torch.randn(shape[1], device=DEVICE)
        ref_var, ref_mean = torch.var_mean(x.reshape(shape[0], GROUPS, -1).double(), -1, correction=0)
        ref = F.group_norm(x.double(), GROUPS, w.double(), b.double(), eps=1e-6)
        ref = F.silu(ref) if silu else ref
        for layout, memory_format in MEMORY_FORMATS.items():
            xl = x.contiguous(memory_format=memory_format)
            mean, var = gn_mod.group_stats(xl, GROUPS)
            stat_err = stats_error(mean, var, ref_mean, ref_var)
            y = gn_mod.group_norm_apply(xl, mean, torch.rsqrt(var + 1e-6), w, b, GROUPS, silu=silu)
            row = errors(y, ref)
            ok = stat_err < 1e-5 and row["rel"] < (1e-5 if dtype == torch.float32 else 1e-2) and not row["nan"]
            ok = ok and y.is_contiguous(memory_format=memory_format)
            rows.append({"section": "check", "case": f"group_norm {layout} {shape} {dtype} silu={silu}", "ok": ok,
                         "stat_rel": stat_err, **row})  # fmt: skip
    return rows + check_int64()


def check_int64() -> list[dict]:
    """GroupNorm on 2.25 G elements (past int32 offsets; a full 4096^2 map at 128 channels is 2^31).

    NCHW: the last group, whose offsets are all past 2^31. NHWC: the group statistics (every group ends in
    the last pixels, past 2^31) and the last rows of the output, all channels.
    """
    shape = (1, 128, 4096, 4296)
    x = torch.empty(shape, device=DEVICE, dtype=torch.bfloat16).normal_(2.0, 3.0)
    w, b = torch.randn(shape[1], device=DEVICE) + 1, torch.randn(shape[1], device=DEVICE)
    per = shape[1] // GROUPS
    by_group = [torch.var_mean(x[:, g * per : (g + 1) * per].double(), correction=0) for g in range(GROUPS)]
    ref_var, ref_mean = (torch.stack(r)[None] for r in zip(*by_group))  # [1, G]; float64 one group at a time
    rows = []
    for layout, memory_format in MEMORY_FORMATS.items():
        xl = x.contiguous(memory_format=memory_format)
        mean, var = gn_mod.group_stats(xl, GROUPS)
        if layout == "nchw":
            stat_err = stats_error(mean[:, -1], var[:, -1], ref_mean[:, -1], ref_var[:, -1])
            part, cs, hs, where = xl[:, -per:], slice(-per, None), slice(None), "last group"
        else:
            stat_err = stats_error(mean, var, ref_mean, ref_var)
            part, cs, hs, where = xl[:, :, -64:], slice(None), slice(-64, None), "all groups, last 64 rows"
        rstd = torch.rsqrt(var + 1e-6)
        y = gn_mod.group_norm_apply(xl, mean, rstd, w, b, GROUPS, silu=True)
        layout_ok = y.is_contiguous(memory_format=memory_format)
        channel_group = torch.arange(shape[1], device=DEVICE)[cs] // per
        scale = rstd[0, channel_group].double() * w[cs].double()
        ref = (part.double() - mean[0, channel_group, None, None].double()) * scale[:, None, None]
        row = errors(y[:, cs, hs], F.silu(ref + b[cs, None, None].double()))
        del xl, y, part
        torch.cuda.empty_cache()
        ok = stat_err < 1e-5 and row["rel"] < 1e-2 and not row["nan"] and layout_ok
        rows.append({"section": "check", "case": f"group_norm {layout} {shape} bf16, {where}", "ok": ok,
                     "stat_rel": stat_err, **row})  # fmt: skip
    return rows


def attention_case(row: dict, q, k, v, name: str, rows_idx, deadline: float) -> dict:
    """Check and time one attention config into `row` (an error or a skip is recorded, not raised); print it."""
    if time.time() > deadline:
        row["error"] = "skipped: time budget"
    else:
        try:
            row.update(run_attention(q, k, v, name, rows_idx, check=True))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    print(json.dumps(row), flush=True)
    return row


def attention_section(sizes, configs, finalists: int, deadline: float) -> list[dict]:
    rows = []
    screen = sizes[min(1, len(sizes) - 1)]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q, k, v = qkv(*screen, D, "engine")
    rows_idx = torch.randperm(screen[0], device=DEVICE, generator=g)[:256]
    for name in configs:
        row = {"section": "attention", "size": f"{screen[0]}x{screen[1]}", "layout": "engine", "impl": name}
        rows.append(attention_case(row, q, k, v, name, rows_idx, deadline))
    ok = [r for r in rows if "ms" in r and r["rel"] < 1e-2 and not r.get("unwritten")]
    best = [r["impl"] for r in sorted(ok, key=lambda r: r["ms"])[:finalists]]
    for Lq, L in sizes:
        for layout in ("engine", "contig"):
            q, k, v = qkv(Lq, L, D, layout, seed=Lq)
            rows_idx = torch.randperm(Lq, device=DEVICE, generator=g)[:256]
            impls = best + (["sdpa"] if layout == "contig" else [])
            for name in impls:
                if (Lq, L) == screen and layout == "engine":
                    continue  # screened above
                row = {"section": "attention", "size": f"{Lq}x{L}", "layout": layout, "impl": name}
                rows.append(attention_case(row, q, k, v, name, rows_idx, deadline))
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def apply_errors(y, x, mean, rstd, w, b) -> dict:
    """Error of a fused GroupNorm+SiLU output against float64, one group at a time (bounded memory)."""
    B, C = x.shape[:2]
    per = C // GROUPS
    num = den = 0.0
    max_abs = 0.0
    for g in range(GROUPS):
        cs = slice(g * per, (g + 1) * per)
        ref = (x[:, cs].double() - mean[:, g, None, None, None].double()) * rstd[:, g, None, None, None].double()
        ref = F.silu(ref * w[cs, None, None].double() + b[cs, None, None].double())
        diff = y[:, cs].double() - ref
        num, den = num + diff.square().sum().item(), den + ref.square().sum().item()
        max_abs = max(max_abs, diff.abs().max().item())
    return {"rel": (num / den) ** 0.5, "max_abs": max_abs, "nan": y.isnan().any().item()}


def gn_case(op: str, name: str, x, mean, rstd, w, b):
    """The callable timed for one GroupNorm row: the torch code path (as the fallback runs it) or a kernel config."""
    B = x.shape[0]
    if op == "stats" and name == "torch":
        return lambda: torch.var_mean(x.reshape(B, GROUPS, -1).float(), -1, correction=0)[::-1]
    if op == "stats":
        return lambda: gn_mod.group_stats(x, GROUPS, config=name)
    if name == "torch":
        memory_format = torch.channels_last if is_nhwc(x) else torch.contiguous_format
        return lambda: gn_mod._apply_torch(x, mean, rstd, w, b, GROUPS, True).contiguous(memory_format=memory_format)
    return lambda: gn_mod.group_norm_apply(x, mean, rstd, w, b, GROUPS, silu=True, config=name)


def stats_error(mean, var, ref_mean, ref_var) -> float:
    return max(((mean - ref_mean) / ref_mean).abs().max().item(), ((var - ref_var) / ref_var).abs().max().item())


def group_norm_section(shapes, deadline: float) -> list[dict]:
    """Every shape in NCHW and in NHWC (the same values): the torch code path and every config of the layout."""
    configs = {
        "nchw": (gn_mod.STATS_CONFIGS, gn_mod.APPLY_CONFIGS),
        "nhwc": (gn_mod.NHWC_STATS_CONFIGS, gn_mod.NHWC_APPLY_CONFIGS),
    }
    rows = []
    for shape in shapes:
        x = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) * 3 + 2).contiguous()
        w = (torch.randn(shape[1], device=DEVICE) + 1).bfloat16()
        b = torch.randn(shape[1], device=DEVICE).bfloat16()
        nbytes = x.numel() * x.element_size()
        ref_var, ref_mean = torch.var_mean(x.reshape(shape[0], GROUPS, -1).double(), -1, correction=0)
        mean, rstd = ref_mean.float(), torch.rsqrt(ref_var.float() + 1e-6)
        for layout, memory_format in MEMORY_FORMATS.items():
            xl = x.contiguous(memory_format=memory_format)
            stats_configs, apply_configs = configs[layout]
            cases = [("stats", n) for n in ["torch", *stats_configs]]
            cases += [("apply+silu", n) for n in ["torch", *apply_configs]]
            for op, name in cases:
                row = {"section": "group_norm", "size": "x".join(map(str, shape)), "layout": f"{op} {layout}",
                       "impl": name}  # fmt: skip
                rows.append(row)
                if time.time() > deadline:
                    row["error"] = "skipped: time budget"
                    continue
                fn = gn_case(op, name, xl, mean, rstd, w, b)
                if op == "stats":
                    row["rel"] = stats_error(*fn(), ref_mean, ref_var)
                    row["ms"] = median_ms(fn)
                    row["gbps"] = nbytes / row["ms"] / 1e6
                else:
                    poison = torch.full_like(xl, float("nan"))
                    del poison  # the caching allocator hands this block to the output next
                    y = fn()
                    row.update(apply_errors(y, xl, mean, rstd, w, b))
                    row["layout_kept"] = y.is_contiguous(memory_format=memory_format)
                    del y
                    row["ms"] = median_ms(fn)
                    row["gbps"] = 2 * nbytes / row["ms"] / 1e6
                print(json.dumps(row), flush=True)
            del xl
            torch.cuda.empty_cache()
    return rows


def fmt(v, spec=".3g"):
    if v is None:
        return "-"
    return v if isinstance(v, str) else format(v, spec)


def print_tables(rows):
    print("\n| section | case | impl | ms | TFLOP/s or GB/s | rel err | max abs | regs/spills/smem KiB/wgmma |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        case = r.get("case") or f"{r['size']} {r['layout']}"
        rate = r.get("tflops", r.get("gbps"))
        res = (
            f"{r['regs']}/{r['spills']}/{r['smem_kib']}/{'y' if r['wgmma'] else 'n'}"
            if "regs" in r
            else r.get("report")
        )
        impl = r.get("impl", "OK" if r.get("ok") else ("FAIL" if "ok" in r else ""))
        err = r.get("error")
        print(f"| {r['section']} | {case} | {impl} | {fmt(r.get('ms')) if not err else err} | {fmt(rate)} "
              f"| {fmt(r.get('rel'))} | {fmt(r.get('max_abs'))} | {fmt(res)} |")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two smaller attention sizes, one GN shape, 4 configs")
    parser.add_argument("--configs", default="", help="comma-separated attention configs (default: all)")
    parser.add_argument("--finalists", type=int, default=3, help="configs carried from screening to every size")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip remaining cases after this many seconds")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: check,attention,group_norm")
    parser.add_argument("--out", default="", help="write JSON lines here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this bench needs a CUDA GPU"
    import triton

    t0 = time.time()
    deadline = t0 + args.budget_s
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    configs = [c for c in args.configs.split(",") if c] or [n for n, c in attn_mod.CONFIGS.items() if fits(c)]
    sizes, shapes = ATTN_SIZES, GN_SHAPES
    if args.quick:
        configs, sizes, shapes = configs[:4], ATTN_SIZES[:2], GN_SHAPES[2:]
    skip = set(args.skip.split(","))
    rows = ceilings()
    if "check" not in skip:
        rows += self_check()
    if "group_norm" not in skip:
        rows += group_norm_section(shapes, deadline)
    if "attention" not in skip:
        rows += attention_section(sizes, configs, args.finalists, deadline)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(
        f"\ntotal {time.time() - t0:.0f} s; checks {'all OK' if all(r['ok'] for r in rows if 'ok' in r) else 'FAILED'}"
    )
    print_tables(rows)


if __name__ == "__main__":
    main()
