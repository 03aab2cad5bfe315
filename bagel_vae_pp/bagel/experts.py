"""Which token rows each expert of BAGEL's Mixture-of-Transformers decoder computes, and the per-expert ops over them
(bagel/llm.py's layers call these; modeling/bagel/qwen2_navit.py routes the same way with index masks).

`Rows` keeps a block's tokens in expert order, the understanding rows first and the generation rows after them, so
each expert's norm, projection or MLP is one op over one contiguous slice of rows, written in place or straight into
its rows of the output. The experts' modules (llm.RMSNorm, llm.MLP, nn.Linear or quantize.py's FP8 layers) come
as arguments: nothing here imports llm.py, which builds on this module.

Where the Triton kernels run (kernels.fuses_layers: CUDA, bf16/fp32) the work between the GEMMs is fused, rounding
where the torch path does: nn.Module with its weight, q/k norm with RoPE, silu(gate) * up (kernels/rms_norm.py,
qk_norm_rope.py, swiglu.py). Residual adds ride in the o_proj and down_proj GEMMs (addmm_ into the residual stream).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from .quantize import Fp8Rows

# Sums a [L, D] partial result over the ranks of a tensor-parallel group (tp.all_reduce_sum); None on one rank.
Reduce = Callable[[Tensor], Tensor] | None


class Rows:
    """Token order inside the layer stack: the understanding tokens first, then the generation block.

    A gen block x = [head, x[gen], tail] is kept as [head, tail, x[gen]], so each expert owns one contiguous
    slice of rows, [:m] understanding and [m:] generation: its projections write straight into their rows
    (mm/addmm out=) and its norm weights scale them in place, with no per-op concatenation. Everything but
    attention works per token; attention takes the queries (and its mask rows) in this order and the keys in
    the original one, which is also the order of the returned KV cache.

    Batched passes (`passes` P > 1, Qwen2MoTModel.passes): one block of n tokens against P caches is P·n rows,
    still one slice per expert: every pass's understanding rows, pass after pass, then every pass's generation
    rows. Token-wise work sees `parts` only; attention takes each pass's rows (`of_pass`: the rows one pass
    alone would hold, in expert order) against its own cache and puts their outputs back (`join`).
    """

    def __init__(self, n: int, gen: slice | None, passes: int = 1):
        s, e = (n, n) if gen is None else gen.indices(n)[:2]
        if gen is not None and gen.step not in (None, 1):
            raise ValueError(f"gen must be a contiguous slice, got {gen}")
        e = max(e, s)
        self.n, self.s, self.e, self.m, self.passes = n, s, e, n - (e - s), passes
        self.identity = s == e or e == n  # the understanding tokens already precede the block

    def parts(self, und, gen) -> list[tuple[slice, object]]:
        """(rows, expert's module) for each expert that has tokens, over all passes."""
        M, N = self.passes * self.m, self.passes * self.n
        return [(r, mod) for r, mod in ((slice(0, M), und), (slice(M, N), gen)) if r.stop > r.start]

    def pack(self, t: Tensor, copy: bool = False) -> Tensor:
        """Original order -> expert order (dim 0); `copy` makes sure the result is a new tensor. With P passes t is
        [n, ...], every pass's (the block), or [P·n, ...], pass after pass (their positions)."""
        if self.passes == 1:
            return self.pack_one(t, copy)
        return self.join([self.pack_one(x) for x in (t.split(self.n) if t.shape[0] > self.n else [t] * self.passes)])

    def pack_one(self, t: Tensor, copy: bool = False) -> Tensor:
        """pack() of one pass's rows."""
        if self.identity:
            return t.clone() if copy else t
        return torch.cat([t[: self.s], t[self.e :], t[self.s : self.e]])

    def unpack(self, t: Tensor, before: Tensor | None = None) -> Tensor:
        """Expert order -> original order (dim 0) of one pass's rows, after `before` if given (the cache)."""
        s, m = self.s, self.m
        pieces = [t] if self.identity else [t[:s], t[m:], t[s:m]]
        if before is not None:
            pieces.insert(0, before)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def by_pass(self, device) -> Tensor | None:
        """The rows of_pass reads, pass after pass, [P·n] (int64 on `device`): t[by_pass] is every pass's rows together,
        pass p's at [p·n, (p+1)·n) (one gather instead of P copies); None with one pass (t itself)."""
        if self.passes == 1:
            return None
        index = torch.arange(self.passes * self.n, device=device)
        return torch.cat([self.of_pass(index, p) for p in range(self.passes)])

    def of_pass(self, t: Tensor, p: int) -> Tensor:
        """Pass p's n rows (expert order) of all passes' rows t [P·n, ...]."""
        if self.passes == 1:
            return t
        m, g, M = self.m, self.n - self.m, self.passes * self.m
        return torch.cat([t[p * m : (p + 1) * m], t[M + p * g : M + (p + 1) * g]])

    def join(self, ts: list[Tensor]) -> Tensor:
        """Each pass's n rows (expert order) -> all passes' rows [P·n, ...]; the inverse of of_pass."""
        if len(ts) == 1:
            return ts[0]
        return torch.cat([t[: self.m] for t in ts] + [t[self.m :] for t in ts])

    def pack_rope(self, t: Tensor) -> Tensor:
        """pack() of a RoPE table: [n, 1, Dh] per token; [1, 1, Dh] tables broadcast as they are."""
        return self.pack(t) if t.shape[0] == self.n else t


def normalise(x: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x²) + eps) over the last dim, computed in fp32 and rounded to x.dtype (Qwen2's first half).

    F.rms_norm upcasts bf16/fp16 itself (fp32 opmath; on CUDA one fused kernel), so there is no fp32 copy of x:
    bit-identical to `(x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)` on CPU.
    """
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def norm(x: Tensor, rows: Rows, und: nn.Module, gen: nn.Module) -> Tensor:
    """Each expert's nn.Module over the last dim of its rows of x (expert order): one normalisation for all rows,
    then the weight multiply in place (in the model dtype, after rounding, as Qwen2)."""
    parts = rows.parts(und, gen)
    if not _is_uniform(parts, x):
        return torch.cat([rms(x[r]) for r, rms in parts])  # not met by BAGEL: one eps, one dtype
    if kernels.fuses_layers(x):
        return kernels.rms_norm(x, und.eps, *_expert_weights(parts))  # one pass instead of two
    y = normalise(x, und.eps)
    for r, rms in parts:
        y[r].mul_(rms.weight)
    return y


def norm_rope(
    t: Tensor, cos: Tensor, sin: Tensor, rows: Rows, und: nn.Module, gen: nn.Module, order: Tensor | None = None
) -> Tensor:
    """RoPE of each expert's nn.Module of its rows of t [N, H, Dh] (expert order) over each head vector (q/k norm):
    [N, H, Dh], rows taken in `order` if given (in place on t where the kernel runs without one)."""
    parts = rows.parts(und, gen)
    if kernels.fuses_layers(t) and _is_uniform(parts, t) and cos.dtype == t.dtype:
        return kernels.qk_norm_rope(t, cos, sin, und.eps, *_expert_weights(parts), order)  # one pass, not five
    out = apply_rope(norm(t, rows, und, gen), cos, sin)
    return out if order is None else out[order]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: three passes, no rotated copy of x."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos
    out[..., :half].addcmul_(x2, sin[..., :half], value=-1)
    out[..., half:].addcmul_(x1, sin[..., half:])
    return out


def _is_uniform(parts: list[tuple[slice, nn.Module]], x: Tensor) -> bool:
    return all(rms.eps == parts[0][1].eps and rms.weight.dtype == x.dtype for _, rms in parts)  # BAGEL's are


def _expert_weights(parts: list[tuple[slice, nn.Module]]) -> tuple[Tensor, Tensor, int]:
    """The kernels' (w, w_tail, split): first and last expert's weights, the last one's first row (0 if alone)."""
    return parts[0][1].weight, parts[-1][1].weight, parts[-1][0].start


def project(x: Tensor | Fp8Rows, rows: Rows, und: nn.Linear, gen: nn.Linear) -> Tensor:
    """Each expert's Linear on its rows of x [L, Din] (expert order), written straight into one [L, Dout]."""
    out = torch.empty(x.shape[0], und.out_features, dtype=x.dtype, device=x.device)
    for r, lin in rows.parts(und, gen):
        if not isinstance(lin, nn.Linear):
            out[r] = lin(x[r])  # a quantized layer (quantize.py) runs its own GEMM
        elif lin.bias is None:
            torch.mm(x[r], lin.weight.t(), out=out[r])
        else:
            torch.addmm(lin.bias, x[r], lin.weight.t(), out=out[r])  # what F.linear runs, bias fused
    return out


def add_projection(acc: Tensor, x: Tensor, rows: Rows, und: nn.Linear, gen: nn.Linear, reduce: Reduce) -> None:
    """acc += each expert's Linear of its rows of x, in place (the residual rides in the GEMM's C operand).

    With `reduce` (tensor parallel, see tp.py) each rank's product is a partial sum over its slice of the inputs:
    the partials are summed over the ranks first, then added to the (replicated) residual once. The Linears split
    by input columns (o_proj, down_proj) have no bias in BAGEL, which every rank would otherwise add.
    """
    if reduce is not None:
        acc += reduce(project(x, rows, und, gen))
        return
    for r, lin in rows.parts(und, gen):
        if not isinstance(lin, nn.Linear):
            acc[r] += lin(x[r])  # a quantized layer (quantize.py) runs its own GEMM
            continue
        acc[r].addmm_(x[r], lin.weight.t())
        if lin.bias is not None:
            acc[r].add_(lin.bias)


def swiglu(mlp: nn.Module, x: Tensor | Fp8Rows) -> Tensor:
    """silu(gate(x)) * up(x), in place on the gate output (no [L, hidden] temporaries)."""
    return silu_mul_(mlp.gate_proj(x), mlp.up_proj(x))


def silu_mul_(g: Tensor, u: Tensor) -> Tensor:
    if kernels.fuses_layers(g):
        return kernels.swiglu_(g, u)  # one pass instead of two
    return F.silu(g, inplace=True).mul_(u)


def add_mlp(x: Tensor, h: Tensor | Fp8Rows, rows: Rows, und: nn.Module, gen: nn.Module, reduce: Reduce) -> None:
    """x += each expert's MLP of its rows of h, in place; with `reduce`, as add_projection (down_proj has no bias)."""
    if reduce is None:
        for r, mlp in rows.parts(und, gen):
            if not isinstance(mlp.down_proj, nn.Linear):
                x[r] += mlp.down_proj(swiglu(mlp, h[r]))  # a quantized layer (quantize.py) runs its own GEMM
                continue
            x[r].addmm_(swiglu(mlp, h[r]), mlp.down_proj.weight.t())  # the residual in the GEMM's C operand
        return
    out = torch.empty_like(x)  # [L, D] this rank's partial sums, both experts' rows
    for r, mlp in rows.parts(und, gen):
        if not isinstance(mlp.down_proj, nn.Linear):
            out[r] = mlp.down_proj(swiglu(mlp, h[r]))  # a quantized layer (quantize.py) runs its own GEMM
            continue
        torch.mm(swiglu(mlp, h[r]), mlp.down_proj.weight.t(), out=out[r])
    x += reduce(out)
