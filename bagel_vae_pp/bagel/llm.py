"""Qwen2 Mixture-of-Transformers decoder of BAGEL (modeling/bagel/qwen2_navit.py, inference path only).

Every layer holds two weight sets: the understanding expert (stock Qwen2 names) and the generation expert
(the same names with `_moe_gen`). Routing is hard, by token type: in a "gen" call the VAE-latent tokens
`x[gen]` use `*_moe_gen` weights and the `<|vision_start|>`/`<|vision_end|>` markers around them keep the
understanding weights; all tokens share one self-attention over the KV cache plus themselves (GQA, q/k
RMSNorm per head, RoPE). Sequences are one sample, unbatched: tensors are [L, D].

Attention is torch SDPA. Causal calls append to a cache, so queries are the last L of Lk keys and the mask is
aligned bottom-right (flash-attn varlen semantics); SDPA's own `is_causal` would align top-left.

Each layer's per-expert work (norms, projections, MLPs over the expert's rows) lives in experts.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LLMConfig
from .experts import Reduce, Rows, add_mlp, add_projection, norm, norm_rope, normalise, project, swiglu
from .quantize import quantize_once

# One layer's cached keys and values, [Lk, Hkv, Dh] each.
LayerKV = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * normalise(x, self.eps)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self, x))


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
        rows = Rows(x.shape[0], gen)
        out, kvs = self.attend(rows.pack(x), rows.pack_rope(cos), rows.pack_rope(sin), [past], rows, causal)
        return rows.unpack(project(out, rows, self.o_proj, self.o_proj_moe_gen)), kvs[0]

    def attend(
        self, x: Tensor, cos: Tensor, sin: Tensor, pasts: list[LayerKV | None], rows: Rows, causal: bool
    ) -> tuple[Tensor, list[LayerKV]]:
        """Attention of the normed tokens x [P·L, D] (expert order, P = rows.passes) before o_proj: [P·L, H*Dh]
        (expert order), and each pass's cache pasts[p] extended by its new keys/values (original order)."""
        N, H, Hkv, Dh = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        x = quantize_once(x, *(getattr(self, f"{n}_proj{s}") for n in "qkv" for s in ("", "_moe_gen")))  # FP8 once
        q = project(x, rows, self.q_proj, self.q_proj_moe_gen).view(N, H, Dh)
        k = project(x, rows, self.k_proj, self.k_proj_moe_gen).view(N, Hkv, Dh)
        v = project(x, rows, self.v_proj, self.v_proj_moe_gen).view(N, Hkv, Dh)
        # [P·L, H, Dh], pass after pass: pass p's queries are q[p·L : (p+1)·L]
        q = norm_rope(q, cos, sin, rows, self.q_norm, self.q_norm_moe_gen, rows.by_pass(q.device))
        k = norm_rope(k, cos, sin, rows, self.k_norm, self.k_norm_moe_gen)  # [P·L, Hkv, Dh]
        outs, kvs = [], []
        for p, past in enumerate(pasts):
            # [Lk, Hkv, Dh]: the pass's cache, then its new tokens in their original order
            before = (None, None) if past is None else past
            k_p, v_p = (rows.unpack(rows.of_pass(t, p), b) for t, b in zip((k, v), before))
            outs.append(self.sdpa(q[p * rows.n : (p + 1) * rows.n], k_p, v_p, rows, causal))
            kvs.append((k_p, v_p))
        return rows.join(outs), kvs

    def sdpa(self, q: Tensor, k: Tensor, v: Tensor, rows: Rows, causal: bool) -> Tensor:
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
        rows = Rows(x.shape[0], gen)
        x, kvs = self.step(rows.pack(x, copy=True), rows.pack_rope(cos), rows.pack_rope(sin), [past], rows, causal)
        return rows.unpack(x), kvs[0]

    def step(
        self, x: Tensor, cos: Tensor, sin: Tensor, pasts: list[LayerKV | None], rows: Rows, causal: bool
    ) -> tuple[Tensor, list[LayerKV]]:
        """forward() on x [P·L, D] in expert order (P = rows.passes, one cache each), updated IN PLACE (the residual
        stream) and returned, with each pass's extended cache."""
        h = norm(x, rows, self.input_layernorm, self.input_layernorm_moe_gen)  # [P·L, D]
        h, kvs = self.self_attn.attend(h, cos, sin, pasts, rows, causal)
        add_projection(x, h, rows, self.self_attn.o_proj, self.self_attn.o_proj_moe_gen, self.reduce)  # x += o_proj(h)
        h = norm(x, rows, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        mlps = (self.mlp, self.mlp_moe_gen)
        h = quantize_once(h, *(lin for mlp in mlps for lin in (mlp.gate_proj, mlp.up_proj)))  # FP8: gate/up share it
        add_mlp(x, h, rows, *mlps, self.reduce)
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
        rows = Rows(x.shape[0], gen)
        x, kv = self._run(x, positions, [past], rows, causal, keep_kv=True)
        return rows.unpack(x), tuple(layer_kvs[0] for layer_kvs in kv)

    @torch.no_grad()
    def passes(
        self, x: Tensor, positions: list[Tensor], pasts: list[tuple[LayerKV, ...] | None], gen: slice | None
    ) -> list[Tensor]:
        """Batched passes: one block x [L, D] against P caches at once, full attention, the caches not extended.

        Pass p gives forward(x, positions[p], pasts[p], gen)'s hidden states, but the layer stack runs once for all
        of them: every token-wise op (norms, projections, MLPs; each expert one GEMM) on P·L rows (Rows),
        attention per pass against its own cache at its own RoPE positions. Each weight is thus read once per call
        instead of P times, and a streamed layer (stream.py) copied once. Memory: the activations of P·L rows
        instead of L (a 1024² velocity pass has L = 4098 tokens: ~0.6 GiB of bf16 activations per pass at full
        size, stream.pass_work_bytes), and no new KV caches (each layer's extended ones are dropped).

        Args:
            positions: P tensors [L], each pass's RoPE positions (a context's own).
            pasts: P caches (None = empty).
        Returns P final-norm hidden states [L, D].
        """
        rows = Rows(x.shape[0], gen, len(pasts))
        x, _ = self._run(x, torch.cat(positions), pasts, rows, causal=False, keep_kv=False)
        return [rows.unpack(rows.of_pass(x, p)) for p in range(rows.passes)]

    def _run(self, x: Tensor, positions: Tensor, pasts: list, rows: Rows, causal: bool, keep_kv: bool):
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
        return norm(x, rows, self.norm, self.norm_moe_gen), new_kv


class Qwen2MoTForCausalLM(nn.Module):
    """Holds `model.*` and the untied `lm_head`, the key layout of `language_model.*` in ema.safetensors."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
