"""Qwen2 Mixture-of-Transformers decoder of BAGEL (modeling/bagel/qwen2_navit.py, inference path only).

Every layer holds two weight sets: the understanding expert (stock Qwen2 names) and the generation expert
(the same names with `_moe_gen`). Routing is hard, by token type: in a "gen" call the VAE-latent tokens
`x[gen]` use `*_moe_gen` weights and the `<|vision_start|>`/`<|vision_end|>` markers around them keep the
understanding weights; all tokens share one self-attention over the KV cache plus themselves (GQA, q/k
RMSNorm per head, RoPE). Sequences are one sample, unbatched: tensors are [L, D].

Attention is torch SDPA. Causal calls append to a cache, so queries are the last L of Lk keys and the mask is
aligned bottom-right (flash-attn varlen semantics); SDPA's own `is_causal` would align top-left.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LLMConfig

# One layer's cached keys and values, [Lk, Hkv, Dh] each.
LayerKV = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)  # normalise in fp32, scale in the model dtype (as Qwen2)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(x: Tensor, gen: slice | None, und_fn: Callable, gen_fn: Callable) -> Tensor:
    """Apply `gen_fn` to the latent tokens x[gen] and `und_fn` to the tokens before and after them."""
    if gen is None:
        return und_fn(x)
    head, body, tail = x[: gen.start], x[gen], x[gen.stop :]
    ends = und_fn(torch.cat([head, tail]))  # [2, ...]: the image markers
    return torch.cat([ends[: len(head)], gen_fn(body), ends[len(head) :]])


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Qwen2 default RoPE tables for `positions` [L]: cos, sin [L, 1, Dh] (fp32 math, then model dtype)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    )
    freqs = positions.float()[:, None] * inv_freq[None]  # [L, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [L, 1, Dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # rotate-half convention


def attention_mask(q_len: int, k_len: int, causal: bool, device) -> Tensor | None:
    """Bottom-right causal mask (True = attend): query i sees keys up to i + k_len - q_len. None = full."""
    if not causal or q_len == 1:
        return None
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(cfg.hidden_size, q_dim, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(q_dim, cfg.hidden_size, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(self.head_dim, cfg.rms_norm_eps))
            setattr(self, "k_norm" + suffix, RMSNorm(self.head_dim, cfg.rms_norm_eps))

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: LayerKV | None, gen: slice | None, causal: bool
    ) -> tuple[Tensor, LayerKV]:
        L = x.shape[0]
        q = route(x, gen, self.q_proj, self.q_proj_moe_gen).view(L, self.n_heads, self.head_dim)  # [L, H, Dh]
        k = route(x, gen, self.k_proj, self.k_proj_moe_gen).view(L, self.n_kv, self.head_dim)  # [L, Hkv, Dh]
        v = route(x, gen, self.v_proj, self.v_proj_moe_gen).view(L, self.n_kv, self.head_dim)  # [L, Hkv, Dh]
        q = apply_rope(route(q, gen, self.q_norm, self.q_norm_moe_gen), cos, sin)
        k = apply_rope(route(k, gen, self.k_norm, self.k_norm_moe_gen), cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k]), torch.cat([past[1], v])  # [Lk, Hkv, Dh]: cache, then new tokens
        mask = attention_mask(L, k.shape[0], causal, x.device)
        # GQA by repeating K/V heads (head h reads KV head h // rep): every SDPA backend, flash included, takes it.
        rep = self.n_heads // self.n_kv
        k_all, v_all = (t.transpose(0, 1).repeat_interleave(rep, dim=0) for t in (k, v))  # [H, Lk, Dh]
        # 4-D inputs: SDPA's fused kernels take only [B, H, L, Dh]; 3-D ones fell back to the fp32 math kernel
        # (73% of a 1024² velocity pass on an H200).
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_all[None], v_all[None], attn_mask=mask)[0]
        out = out.transpose(0, 1).reshape(L, self.n_heads * self.head_dim)  # [L, H*Dh]
        return route(out, gen, self.o_proj, self.o_proj_moe_gen), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        for suffix in ("", "_moe_gen"):
            setattr(self, "input_layernorm" + suffix, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, "post_attention_layernorm" + suffix, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def ffn_und(self, x: Tensor) -> Tensor:
        return self.mlp(self.post_attention_layernorm(x))

    def ffn_gen(self, x: Tensor) -> Tensor:
        return self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x))

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: LayerKV | None, gen: slice | None, causal: bool
    ) -> tuple[Tensor, LayerKV]:
        h = route(x, gen, self.input_layernorm, self.input_layernorm_moe_gen)  # [L, D]
        h, kv = self.self_attn(h, cos, sin, past, gen, causal)
        x = x + h
        return x + route(x, gen, self.ffn_und, self.ffn_gen), kv


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

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
        """
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, None if past is None else past[i], gen, causal)
            new_kv.append(kv)
        return route(x, gen, self.norm, self.norm_moe_gen), tuple(new_kv)


class Qwen2MoTForCausalLM(nn.Module):
    """Holds `model.*` and the untied `lm_head`, the key layout of `language_model.*` in ema.safetensors."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
