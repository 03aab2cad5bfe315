"""Single-head attention for the VAE mid-block (head dim = channels, 512) as one Triton kernel.

Flash-attention style: each program owns BLOCK_M query rows, walks all keys BLOCK_N at a time with an
online softmax in fp32 (running max and sum, exp2 with the scale folded in), and keeps the whole
[BLOCK_M, D] fp32 output accumulator in registers, so the Lq x L score matrix never reaches memory.

D = 512 is what makes this unusual: a [64, 512] fp32 accumulator is 128 registers per thread at
8 warps, so BLOCK_M stays at 64; Q either stays resident in shared memory (64 KiB) or, with
`qk_chunk`, is re-read from L2 in D-chunks so that K/V tiles get the shared memory instead.
`CONFIGS` lists the candidates the GPU bench times; `DEFAULT_CONFIG` picks one per head dim.

Strides are free (the engine's q/k/v are transposed views of NCHW maps, token dim contiguous); the
output copies q's layout, so the caller's `transpose(-1, -2).reshape(B, C, H, W)` stays a view.
Without Triton, on CPU (unless TRITON_INTERPRET=1), for fp32 or other head dims: PyTorch SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import takes_attention_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the SDPA fallback is all there is
    triton = None

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    block_m: int  # query rows per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int  # software-pipelining depth of the key loop
    qk_chunk: int = 0  # 0: Q resident for the whole key loop; else QK^T as D/qk_chunk dots on re-read Q chunks

    @property
    def name(self) -> str:
        chunk = f"c{self.qk_chunk}" if self.qk_chunk else ""
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}{chunk}"


# Candidates for the GPU bench. At D = 512 the accumulator allows block_m = 64 only (128 fp32 registers a
# thread at 8 warps). Shared memory, bf16: Q 64 KiB plus K and V tiles of block_n KiB each per stage, within
# the 227 KiB a Hopper block may take; a chunked Q is pipelined too, so it saves none. Offline sm_90 builds
# (Triton 3.6) of the main loop: m64n32w8s2 no spills, 2x HGMMA 64x16 per k-step for S, 64x256 for PV;
# m64n16w8s3 no spills; m64n64w8s1 unpipelined, ~20 local loads a step; 16 warps cap registers at 128.
CONFIGS = {
    c.name: c
    for c in (
        AttnConfig(64, 32, 8, 2),  # 64 + 2 * 64 KiB
        AttnConfig(64, 32, 8, 2, qk_chunk=128),
        AttnConfig(64, 16, 8, 3),  # 64 + 3 * 32 KiB
        AttnConfig(64, 64, 8, 1),  # 64 + 128 KiB
        AttnConfig(64, 32, 8, 1),
        AttnConfig(64, 32, 16, 2),
        AttnConfig(64, 64, 8, 2),  # head dims up to 256
        AttnConfig(128, 64, 8, 3),
        AttnConfig(128, 64, 4, 3),
    )
}
DEFAULT_CONFIG = {64: "m128n64w4s3", 128: "m128n64w8s3", 256: "m64n64w8s2", 512: "m64n32w8s2"}


def attention(q: Tensor, k: Tensor, v: Tensor, config: str | None = None, out: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for one head, softmax in fp32, output in the input dtype.

    Args:
        q: [B, 1, Lq, D] (or [B, Lq, D]) queries; bf16/fp16 with D in {64, 128, 256, 512} take the kernel,
            the rest SDPA.
        k, v: [B, 1, L, D] (or [B, L, D]) keys and values, same dtype and device as q. Any strides.
        config: a key of `CONFIGS`; default `DEFAULT_CONFIG[D]`.
        out: optional tensor shaped like q to write into (any strides); returned.
    """
    if q.dim() == k.dim() == v.dim() == 3:  # [B, L, D]: the same memory with a unit head dim
        o = attention(q[:, None], k[:, None], v[:, None], config, None if out is None else out[:, None])
        return o[:, 0]
    if not is_supported(q, k, v):
        o = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return o if out is None else out.copy_(o)
    B, _, Lq, D = q.shape
    L = k.shape[2]
    cfg = CONFIGS[config or DEFAULT_CONFIG[D]]
    if cfg.qk_chunk and D % cfg.qk_chunk:
        raise ValueError(f"config {cfg.name}: qk_chunk {cfg.qk_chunk} must divide the head dim {D}; pick another")
    o = torch.empty_like(q) if out is None else out  # empty_like keeps q's strides
    assert o.shape == q.shape and o.dtype == q.dtype, (o.shape, o.dtype)
    grid = (triton.cdiv(Lq, cfg.block_m), B)
    _attention_kernel[grid](
        q, k, v, o,
        q.stride(0), q.stride(2), q.stride(3),
        k.stride(0), k.stride(2), k.stride(3),
        v.stride(0), v.stride(2), v.stride(3),
        o.stride(0), o.stride(2), o.stride(3),
        Lq, L, LOG2E / math.sqrt(D),
        D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_CHUNK=cfg.qk_chunk or D,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o


def is_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the Triton kernel takes these inputs (else SDPA does)."""
    return (
        takes_attention_inputs(q, k, v)
        and q.dim() == 4
        and q.shape[1] == k.shape[1] == 1
        and q.shape[-1] in DEFAULT_CONFIG
    )


if triton is not None:

    @triton.jit
    def _scores(q, q_ptrs, kt_ptrs, sqd, skd, D: tl.constexpr, QK_CHUNK: tl.constexpr):
        """S = Q K^T for one key block, fp32 [BLOCK_M, BLOCK_N]; kt_ptrs point at a [D, BLOCK_N] tile."""
        if QK_CHUNK == D:
            s = tl.dot(q, tl.load(kt_ptrs))
        else:
            s = tl.dot(tl.load(q_ptrs), tl.load(kt_ptrs))
            for d0 in tl.static_range(QK_CHUNK, D, QK_CHUNK):
                s = tl.dot(tl.load(q_ptrs + d0 * sqd), tl.load(kt_ptrs + d0 * skd), s)
        return s

    @triton.jit
    def _softmax_step(acc, m_i, l_i, s, v, qk_scale):
        """Fold one block of raw scores s [BLOCK_M, BLOCK_N] and values v [BLOCK_N, D] into the running state."""
        s = s * qk_scale  # log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)  # [BLOCK_M]; 0 on the first block (m_i = -inf)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit
    def _attention_kernel(
        Q, K, V, Out,
        sqb, sqm, sqd, skb, skn, skd, svb, svn, svd, sob, som, sod,
        Lq, L, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_CHUNK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.minimum(offs_m, Lq - 1).to(tl.int64)  # clamped: tail rows recompute the last row, never stored
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, QK_CHUNK).to(tl.int64)  # QK^T contraction chunk
        offs_d = tl.arange(0, D).to(tl.int64)

        q_ptrs = Q + b * sqb + rows[:, None] * sqm + offs_c[None, :] * sqd  # [BLOCK_M, QK_CHUNK]
        kt_ptrs = K + b * skb + offs_n[None, :] * skn + offs_c[:, None] * skd  # [QK_CHUNK, BLOCK_N]
        v_ptrs = V + b * svb + offs_n[:, None] * svn + offs_d[None, :] * svd  # [BLOCK_N, D]
        q = tl.load(q_ptrs)  # the whole Q tile when QK_CHUNK == D; unused otherwise

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        L_full = (L // BLOCK_N) * BLOCK_N
        for _ in range(0, L_full, BLOCK_N):
            s = _scores(q, q_ptrs, kt_ptrs, sqd, skd, D, QK_CHUNK)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, tl.load(v_ptrs), qk_scale)
            kt_ptrs += BLOCK_N * skn
            v_ptrs += BLOCK_N * svn
        if L_full < L:  # last partial block: clamp key indices in bounds, drop their scores
            cols = tl.minimum(L_full + offs_n, L - 1).to(tl.int64)
            kt_ptrs = K + b * skb + cols[None, :] * skn + offs_c[:, None] * skd
            v_ptrs = V + b * svb + cols[:, None] * svn + offs_d[None, :] * svd
            s = _scores(q, q_ptrs, kt_ptrs, sqd, skd, D, QK_CHUNK)
            s = tl.where((L_full + offs_n)[None, :] < L, s, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, tl.load(v_ptrs), qk_scale)

        acc = acc / l_i[:, None]
        o_ptrs = Out + b * sob + offs_m[:, None].to(tl.int64) * som + offs_d[None, :] * sod
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)
