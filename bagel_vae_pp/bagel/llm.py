"""Qwen2 Mixture-of-Transformers decoder of BAGEL (modeling/bagel/qwen2_navit.py, inference path only).

Every layer holds two weight sets: the understanding expert (stock Qwen2 names) and the generation expert
(the same names with `_moe_gen`). Routing is hard, by token type: in a "gen" call the VAE-latent tokens
`x[gen]` use `*_moe_gen` weights and the `<|vision_start|>`/`<|vision_end|>` markers around them keep the
understanding weights; all tokens share one self-attention over the KV cache plus themselves (GQA, q/k
RMSNorm per head, RoPE). Sequences are one sample, unbatched: tensors are [L, D].

Attention is torch SDPA. Causal calls append to a cache, so queries are the last L of Lk keys and the mask is
aligned bottom-right (flash-attn varlen semantics); SDPA's own `is_causal` would align top-left.

Where the Triton kernels run (kernels.fuses_layers: CUDA, bf16/fp32) the work between the GEMMs is fused, rounding
where the torch path does: RMSNorm with its weight, q/k norm with RoPE, silu(gate) * up (kernels/rms_norm.py,
qk_norm_rope.py, swiglu.py). Residual adds ride in the o_proj and down_proj GEMMs (addmm_ into the residual stream).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from .config import LLMConfig
from .quantize import Fp8Rows, quantize_once

# One layer's cached keys and values, [Lk, Hkv, Dh] each.
LayerKV = tuple[Tensor, Tensor]
# Sums a [L, D] partial result over the ranks of a tensor-parallel group (tp.all_reduce_sum); None on one rank.
Reduce = Callable[[Tensor], Tensor] | None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * _normalise(x, self.eps)


def _normalise(x: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x²) + eps) over the last dim, computed in fp32 and rounded to x.dtype (Qwen2's first half).

    F.rms_norm upcasts bf16/fp16 itself (fp32 opmath; on CUDA one fused kernel), so there is no fp32 copy of x:
    bit-identical to `(x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)` on CPU.
    """
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(_swiglu(self, x))


def _swiglu(mlp: MLP, x: Tensor | Fp8Rows) -> Tensor:
    """silu(gate(x)) * up(x), in place on the gate output (no [L, hidden] temporaries)."""
    return _silu_mul_(mlp.gate_proj(x), mlp.up_proj(x))


def _silu_mul_(g: Tensor, u: Tensor) -> Tensor:
    if kernels.fuses_layers(g):
        return kernels.swiglu_(g, u)  # one pass instead of two
    return F.silu(g, inplace=True).mul_(u)


class _Rows:
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


def _norm(x: Tensor, rows: _Rows, und: RMSNorm, gen: RMSNorm) -> Tensor:
    """Each expert's RMSNorm over the last dim of its rows of x (expert order): one normalisation for all rows,
    then the weight multiply in place (in the model dtype, after rounding, as Qwen2)."""
    parts = rows.parts(und, gen)
    if not _is_uniform(parts, x):
        return torch.cat([norm(x[r]) for r, norm in parts])  # not met by BAGEL: one eps, one dtype
    if kernels.fuses_layers(x):
        return kernels.rms_norm(x, und.eps, *_expert_weights(parts))  # one pass instead of two
    y = _normalise(x, und.eps)
    for r, norm in parts:
        y[r].mul_(norm.weight)
    return y


def _norm_rope(
    t: Tensor, cos: Tensor, sin: Tensor, rows: _Rows, und: RMSNorm, gen: RMSNorm, order: Tensor | None = None
) -> Tensor:
    """RoPE of each expert's RMSNorm of its rows of t [N, H, Dh] (expert order) over each head vector (q/k norm):
    [N, H, Dh], rows taken in `order` if given (in place on t where the kernel runs without one)."""
    parts = rows.parts(und, gen)
    if kernels.fuses_layers(t) and _is_uniform(parts, t) and cos.dtype == t.dtype:
        return kernels.qk_norm_rope(t, cos, sin, und.eps, *_expert_weights(parts), order)  # one pass, not five
    out = apply_rope(_norm(t, rows, und, gen), cos, sin)
    return out if order is None else out[order]


def _is_uniform(parts: list[tuple[slice, RMSNorm]], x: Tensor) -> bool:
    return all(norm.eps == parts[0][1].eps and norm.weight.dtype == x.dtype for _, norm in parts)  # BAGEL's are


