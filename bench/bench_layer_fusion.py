"""BAGEL's fused layer kernels (kernels/rms_norm.py, qk_norm_rope.py, swiglu.py) on vs off, on one GPU.

(1) One layer's elementwise work at full size (a 1024² block: 4096 latent tokens + the 2 markers, both experts'
rows): the input and post-attention RMSNorms, q/k norm + RoPE, silu(gate) * up; each op fused and through the torch
path (BAGEL_VAE_PP_FUSED_LAYERS=0), timed, and compared: bf16 outputs bit for bit (the kernels round where the
torch path does; a rare element one bf16 ulp off where the normalisation sits on a tie). (2) A full velocity step
of the random full-size model: the block against `--passes` contexts (the prompt's `--context` tokens, then
empty ones, as Bagel.velocities batches text-to-image guidance), fused vs torch path, timed and compared (relative
L2 of the hidden states). Times: median ms, CUDA events. Exits 1 if an output does not match.

    python bench/bench_layer_fusion.py
    python bench/bench_layer_fusion.py --tiny   # CPU, Triton's interpreter, tiny sizes: a smoke run, no GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Full size: hidden 3584, 28 q heads, 4 KV heads, Dh 128, MLP 18944 (CONFIGS["7b-mot"]).
ELEMENTWISE_TOL = 1e-2  # max |fused - torch| / max |torch| of an op: one bf16 ulp of a value near the largest
PASS_TOL = 1e-2  # relative L2 of the final hidden states after 28 layers of one-ulp ties


def median_ms(fn, device: torch.device, repeat: int) -> float:
    if device.type == "cuda":
        from bench.timing import cuda_median_ms

        return cuda_median_ms(fn, repeat=repeat, warmup=2)
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def fused(on: bool) -> None:
    from bagel_vae_pp import kernels

    os.environ[kernels.LAYER_FUSION_SWITCH] = "1" if on else "0"


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(share of elements bit-identical, max |a - b| / max |b|)."""
    same = (a == b).float().mean().item()
    return same, ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def elementwise(cfg, tokens: int, device: torch.device, dtype: torch.dtype, repeat: int) -> bool:
    """Each fused op of one layer on vs off; prints a table, returns whether every output matched."""
    from bagel_vae_pp.bagel import experts, llm

    g = torch.Generator(device).manual_seed(0)
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)

    def norm(dim):
        n = llm.RMSNorm(dim, cfg.rms_norm_eps).to(device, dtype)
        n.weight.data = 1 + 0.1 * rand(dim)
        return n

    rows = experts.Rows(tokens, slice(1, tokens - 1))  # the markers (understanding), then the latent tokens
    und, gen, qn, qn_gen, kn, kn_gen = norm(D), norm(D), norm(Dh), norm(Dh), norm(Dh), norm(Dh)
    cos, sin = llm.rope_cos_sin(rows.pack(torch.arange(tokens, device=device) % 64), Dh, cfg.rope_theta, dtype)
    x, q, k = rand(tokens, D, scale=3), rand(tokens, H, Dh), rand(tokens, Hkv, Dh)
    gate, up = rand(tokens, F, scale=2), rand(tokens, F)
    ops = {  # name: (fn of fresh inputs, inputs, times a layer)
        f"RMSNorm [L, {D}]": (lambda t: experts.norm(t, rows, und, gen), (x,), 2),
        f"q norm + RoPE [L, {H}, {Dh}]": (lambda t: experts.norm_rope(t, cos, sin, rows, qn, qn_gen), (q,), 1),
        f"k norm + RoPE [L, {Hkv}, {Dh}]": (lambda t: experts.norm_rope(t, cos, sin, rows, kn, kn_gen), (k,), 1),
        f"silu(gate) * up [L, {F}]": (experts.silu_mul_, (gate, up), 1),
    }
    print(f"\n| op ({tokens} tokens) | torch ms | fused ms | speed-up | identical | max diff / max |")
    print("|---|---|---|---|---|---|")
    ok, layer_ms = True, [0.0, 0.0]
    for name, (fn, inputs, per_layer) in ops.items():
        outs, ms = [], []
        for on in (False, True):
            fused(on)
            outs.append(fn(*(t.clone() for t in inputs)))  # the in-place ops get their own copies
            work = [t.clone() for t in inputs]
            ms.append(median_ms(lambda fn=fn, work=work: fn(*work), device, repeat))  # in place: timing, not values
            layer_ms[on] += per_layer * ms[-1]
        same, diff = compare(outs[1], outs[0])
        ok &= diff <= ELEMENTWISE_TOL
        print(f"| {name} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.2f}x | {same:.6f} | {diff:.2e} |")
    print(f"| one layer (2 norms, q, k, SwiGLU) | {layer_ms[0]:.3f} | {layer_ms[1]:.3f} | "
          f"{layer_ms[0] / layer_ms[1]:.2f}x | | |")  # fmt: skip
    print(f"| x {cfg.num_hidden_layers} layers | {cfg.num_hidden_layers * layer_ms[0]:.2f} | "
          f"{cfg.num_hidden_layers * layer_ms[1]:.2f} | | | |")  # fmt: skip
    return ok


