"""FP8 weights for BAGEL's language model: stored in float8_e4m3fn, computed in bf16 (or in FP8 GEMMs).

What is quantized: every Linear of the decoder layers, both experts (q/k/v/o_proj, gate/up/down_proj and their
`_moe_gen` twins; 13.0 B of BAGEL-7B-MoT's 14.6 B parameters). The token embedding, the norms, lm_head, the ViT,
the connector, the latent heads (vae2llm, llm2vae, time embedder) and the position tables keep the model dtype
(issue 14: "unless measured harmless"; not measured yet).

Scales: one per output channel (row of the weight [out, in]), fp32, amax_row / 448 (e4m3's largest value; 1 for
a zero row): each row's largest entry is kept to fp32 precision, the others to e4m3's, at most half an e4m3 ulp
off: 2^-4 of the entry (2^-10 * scale below 2^-6 * scale, e4m3's subnormals). The dequantized weight
`weight_fp8.to(dtype) * scale` (kernels/dequant.py: one pass on GPUs) is formed in fp32 and rounded once to the
compute dtype: exact to fp32 rounding in fp32; in bf16 the rounding adds at most 2^-8 of an entry, a 16th of
e4m3's. Power-of-two scales would make the bf16 dequantization bit-exact, but would round each row's largest
entry too; measured (relative L2 of a GEMM's output against float64, 1024 x 3584 weights): the same 2.65% on
Gaussian rows, 2.7% instead of 2.5% on Student-t(3) rows, 2.2% instead of 0.6% on Student-t(1.5) rows; the tiny
model's velocity (8 seeds): 3.7% instead of 3.3%.

FP8 checkpoint layout (tools/quantize_bagel_fp8.py writes it; load_bagel reads it without a bf16 detour): the
files of a bf16 checkpoint folder, with an ema.safetensors in which every quantized Linear `<name>` holds

    <name>.weight        float8_e4m3fn [out, in]    w / scale, rounded to nearest even
    <name>.weight_scale  float32 [out]              per output channel: w ~ weight * weight_scale[:, None]
    <name>.bias          as in the bf16 file         (q/k/v_proj only)

and every other tensor as the bf16 file holds it.
In a model the FP8 tensor is the Fp8Linear buffer `weight_fp8` (`fp8_key`): its `weight` is the dequantized one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.dequant import dequantize_rows
from ..kernels.quant import FP8, quantize_rows, row_amax  # noqa: F401 (row_amax: tp.py's)

LAYERS_PREFIX = "language_model.model.layers."  # the decoder layers in ema.safetensors and in Bagel
FP8_GEMM_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell


@dataclass(frozen=True)
class Fp8Rows:
    """Activation rows [L, K] quantized per token (quantize_rows) for the FP8 GEMMs that read them.

    Scales are per row, so rows r of the quantized rows are rows r quantized alone: one quantization serves every
    fast Fp8Linear that reads the same input (q/k/v_proj, gate/up_proj; both experts' rows).
    """

    data: Tensor  # float8_e4m3fn [L, K]
    scale: Tensor  # fp32 [L]
    dtype: torch.dtype  # the rows' own, the GEMMs' output dtype

    @classmethod
    def of(cls, x: Tensor) -> Fp8Rows:
        return cls(*quantize_rows(x), x.dtype)

    def __getitem__(self, rows: slice) -> Fp8Rows:
        return Fp8Rows(self.data[rows], self.scale[rows], self.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device


def quantize_once(x: Tensor, *linears: nn.Module) -> Tensor | Fp8Rows:
    """x quantized once for `linears` that all read it, if each is a fast Fp8Linear (each would quantize x
    alike); else x as it is."""
    return Fp8Rows.of(x) if all(isinstance(lin, Fp8Linear) and lin.fast for lin in linears) else x


def fp8_linear(x: Tensor | Fp8Rows, weight_fp8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """x [L, in] @ (weight_fp8 * weight_scale[:, None])ᵀ + bias as one FP8 GEMM, out [L, out] in x.dtype.

    x is quantized per token (quantize_rows) unless it already is (Fp8Rows); both scales are applied in the
    GEMM's fp32 epilogue (torch._scaled_mm, row-wise scaling). The error over storage mode is the activations'
    e4m3 rounding.
    """
    x = x if isinstance(x, Fp8Rows) else Fp8Rows.of(x)
    return torch._scaled_mm(
        x.data, weight_fp8.t(), scale_a=x.scale[:, None], scale_b=weight_scale[None, :], bias=bias, out_dtype=x.dtype
    )


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored in FP8 with per-output-channel scales.

    `weight` is a property, for code that reads it as an nn.Linear's: the dequantized weight [out, in] in the
    compute dtype, made at each access. So there is no persistent bf16 copy, only one temporary layer at a time
    while a GEMM runs (the largest, a 7B gate/up/down_proj of 18944 x 3584, is 130 MiB in bf16; the caching
    allocator hands its block from layer to layer). With `fast`, forward is one FP8 GEMM (fp8_linear) and there
    is no dense weight: callers must run the layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, fast: bool, device=None):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype, self.fast = in_features, out_features, dtype, fast
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))  # fp32
        empty = torch.empty(out_features, dtype=dtype, device=device)
        self.bias = nn.Parameter(empty, requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast: bool) -> Fp8Linear:
        """Quantize `linear` (on any device, meta included); compute dtype = its weight's dtype."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, fast, device="meta")
        layer.weight_fp8, layer.weight_scale = quantize_rows(w)
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    @property
    def weight(self) -> Tensor:
        if self.fast:
            raise RuntimeError(
                "an fp8_e4m3fn_fast layer has no dense weight: its caller must run the layer (forward) instead of "
                "reading .weight."
            )
        return dequantize_rows(self.weight_fp8, self.weight_scale, self.compute_dtype)

    def forward(self, x: Tensor | Fp8Rows) -> Tensor:
        if self.fast:
            return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        mode = "fp8 GEMM" if self.fast else "fp8 storage"
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, {mode}, {self.compute_dtype}"


def quantize_to_fp8_storage(linear: nn.Linear) -> Fp8Linear:
    return Fp8Linear.from_linear(linear, fast=False)


def quantize_to_fp8_gemm(linear: nn.Linear) -> Fp8Linear:
    return Fp8Linear.from_linear(linear, fast=True)


# Weight dtype name -> what becomes of each decoder-layer Linear (None: it stays as loaded, in the model dtype).
WEIGHT_DTYPES = {"bf16": None, "fp8_e4m3fn": quantize_to_fp8_storage, "fp8_e4m3fn_fast": quantize_to_fp8_gemm}


def check_fp8_gemm(device) -> None:
    """Refuse, in one line, a device without FP8 tensor cores (the CPU, or a GPU below compute capability 8.9)."""
    device = torch.device(device)
    need = "FP8 tensor cores (a CUDA GPU of compute capability {}.{} or newer: Ada, Hopper, Blackwell)".format(
        *FP8_GEMM_CAPABILITY
    )
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap >= FP8_GEMM_CAPABILITY:
            return
        has = f"{device} ({torch.cuda.get_device_name(device)}) has compute capability {cap[0]}.{cap[1]}"
    else:
        has = f"{device} has no compute capability (not a CUDA GPU)"
    raise ValueError(
        f"weight dtype fp8_e4m3fn_fast needs {need}; {has}. Use fp8_e4m3fn (FP8 storage, bf16 compute), which "
        "runs on any device."
    )


def quantizer(weight_dtype: str):
    """WEIGHT_DTYPES[weight_dtype], or a ValueError naming the choices."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype is {weight_dtype!r}; allowed values are {', '.join(WEIGHT_DTYPES)}.")
    return WEIGHT_DTYPES[weight_dtype]


def check_weight_dtype(weight_dtype: str, device, dtype: torch.dtype) -> None:
    """Raise before any weights are read if `weight_dtype` is unknown or cannot run on `device` in `dtype`."""
    quantizer(weight_dtype)
    if weight_dtype == "fp8_e4m3fn_fast":
        check_fp8_gemm(device)
        if dtype != torch.bfloat16:
            raise ValueError(f"weight dtype fp8_e4m3fn_fast computes in bf16; the model dtype is {dtype}.")


def quantize_llm_(model: nn.Module, weight_dtype: str) -> nn.Module:
    """Swap every Linear of the decoder layers (both experts) for its `weight_dtype` form, in place; returns model.

    One Linear at a time is quantized and dropped, so memory only falls from the bf16 model's (plus one layer's
    fp32 quotient while it is quantized). On a meta model this builds the empty shells that loading fills. The
    compute dtype is the Linears' dtype. Does not check the device (check_weight_dtype does).
    """
    quantize = quantizer(weight_dtype)
    if quantize is None:
        return model
    layers = model.get_submodule(LAYERS_PREFIX.rstrip("."))
    for name, module in list(layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent, attr = name.rsplit(".", 1)
            setattr(layers.get_submodule(parent), attr, quantize(module))
    return model


def is_quantized_weight(key: str, shape) -> bool:
    """Whether ema.safetensors' tensor `key` is a decoder-layer Linear's weight (norms there are 1-D)."""
    return key.startswith(LAYERS_PREFIX) and key.endswith(".weight") and len(shape) == 2


def scale_key(weight_key: str) -> str:
    return weight_key + "_scale"  # "<name>.weight" -> "<name>.weight_scale"


def fp8_key(weight_key: str) -> str:
    return weight_key + "_fp8"  # "<name>.weight" in the file -> Fp8Linear's "<name>.weight_fp8"


def is_fp8_checkpoint(keys: Iterable[str]) -> bool:
    return any(k.endswith(".weight_scale") for k in keys)


def stored_layout(expected: dict[str, Tensor], fp8: bool) -> dict[str, Tensor]:
    """The tensors ema.safetensors should hold for a model whose state_dict (unquantized) is `expected`, in the
    bf16 layout or, with `fp8`, the FP8 one (a weight_scale [out] per quantized weight); shapes only (meta)."""
    if not fp8:
        return expected
    scales = {scale_key(k): torch.empty(t.shape[0], device="meta") for k, t in expected.items()
              if is_quantized_weight(k, t.shape)}  # fmt: skip
    return {**expected, **scales}


def read_weights(f, weight_dtype: str, device, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """(model key, tensor) for every tensor of an open ema.safetensors in either layout, one read at a time.

    Decoder-layer Linears come as the model holds them for `weight_dtype`: FP8 tensors of an FP8 file as they
    are; from a bf16 file, quantized on `device` right after reading (the bf16 tensor is dropped before the next
    read); with "bf16" from an FP8 file, dequantized to `dtype`. Everything else goes to `dtype`.
    """
    keys = list(f.keys())
    stored_fp8, quantized = is_fp8_checkpoint(keys), quantizer(weight_dtype) is not None
    for key in keys:
        if key.endswith(".weight_scale"):
            continue  # read with its weight
        t = f.get_tensor(key).to(device)
        if not is_quantized_weight(key, t.shape) or not (stored_fp8 or quantized):
            yield key, t.to(dtype)
            continue
        q, s = (t, f.get_tensor(scale_key(key)).to(device)) if stored_fp8 else quantize_rows(t)
        if quantized:
            yield fp8_key(key), q
            yield scale_key(key), s
        else:
            yield key, dequantize_rows(q, s, dtype)