def _expert_weights(parts: list[tuple[slice, RMSNorm]]) -> tuple[Tensor, Tensor, int]:
    """The kernels' (w, w_tail, split): first and last expert's weights, the last one's first row (0 if alone)."""
    return parts[0][1].weight, parts[-1][1].weight, parts[-1][0].start


def _project(x: Tensor | Fp8Rows, rows: _Rows, und: nn.Linear, gen: nn.Linear) -> Tensor:
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


def _add_projection(acc: Tensor, x: Tensor, rows: _Rows, und: nn.Linear, gen: nn.Linear, reduce: Reduce) -> None:
    """acc += each expert's Linear of its rows of x, in place (the residual rides in the GEMM's C operand).

    With `reduce` (tensor parallel, see tp.py) each rank's product is a partial sum over its slice of the inputs:
    the partials are summed over the ranks first, then added to the (replicated) residual once. The Linears split
    by input columns (o_proj, down_proj) have no bias in BAGEL, which every rank would otherwise add.
    """
    if reduce is not None:
        acc += reduce(_project(x, rows, und, gen))
        return
    for r, lin in rows.parts(und, gen):
        if not isinstance(lin, nn.Linear):
            acc[r] += lin(x[r])  # a quantized layer (quantize.py) runs its own GEMM
            continue
        acc[r].addmm_(x[r], lin.weight.t())
        if lin.bias is not None:
            acc[r].add_(lin.bias)


def _add_mlp(x: Tensor, h: Tensor, rows: _Rows, und: MLP, gen: MLP, reduce: Reduce) -> None:
    """x += each expert's MLP of its rows of h, in place; with `reduce`, as _add_projection (down_proj has no bias)."""
    h = quantize_once(h, und.gate_proj, und.up_proj, gen.gate_proj, gen.up_proj)  # FP8 GEMMs: gate/up share it
    if reduce is None:
        for r, mlp in rows.parts(und, gen):
            if not isinstance(mlp.down_proj, nn.Linear):
                x[r] += mlp.down_proj(_swiglu(mlp, h[r]))  # a quantized layer (quantize.py) runs its own GEMM
                continue
            x[r].addmm_(_swiglu(mlp, h[r]), mlp.down_proj.weight.t())  # the residual in the GEMM's C operand
        return
    out = torch.empty_like(x)  # [L, D] this rank's partial sums, both experts' rows
    for r, mlp in rows.parts(und, gen):
        if not isinstance(mlp.down_proj, nn.Linear):
            out[r] = mlp.down_proj(_swiglu(mlp, h[r]))  # a quantized layer (quantize.py) runs its own GEMM
            continue
        torch.mm(_swiglu(mlp, h[r]), mlp.down_proj.weight.t(), out=out[r])
    x += reduce(out)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Qwen2 default RoPE tables for `positions` [L]: cos, sin [L, 1, Dh] (fp32 math, then model dtype)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    )
    freqs = positions.float()[:, None] * inv_freq[None]  # [L, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [L, 1, Dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def repeat_kv(t: Tensor, groups: tuple[int, ...]) -> Tensor:
    """[Hkv, Lk, Dh] -> [H, Lk, Dh]: KV head j repeated for the next groups[j] query heads.

    Equal groups (one rank: H // Hkv each) are one repeat_interleave. A tensor-parallel rank whose block of
    query heads straddles two GQA groups has unequal ones (28 heads, 4 KV heads, rank 1 of 3: heads 10..18 read
    KV head 1 four times, then KV head 2 five times); the expanded views are copied once by the cat.
    """
    if len(set(groups)) == 1:
        return t.repeat_interleave(groups[0], dim=0)
    return torch.cat([t[j : j + 1].expand(n, -1, -1) for j, n in enumerate(groups)])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: three passes, no rotated copy of x."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos
    out[..., :half].addcmul_(x2, sin[..., :half], value=-1)
    out[..., half:].addcmul_(x1, sin[..., half:])
    return out


