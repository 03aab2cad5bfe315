"""What the kernel tests share: float64 references written out, their tolerances, and the interpreted kernels.

`interp` (the fixture) is a second copy of the kernels, and of the engine modules that call them, whose Triton
kernels run on CPU tensors through Triton's interpreter. Tests that take it are skipped only where Triton is not
installed (the README's test command installs it).
"""

import importlib
import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: only the fallbacks run")
# Attention against float64, relative. bf16: the output's own rounding is ~1.7e-3, which the interpreter's
# round-toward-zero doubles, and P's rounding adds as much again: 3.4e-3 (6e-3 through the split kernel's bf16
# store), as gemm_attention's P gives: bound 1e-2. fp16 carries 3 more bits: 2.4e-4, bound 1e-3. fp32 (P in fp32
# too): ~1e-7 an operation, sums of 512 products and of up to 300 probabilities stay under 1e-6: bound 1e-5.
ATTN_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}
COPIED = ("bagel_vae_pp.kernels", "bagel_vae_pp.collectives", "bagel_vae_pp.sharded")  # the kernels and their callers


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def attention64(q, k, v):
    """softmax(q k^T / sqrt(D)) v in float64, for [..., L, D] tensors."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [..., Lq, L]
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (p / p.sum(-1, keepdim=True)) @ v


def stats64(x, groups):
    """Per-(sample, group) mean and biased variance in float64, [B, G] each."""
    x = x.double().reshape(x.shape[0], groups, -1)
    mean = x.mean(-1)
    return mean, ((x - mean[..., None]) ** 2).mean(-1)


def apply64(x, mean, rstd, w, b, groups, silu):
    B, C = x.shape[:2]
    y = x.double().reshape(B, groups, -1) - mean.double()[:, :, None]
    y = (y * rstd.double()[:, :, None]).reshape(x.shape) * w.double()[:, None, None] + b.double()[:, None, None]
    return y * torch.sigmoid(y) if silu else y


def norm64(norm, x, silu=False):
    """nn.GroupNorm `norm` of x (then SiLU) in float64."""
    mean, var = stats64(x, norm.num_groups)
    return apply64(x, mean, 1 / torch.sqrt(var + norm.eps), norm.weight, norm.bias, norm.num_groups, silu)


def assert_rounded_from(out, ref):
    """out is the float64 ref rounded to out's dtype, within that dtype's default tolerances: the kernels compute in
    fp32 and round once, so they land within an ulp (bf16 1.6e-2, fp16 1e-3, fp32 1.3e-6 relative, atol 1e-5)."""
    torch.testing.assert_close(out, ref.to(out.dtype))


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def _fp32_dot_for_bf16(create_dot):
    """Triton's interpreter multiplies bf16 tiles as their raw uint16 bits (3.6 to 3.9): widen them first."""

    def widened(self, a, b, d, *args):
        from triton.runtime.interpreter import TensorHandle

        def fp32(h):
            if h.data.dtype != np.uint16:  # bf16 is the only 16-bit type stored as uint16
                return h
            return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), d.dtype.scalar)

        return create_dot(self, fp32(a), fp32(b), d, *args)

    return widened


@pytest.fixture(scope="module", name="interp")
def interpreted_kernels():
    """The kernels, and the engine modules that call them, as a second copy imported with TRITON_INTERPRET=1.

    Triton makes a @triton.jit function compiled or interpreted when it is defined, i.e. on import. Everything
    imported before this module's tests (triton.language's own jit functions, the engine) is compiled, and
    compiled kernels cannot take CPU tensors. So for these tests: the jit functions of triton.language are swapped
    for interpreted ones, and the kernels, collectives and sharded modules are imported afresh with the flag set;
    when a test module's tests end the rest of the run gets the compiled ones back. `interp.kernels` is the package,
    `interp.sharded` the engine, and each kernels submodule is there by name (`interp.group_norm`, ...).

    The interpreter's bf16 dot is widened to fp32 here. It also rounds fp32 -> bf16 toward zero (the GPU rounds
    to nearest even), so bf16 results carry about twice the GPU's rounding error; the tolerances allow for it.
    """
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder
    from triton.runtime.jit import JITFunction

    import bagel_vae_pp

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # also read while the kernels run
        for name, module in list(sys.modules.items()):
            if name.startswith("triton.language") and module is not None:
                for attr, value in list(vars(module).items()):
                    if isinstance(value, JITFunction):  # tl.zeros, tl.sum, tl.sigmoid, ...
                        mp.setattr(module, attr, InterpretedFunction(value.fn))
        mp.setattr(InterpreterBuilder, "create_dot", _fp32_dot_for_bf16(InterpreterBuilder.create_dot))
        for name in [n for n in sys.modules if n.startswith(COPIED)]:
            mp.delitem(sys.modules, name)
        for name in COPIED:  # else `from . import kernels` would find the compiled copy on the package
            mp.delattr(bagel_vae_pp, name.split(".")[1], raising=False)
        sharded = importlib.import_module("bagel_vae_pp.sharded")
        parts = {n.split(".")[2]: m for n, m in sys.modules.items() if n.startswith("bagel_vae_pp.kernels.")}
        yield SimpleNamespace(kernels=sys.modules["bagel_vae_pp.kernels"], sharded=sharded, **parts)