def full_pass(params, tokens: int, context: int, passes: int, device: torch.device, repeat: int) -> bool:
    """One guidance step of the random model, batched passes, on vs off; prints it, returns whether it matched."""
    from bagel_vae_pp.bagel.tiny import random_bagel

    lm = random_bagel(params, 0, device=device, dtype=torch.bfloat16).language_model.model
    D = params.llm.hidden_size
    g = torch.Generator(device).manual_seed(1)
    with torch.inference_mode():
        prompt = torch.randn(context, D, generator=g, device=device).to(torch.bfloat16)
        past = lm(prompt, torch.arange(context, device=device), None, causal=True)[1]
        pasts = [past] + [None] * (passes - 1)
        positions = [torch.full((tokens,), context, device=device)] + [torch.zeros(tokens, device=device)] * (
            passes - 1
        )
        positions = [p.long() for p in positions]
        block = torch.randn(tokens, D, generator=g, device=device).to(torch.bfloat16)
        step = lambda: lm.passes(block, positions, pasts, gen=slice(1, tokens - 1))  # noqa: E731
        outs, ms = [], []
        for on in (False, True):
            fused(on)
            outs.append(torch.cat(step()))
            ms.append(median_ms(step, device, repeat))
    err = ((outs[1].double() - outs[0].double()).norm() / outs[0].double().norm()).item()
    same, _ = compare(outs[1], outs[0])
    print(f"\n| step: {passes} passes x {tokens} tokens, context {context} | torch ms | fused ms | ms saved a pass | "
          "identical | rel L2 |\n|---|---|---|---|---|---|")  # fmt: skip
    print(f"| {params.llm.num_hidden_layers} layers | {ms[0]:.2f} | {ms[1]:.2f} | {(ms[0] - ms[1]) / passes:.2f} | "
          f"{same:.4f} | {err:.2e} |")  # fmt: skip
    return err <= PASS_TOL


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, Triton's interpreter, the tiny config: a smoke run")
    p.add_argument("--tokens", type=int, default=None, help="block tokens (default 4098: 1024² + 2 markers)")
    p.add_argument("--context", type=int, default=34, help="tokens of the prompt's context")
    p.add_argument("--passes", type=int, default=2, help="batched passes a step (contexts: the prompt's, then empty)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--skip-pass", action="store_true", help="time the elementwise ops only (no full-size model)")
    args = p.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: @triton.jit reads it then
    from bagel_vae_pp import kernels
    from bagel_vae_pp.bagel.config import CONFIGS

    params = CONFIGS["tiny" if args.tiny else "7b-mot"]
    device = torch.device("cpu" if args.tiny else "cuda")
    if not kernels.is_available(device):
        p.error(f"the Triton kernels do not run on {device} here (triton installed: {kernels.HAS_TRITON})")
    tokens = args.tokens or (34 if args.tiny else 4098)
    repeat = 2 if args.tiny else args.repeat
    name = "CPU (Triton interpreter)" if args.tiny else torch.cuda.get_device_name()
    c = params.llm
    print(f"{name} · torch {torch.__version__} · hidden {c.hidden_size}, heads {c.num_attention_heads}/"
          f"{c.num_key_value_heads}, Dh {c.head_dim}, MLP {c.intermediate_size}, "
          f"{c.num_hidden_layers} layers")  # fmt: skip
    with torch.inference_mode():
        ok = elementwise(params.llm, tokens, device, torch.bfloat16, repeat)
    if not args.skip_pass:
        ok &= full_pass(params, tokens, args.context, args.passes, device, repeat)
    print("\noutputs match" if ok else "\nMISMATCH: fused and torch outputs differ beyond the bounds above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