def attention_mask(q_len: int, k_len: int, causal: bool, device) -> Tensor | None:
    """Bottom-right causal mask (True = attend): query i sees keys up to i + k_len - q_len. None = full."""
    if not causal or q_len == 1:
        return None
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.kv_groups = (self.n_heads // self.n_kv,) * self.n_kv  # query heads per KV head (tp.py: this rank's)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(cfg.hidden_size, q_dim, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(q_dim, cfg.hidden_size, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(self.head_dim, cfg.rms_norm_eps))
            setattr(self, "k_norm" + suffix, RMSNorm(self.head_dim, cfg.rms_norm_eps))

    @torch.no_grad()
    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: LayerKV | None, gen: slice | None, causal: bool
    ) -> tuple[Tensor, LayerKV]:
        rows = _Rows(x.shape[0], gen)
        out, kvs = self.attend(rows.pack(x), _pack_rope(rows, cos), _pack_rope(rows, sin), [past], rows, causal)
        return rows.unpack(_project(out, rows, self.o_proj, self.o_proj_moe_gen)), kvs[0]

    def attend(
        self, x: Tensor, cos: Tensor, sin: Tensor, pasts: list[LayerKV | None], rows: _Rows, causal: bool
    ) -> tuple[Tensor, list[LayerKV]]:
        """Attention of the normed tokens x [P·L, D] (expert order, P = rows.passes) before o_proj: [P·L, H*Dh]
        (expert order), and each pass's cache pasts[p] extended by its new keys/values (original order)."""
        N, H, Hkv, Dh = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        x = quantize_once(x, *(getattr(self, f"{n}_proj{s}") for n in "qkv" for s in ("", "_moe_gen")))  # FP8 once
        q = _project(x, rows, self.q_proj, self.q_proj_moe_gen).view(N, H, Dh)
        k = _project(x, rows, self.k_proj, self.k_proj_moe_gen).view(N, Hkv, Dh)
        v = _project(x, rows, self.v_proj, self.v_proj_moe_gen).view(N, Hkv, Dh)
        # [P·L, H, Dh], pass after pass: pass p's queries are q[p·L : (p+1)·L]
        q = _norm_rope(q, cos, sin, rows, self.q_norm, self.q_norm_moe_gen, rows.by_pass(q.device))
        k = _norm_rope(k, cos, sin, rows, self.k_norm, self.k_norm_moe_gen)  # [P·L, Hkv, Dh]
        outs, kvs = [], []
        for p, past in enumerate(pasts):
            # [Lk, Hkv, Dh]: the pass's cache, then its new tokens in their original order
            before = (None, None) if past is None else past
            k_p, v_p = (rows.unpack(rows.of_pass(t, p), b) for t, b in zip((k, v), before))
            outs.append(self.sdpa(q[p * rows.n : (p + 1) * rows.n], k_p, v_p, rows, causal))
            kvs.append((k_p, v_p))
        return rows.join(outs), kvs

    def sdpa(self, q: Tensor, k: Tensor, v: Tensor, rows: _Rows, causal: bool) -> Tensor:
        """One pass's queries q [L, H, Dh] (expert order) over its keys and values [Lk, Hkv, Dh] -> [L, H*Dh]."""
        L, H, Dh = q.shape
        mask = attention_mask(L, k.shape[0], causal, q.device)
        if mask is not None:
            mask = rows.pack_one(mask)  # query rows in expert order
        # GQA (head h reads KV head h // rep, with equal groups). Unmasked half-precision calls (every velocity
        # pass) pass the Hkv heads with enable_gqa: the flash/cuDNN kernels take it (bit-identical output, and no
        # [H, Lk, Dh] K/V copies: 2.5 ms of a 1024² pass on an H200). Masked or fp32 calls, and tensor-parallel
        # ranks with unequal groups, repeat the K/V heads, which every SDPA backend takes (a backend without GQA
        # support would fall back to the memory-hungry math kernel).
        gqa = mask is None and q.dtype in (torch.float16, torch.bfloat16) and len(set(self.kv_groups)) == 1
        k_all, v_all = (t.transpose(0, 1) if gqa else repeat_kv(t.transpose(0, 1), self.kv_groups) for t in (k, v))
        # 4-D inputs: SDPA's fused kernels take only [B, H, L, Dh]; 3-D ones fell back to the fp32 math kernel
        # (73% of a 1024² velocity pass on an H200).
        q_all = q.transpose(0, 1)[None]  # [1, H, L, Dh]
        out = F.scaled_dot_product_attention(q_all, k_all[None], v_all[None], attn_mask=mask, enable_gqa=gqa)[0]
        return out.transpose(0, 1).reshape(L, H * Dh)


