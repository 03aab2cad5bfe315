"""Single-head wide attention (the VAE mid-block's D = 512) as two Triton GEMMs with the probabilities stored once.

The GEMM form (gemm_attention.py) pays 16 bytes of memory traffic per score around cuBLAS: fp32 scores written
and read twice by the softmax, bf16 probabilities written and read. A flash kernel pays none but its
[rows, 512] fp32 accumulator caps it near 190 TFLOP/s. Here, per block of queries:

1. `_scores_kernel`, program (BM queries, BN keys): S = Q K^T in fp32 over D in BK chunks; in log2 units
   s = S log2(e) / sqrt(D), m = ceil(max s over the tile's keys) (an integer), p = exp2(s - m). It stores p in
   q's dtype into P [rows, keys] and, per (key tile, row), m and l = sum of the unrounded fp32 p.
2. `_merge_stats_kernel`, per row: M = max_t m_t and 1 / sum_t l_t exp2(m_t - M) (integer exponents: exact).
3. `_pv_kernel`, program (BM2 queries, BD output columns, a range of keys): P v over keys in BK2 steps (BK2
   divides BN, so a step sits in one key tile), each P tile scaled in fp32 by its row's exp2(m_t - M) and cast
   back, epilogue times 1 / l. The D / BD programs of one row tile are launched next to each other so P comes
   from HBM once and from L2 for the rest. When there are too few row tiles to fill the GPU, the keys are cut
   into splits (whole key tiles) whose fp32 partial outputs torch then sums.

Numerics: softmax in fp32 on fp32 scores, P rounded once to bf16 (fp16) as a flash kernel rounds P, fp32
accumulation in both products. The rescale by exp2(m_t - M) is a power of two, so it is exact as long as the
product stays in the dtype's normal range (bf16 down to 2^-126, fp16 2^-14 of the row max; below that P
flushes or loses bits, as a flash kernel's exp does), and bf16(p) 2^(m_t - M) = bf16(exp2(s - M)): the result
is the flash kernel's up to the order of summation (and cleaner, as a flash kernel rescales its accumulator by
non-powers of two). Keys past L score -inf in their tile (p = 0 stored); padded query rows repeat the last row
and are never stored to the output.

Traffic per score: P written and read once, 4 bytes, plus 8 bytes of (m, l) per BN scores of a row (1/16 byte
at BN = 128) and K, V re-read once per block of queries (~0.25 byte each at 4096 queries x 262144 keys). The
P block, rows x keys in q's dtype, stays within `p_bytes` (default P_BYTES = 2 GiB: 4096 query rows at 262144
keys).

Without Triton, or on CPU unless TRITON_INTERPRET=1, or for dtypes / head dims the kernels do not take, this
is `gemm_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import takes_attention_inputs
from .gemm_attention import gemm_attention

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LOG2E = 1.4426950408889634
P_BYTES = 2**31  # the probability block of one block of queries, [rows, keys] in q's dtype
MERGE_ROWS, MERGE_TILES = 32, 64  # the stats merge: rows per program, key tiles per step
MAX_KEY_SPLITS = 16
DEFAULT_SMS = 132  # H100 / H200; stands in for the SM count under the interpreter


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program
    block_n: int  # scores: keys per program; PV: output columns (of D) per program
    block_k: int  # contraction step: D for the scores, keys for PV (must divide the scores' block_n)
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"


# Candidates for the GPU bench. Comments: registers a thread and shared memory of offline sm_90 builds (Triton
# 3.6, contiguous bf16 operands, D = 512): no spills in any, every loop software-pipelined with cp.async.
# Scores: the K loop is only D / block_k = 8 steps, so one program cannot hide its epilogue (exp2, row max and
# sum, P store); the default fits two programs an SM (<= 128 registers, <= 113 KiB) to overlap each other's.
# n256 / m256 cut the L2 re-reads of Q and K tiles from 16 to 12 bytes a score, at one program an SM.
SCORE_CONFIGS = {
    c.name: c
    for c in (
        TileConfig(128, 128, 64, 8, 3),  # 111 regs, 96 KiB: two programs an SM
        TileConfig(128, 128, 64, 8, 4),  # 111 regs, 128 KiB
        TileConfig(128, 256, 64, 8, 3),  # 221 regs, 144 KiB
        TileConfig(128, 128, 128, 8, 2),  # 145 regs, 128 KiB, 4 K steps
        TileConfig(128, 128, 64, 4, 3),  # 217 regs, 96 KiB, one warpgroup
        TileConfig(256, 128, 64, 8, 3),  # 203 regs, 144 KiB
        TileConfig(64, 64, 64, 4, 2),  # 72 regs, 32 KiB: small shapes and the interpreter tests
    )
}
# PV: the fp32 accumulator is block_m x block_n (128 x 256: 128 registers a thread at 8 warps); each P tile goes
# shared -> registers in the wgmma operand layout, is scaled there and feeds the wgmma from registers, V from
# shared memory. One program an SM for all but the last.
PV_CONFIGS = {
    c.name: c
    for c in (
        TileConfig(128, 256, 64, 8, 3),  # 236 regs, 129 KiB
        TileConfig(128, 256, 64, 8, 4),  # 236 regs, 178 KiB
        TileConfig(128, 256, 32, 8, 4),  # 196 regs, 90 KiB
        TileConfig(64, 256, 64, 4, 4),  # 250 regs, 153 KiB, one warpgroup
        TileConfig(128, 128, 64, 4, 4),  # 232 regs, 114 KiB, D / 128 = 4 column tiles share P
        TileConfig(256, 128, 64, 8, 3),  # 217 regs, 115 KiB
        TileConfig(64, 64, 64, 4, 2),  # 125 regs, 24 KiB: small shapes and the interpreter tests
    )
}
DEFAULT_SCORE_CONFIG, DEFAULT_PV_CONFIG = "m128n128k64w8s3", "m128n256k64w8s3"


def split_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor | None = None,
    scores_config: str | None = None,
    pv_config: str | None = None,
    p_bytes: int = P_BYTES,
    key_splits: int | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for one head, softmax in fp32, P rounded once, output in q's dtype.

    Args:
        q: [B, Lq, D] queries; bf16/fp16 with a power-of-two D in [16, 1024] take the kernels, the rest
            `gemm_attention`. Any strides.
        k, v: [B, L, D] keys and values, same dtype and device as q. Any strides.
        out: optional [B, Lq, D] tensor in q's dtype to write into (any strides); returned.
        scores_config, pv_config: keys of `SCORE_CONFIGS` / `PV_CONFIGS`; default DEFAULT_*_CONFIG.
        p_bytes: bound on the stored probabilities of one block of queries (at least one row tile is taken).
        key_splits: key ranges of the PV kernel; default: the fewest that fill the GPU's SMs best.
    """
    if not is_supported(q, k, v):
        return gemm_attention(q, k, v, out)
    B, Lq, D = q.shape
    L = k.shape[1]
    sc = SCORE_CONFIGS[scores_config or DEFAULT_SCORE_CONFIG]
    pv = PV_CONFIGS[pv_config or DEFAULT_PV_CONFIG]
    if sc.block_n % pv.block_k:
        raise ValueError(f"PV config {pv.name}: its key step {pv.block_k} must divide the scores' {sc.block_n}")
    bk, bd = min(sc.block_k, D), min(pv.block_n, D)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    assert o.shape == q.shape and o.dtype == q.dtype, (o.shape, o.dtype)

    n_tiles = cdiv(L, sc.block_n)
    Lp = n_tiles * sc.block_n  # P's row stride; keys in [L, Lp) hold p = 0
    if n_tiles > 65535:
        raise ValueError(
            f"{L} keys make {n_tiles} key tiles, over the grid's 65535: take a scores config with a larger block_n"
        )
    R = max(sc.block_m, pv.block_m, MERGE_ROWS)  # row granularity (powers of two: the others divide it)
    rows = min(max(R, p_bytes // (Lp * q.element_size()) // R * R), cdiv(Lq, R) * R)
    assert n_tiles * rows < 2**31, (n_tiles, rows)  # the [T, rows] stats are indexed in int32
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else DEFAULT_SMS
    splits = key_splits or pick_key_splits((rows // pv.block_m) * (D // bd), n_tiles, sms)
    per_split = cdiv(n_tiles, splits)  # key tiles a split
    splits = cdiv(n_tiles, per_split)  # no empty split

    f32 = dict(dtype=torch.float32, device=q.device)
    p = torch.empty(rows, Lp, dtype=q.dtype, device=q.device)  # [rows, Lp]
    tile_max, tile_sum = torch.empty(n_tiles, rows, **f32), torch.empty(n_tiles, rows, **f32)  # [T, rows]
    row_max, inv_sum = torch.empty(rows, **f32), torch.empty(rows, **f32)  # [rows]
    part = torch.empty(splits, rows, D, **f32) if splits > 1 else None  # [splits, rows, D]
    for b in range(B):
        for a in range(0, Lq, rows):
            n = min(rows, Lq - a)
            n_pad = cdiv(n, R) * R
            qb, ob = q[b, a : a + n], o[b, a : a + n]  # [n, D]
            _scores_kernel[(n_pad // sc.block_m, n_tiles)](
                qb, k[b], p, tile_max, tile_sum,
                n, L, qb.stride(0), qb.stride(1), k.stride(1), k.stride(2), Lp, rows, LOG2E / math.sqrt(D),
                D=D, BM=sc.block_m, BN=sc.block_n, BK=bk, num_warps=sc.num_warps, num_stages=sc.num_stages,
            )  # fmt: skip
            _merge_stats_kernel[(n_pad // MERGE_ROWS,)](
                tile_max, tile_sum, row_max, inv_sum, n_tiles, rows, BLOCK_T=MERGE_TILES, BLOCK_R=MERGE_ROWS
            )
            dst = ob if part is None else part  # partial sums: [splits, rows, D] fp32
            sos, som, sod = (0, *ob.stride()) if part is None else part.stride()
            _pv_kernel[(splits * (n_pad // pv.block_m) * (D // bd),)](
                p, v[b], tile_max, row_max, inv_sum, dst,
                n, L, Lp, rows, v.stride(1), v.stride(2), sos, som, sod, n_pad // pv.block_m, per_split,
                D=D, BN=sc.block_n, BM=pv.block_m, BD=bd, BK=pv.block_k,
                num_warps=pv.num_warps, num_stages=pv.num_stages,
            )  # fmt: skip
            if part is not None:
                ob.copy_(part[:, :n].sum(0))
    return o


def is_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the Triton kernels take these inputs (else gemm_attention does)."""
    D = q.shape[-1]
    return takes_attention_inputs(q, k, v) and q.dim() == 3 and 16 <= D <= 1024 and D & (D - 1) == 0


def pick_key_splits(programs: int, n_tiles: int, sms: int) -> int:
    """Key splits for a PV launch of `programs` (row, column) tiles: the fewest that minimise waves x key tiles a
    program, i.e. the run time at one program an SM; the extra fp32 partial output costs far less."""
    best, best_cost = 1, None
    for s in range(1, min(n_tiles, MAX_KEY_SPLITS) + 1):
        per = cdiv(n_tiles, s)
        cost = cdiv(programs * cdiv(n_tiles, per), sms) * per
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


if triton is not None:

    @triton.jit
    def _scores_kernel(
        Q, K, P, TileMax, TileSum,
        n, L, sqm, sqd, skn, skd, spm, sst, qk_scale,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        """Program (i, j): query rows i*BM.., keys j*BN.. -> P tile (unnormalised, in its own max) + (m, l).
        Grid axis 0 (rows) runs fastest, so the programs in flight share K tiles and the query block in L2."""
        offs_m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        rows = tl.minimum(offs_m, n - 1)  # padded rows repeat the last one: finite, never reach the output
        keys = tl.minimum(offs_n, L - 1).to(tl.int64)  # tail keys clamped in bounds, masked below
        offs_k = tl.arange(0, BK)
        q_ptrs = Q + rows[:, None] * sqm + offs_k[None, :] * sqd  # [BM, BK]
        kt_ptrs = K + keys[None, :] * skn + offs_k[:, None] * skd  # [BK, BN]
        s = tl.zeros([BM, BN], tl.float32)
        for _ in range(0, D, BK):
            s = tl.dot(tl.load(q_ptrs), tl.load(kt_ptrs), s)
            q_ptrs += BK * sqd
            kt_ptrs += BK * skd
        s = tl.where(offs_n[None, :] < L, s * qk_scale, float("-inf"))  # log2 units
        m = tl.math.ceil(tl.max(s, 1))  # [BM], integer-valued: rescaling later is by powers of two
        p = tl.math.exp2(s - m[:, None])  # in (0, 1]; 0 for keys past L
        tl.store(P + offs_m[:, None] * spm + offs_n[None, :], p.to(P.dtype.element_ty))  # P is padded: no mask
        stat = tl.program_id(1) * sst + offs_m
        tl.store(TileMax + stat, m)
        tl.store(TileSum + stat, tl.sum(p, 1))

    @triton.jit
    def _merge_stats_kernel(
        TileMax, TileSum, RowMax, InvSum, n_tiles, sst, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr
    ):  # fmt: skip
        """Program i: rows i*BLOCK_R.. -> M = max_t m_t, 1 / sum_t l_t exp2(m_t - M), over [BLOCK_T, BLOCK_R]
        blocks of the [T, rows] stats with a running max (integer differences: exact rescaling)."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_t = tl.arange(0, BLOCK_T)
        m_run = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_R], tl.float32)
        for t0 in range(0, n_tiles, BLOCK_T):  # the first block holds tile 0, so m_run is finite after it
            valid = (t0 + offs_t)[:, None] < n_tiles
            ptrs = (t0 + offs_t)[:, None] * sst + offs_r[None, :]  # [BLOCK_T, BLOCK_R]
            m = tl.load(TileMax + ptrs, mask=valid, other=float("-inf"))
            sums = tl.load(TileSum + ptrs, mask=valid, other=0.0)
            m_new = tl.maximum(m_run, tl.max(m, 0))
            l_run = l_run * tl.math.exp2(m_run - m_new) + tl.sum(sums * tl.math.exp2(m - m_new[None, :]), 0)
            m_run = m_new
        tl.store(RowMax + offs_r, m_run)
        tl.store(InvSum + offs_r, 1.0 / l_run)

    @triton.jit
    def _pv_kernel(
        P, V, TileMax, RowMax, InvSum, Out,
        n, L, spm, sst, svn, svd, sos, som, sod, n_row_tiles, per_split,
        D: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        """Program -> (split, row tile, column tile), column fastest: Out[split][rows, cols] = (P v) / l over the
        split's keys, each [BM, BK] P tile scaled by exp2(m_t - M) of its key tile t before the dot."""
        pid = tl.program_id(0)
        col = pid % (D // BD)
        row_tile = (pid // (D // BD)) % n_row_tiles
        split = pid // ((D // BD) * n_row_tiles)
        offs_m = (row_tile * BM + tl.arange(0, BM)).to(tl.int64)
        offs_d = col * BD + tl.arange(0, BD)
        offs_k = tl.arange(0, BK)
        k_lo = split * per_split * BN
        k_hi = tl.minimum(k_lo + per_split * BN, L)
        k_full = tl.minimum(k_hi, L // BK * BK)  # steps past k_full hold keys >= L: one masked step at most

        row_max = tl.load(RowMax + offs_m)  # [BM]
        p_ptrs = P + offs_m[:, None] * spm + (k_lo + offs_k)[None, :]  # [BM, BK]
        v_ptrs = V + (k_lo + offs_k)[:, None].to(tl.int64) * svn + offs_d[None, :] * svd  # [BK, BD]
        acc = tl.zeros([BM, BD], tl.float32)
        for k in range(k_lo, k_full, BK):
            scale = tl.math.exp2(tl.load(TileMax + (k // BN) * sst + offs_m) - row_max)  # [BM], powers of two
            p = (tl.load(p_ptrs).to(tl.float32) * scale[:, None]).to(V.dtype.element_ty)
            acc = tl.dot(p, tl.load(v_ptrs), acc)
            p_ptrs += BK
            v_ptrs += BK * svn
        if k_full < k_hi:  # the ragged end of the keys: P is 0 there (padded), V is masked to 0
            scale = tl.math.exp2(tl.load(TileMax + (k_full // BN) * sst + offs_m) - row_max)
            p = (tl.load(p_ptrs).to(tl.float32) * scale[:, None]).to(V.dtype.element_ty)
            acc = tl.dot(p, tl.load(v_ptrs, mask=(k_full + offs_k)[:, None] < L, other=0.0), acc)

        acc = acc * tl.load(InvSum + offs_m)[:, None]
        o_ptrs = Out + split * sos + offs_m[:, None] * som + offs_d[None, :] * sod
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < n)