def _pack_rope(rows: _Rows, t: Tensor) -> Tensor:
    return rows.pack(t) if t.shape[0] == rows.n else t  # [1, 1, Dh] tables broadcast as they are


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        for suffix in ("", "_moe_gen"):
            setattr(self, "input_layernorm" + suffix, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, "post_attention_layernorm" + suffix, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.reduce: Reduce = None  # set by tp.py on a rank of a tensor-parallel group

    @torch.no_grad()
    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: LayerKV | None, gen: slice | None, causal: bool
    ) -> tuple[Tensor, LayerKV]:
        rows = _Rows(x.shape[0], gen)
        x, kvs = self.step(rows.pack(x, copy=True), _pack_rope(rows, cos), _pack_rope(rows, sin), [past], rows, causal)
        return rows.unpack(x), kvs[0]

    def step(
        self, x: Tensor, cos: Tensor, sin: Tensor, pasts: list[LayerKV | None], rows: _Rows, causal: bool
    ) -> tuple[Tensor, list[LayerKV]]:
        """forward() on x [P·L, D] in expert order (P = rows.passes, one cache each), updated IN PLACE (the residual
        stream) and returned, with each pass's extended cache."""
        h = _norm(x, rows, self.input_layernorm, self.input_layernorm_moe_gen)  # [P·L, D]
        h, kvs = self.self_attn.attend(h, cos, sin, pasts, rows, causal)
        _add_projection(x, h, rows, self.self_attn.o_proj, self.self_attn.o_proj_moe_gen, self.reduce)  # x += o_proj(h)
        h = _norm(x, rows, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        _add_mlp(x, h, rows, self.mlp, self.mlp_moe_gen, self.reduce)
        return x, kvs


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.stream = None  # a stream.LayerStream once some layers live off the device (stream.stream_layers_)

    @torch.no_grad()
    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        past: tuple[LayerKV, ...] | None,
        gen: slice | None = None,
        causal: bool = False,
    ) -> tuple[Tensor, tuple[LayerKV, ...]]:
        """Run new tokens x [L, D] at RoPE `positions` [L] against the cache `past` (None = empty).

        Args:
            gen: the latent tokens' slice of x (generation expert); None routes all tokens to understanding.
            causal: bottom-right causal mask (text); False = full attention (image blocks).
        Returns the final-norm hidden states [L, D] and every layer's cache extended by the new tokens.
        Inference only (no autograd).
        """
        rows = _Rows(x.shape[0], gen)
        x, kv = self._run(x, positions, [past], rows, causal, keep_kv=True)
        return rows.unpack(x), tuple(layer_kvs[0] for layer_kvs in kv)

    @torch.no_grad()
    def passes(
        self, x: Tensor, positions: list[Tensor], pasts: list[tuple[LayerKV, ...] | None], gen: slice | None
    ) -> list[Tensor]:
        """Batched passes: one block x [L, D] against P caches at once, full attention, the caches not extended.

        Pass p gives forward(x, positions[p], pasts[p], gen)'s hidden states, but the layer stack runs once for all
        of them: every token-wise op (norms, projections, MLPs; each expert one GEMM) on P·L rows (_Rows),
        attention per pass against its own cache at its own RoPE positions. Each weight is thus read once per call
        instead of P times, and a streamed layer (stream.py) copied once. Memory: the activations of P·L rows
        instead of L (a 1024² velocity pass has L = 4098 tokens: ~0.6 GiB of bf16 activations per pass at full
        size, stream.pass_work_bytes), and no new KV caches (each layer's extended ones are dropped).

        Args:
            positions: P tensors [L], each pass's RoPE positions (a context's own).
            pasts: P caches (None = empty).
        Returns P final-norm hidden states [L, D].
        """
        rows = _Rows(x.shape[0], gen, len(pasts))
        x, _ = self._run(x, torch.cat(positions), pasts, rows, causal=False, keep_kv=False)
        return [rows.unpack(rows.of_pass(x, p)) for p in range(rows.passes)]

    def _run(self, x: Tensor, positions: Tensor, pasts: list, rows: _Rows, causal: bool, keep_kv: bool):
        """The layer stack on block x [L, D] at `positions` [P·L] (pass after pass) against each pass's cache:
        final-norm hidden states [P·L, D] (expert order), and every layer's extended caches if keep_kv."""
        cos, sin = rope_cos_sin(rows.pack(positions), self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        x = rows.pack(x, copy=True)  # the residual stream, updated in place by every layer
        new_kv = []
        layers = self.layers if self.stream is None else self.stream.layers(self.layers)
        for i, layer in enumerate(layers):
            x, kvs = layer.step(x, cos, sin, [None if past is None else past[i] for past in pasts], rows, causal)
            if keep_kv:
                new_kv.append(kvs)
        return _norm(x, rows, self.norm, self.norm_moe_gen), new_kv


class Qwen2MoTForCausalLM(nn.Module):
    """Holds `model.*` and the untied `lm_head`, the key layout of `language_model.*` in ema.safetensors."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
