"""The BAGEL module (modeling/bagel/bagel.py, inference only) and its context operations.

`Bagel` owns the LLM, the ViT, the connector, the two fixed position tables, `vae2llm`/`llm2vae` and the
time embedder, under the parameter names of ema.safetensors. A `Context` is one growing KV cache plus its
length and next RoPE position; contexts are immutable (an update returns a new one), so CFG snapshots are
plain references instead of deep copies. Blocks enter a context the official way:

- text: `<|im_start|>` ids `<|im_end|>`, consecutive positions, causal, understanding expert;
- image (ViT or clean VAE latent): `<|vision_start|>` tokens `<|vision_end|>`, all at one position, full
  attention; the position then advances by one. VAE latents use the generation expert (markers do not);
- a noisy latent being generated: like a VAE block, run against a context without updating it; the guidance
  passes of a step run it against their contexts together (`velocities`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TIMESTEP_FREQ_DIM, BagelParams
from .llm import LayerKV, Qwen2MoTForCausalLM
from .tokenizer import SpecialTokens
from .vit import SiglipVisionModel


@dataclass(frozen=True)
class Context:
    kv: tuple[LayerKV, ...] | None  # per layer (keys, values) [length, Hkv, Dh]; None while empty
    length: int  # cached tokens
    rope: int  # RoPE position of the next block


EMPTY_CONTEXT = Context(kv=None, length=0, rope=0)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[M] positions -> [M, dim]: sin half then cos half, frequencies 1 / 10000^(i / (dim/2)), float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = pos.reshape(-1).double()[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_table(side: int, dim: int) -> Tensor:
    """The fixed side x side position table, [side*side, dim] fp32, row-major; column code first, then row.

    The checkpoint stores these tables (bf16 in the real file) and the model uses the stored values; this
    generator is for random-weight checkpoints.
    """
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # [side, side] each
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def timestep_embedding(t: Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Raw t in [0, 1] (not x1000) [N] -> [N, dim] fp32 sinusoid, cos half then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [N, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))  # [N, D]


class Connector(nn.Module):
    """ViT features -> LLM width: fc1, GELU(tanh), fc2."""

    def __init__(self, vit_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vit_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PositionTable(nn.Module):
    def __init__(self, side: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(side * side, dim), requires_grad=False)  # [side*side, D]


class Bagel(nn.Module):
    def __init__(self, params: BagelParams):
        super().__init__()
        self.params = params
        D = params.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(params.llm)
        self.vit_model = SiglipVisionModel(params.vit)
        self.connector = Connector(params.vit.hidden_size, D)
        self.vit_pos_embed = PositionTable(params.vit_max_patches_per_side, D)
        self.latent_pos_embed = PositionTable(params.max_latent_size, D)
        self.vae2llm = nn.Linear(params.patch_latent_dim, D)
        self.llm2vae = nn.Linear(D, params.patch_latent_dim)
        self.time_embedder = TimestepEmbedder(D)

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def embed_ids(self, ids: list[int]) -> Tensor:
        return self.language_model.model.embed_tokens(torch.tensor(ids, device=self.device))  # [L, D]

    def extend(self, ctx: Context, x: Tensor, positions: Tensor, gen: slice | None, causal: bool) -> tuple:
        """Run block x [L, D] against ctx; returns (hidden [L, D], the per-layer caches including x)."""
        return self.language_model.model(x, positions.to(self.device), ctx.kv, gen=gen, causal=causal)

    def prefill_text(self, ctx: Context, ids: list[int]) -> Context:
        """Append a text block (ids already wrapped in `<|im_start|>`/`<|im_end|>`), causal, und expert."""
        positions = torch.arange(ctx.rope, ctx.rope + len(ids))
        _, kv = self.extend(ctx, self.embed_ids(ids), positions, gen=None, causal=True)
        return Context(kv, ctx.length + len(ids), ctx.rope + len(ids))

    def wrap_image(self, tokens: Tensor, special: SpecialTokens) -> Tensor:
        """`<|vision_start|>` tokens [N, D] `<|vision_end|>` -> [N+2, D]."""
        start, end = self.embed_ids([special.start_of_image, special.end_of_image]).split(1)
        return torch.cat([start, tokens.to(self.dtype), end])

    def prefill_image_block(self, ctx: Context, block: Tensor, is_latent: bool) -> Context:
        L = block.shape[0]
        gen = slice(1, L - 1) if is_latent else None
        _, kv = self.extend(ctx, block, torch.full((L,), ctx.rope), gen=gen, causal=False)
        return Context(kv, ctx.length + L, ctx.rope + 1)

    def vit_tokens(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        """ViT patches [N, p*p*3] and ids [N] -> LLM-width image tokens [N, D]."""
        patches, position_ids = patches.to(self.device, self.dtype), position_ids.to(self.device)
        feats = self.vit_model(patches, position_ids)  # [N, Dvit]
        return self.connector(feats) + self.vit_pos_embed.pos_embed[position_ids]  # [N, D]

    def latent_tokens(self, latent: Tensor, t: float, position_ids: Tensor) -> Tensor:
        """Patchified BAGEL-space latent [N, 64] at time t -> tokens [N, D] (vae2llm + time + position)."""
        latent, position_ids = latent.to(self.device, self.dtype), position_ids.to(self.device)
        t_emb = self.time_embedder(torch.tensor([t], dtype=torch.float32, device=self.device))  # [1, D]
        return self.vae2llm(latent) + t_emb + self.latent_pos_embed.pos_embed[position_ids]  # [N, D]

    def velocity(self, ctx: Context, block: Tensor) -> Tensor:
        """Flow velocity [N, 64] for the wrapped noisy-latent block [N+2, D] against ctx (ctx unchanged)."""
        L = block.shape[0]
        gen = slice(1, L - 1)
        hidden, _ = self.extend(ctx, block, torch.full((L,), ctx.rope), gen=gen, causal=False)  # [L, D]
        return self.llm2vae(hidden[gen])  # [N, 64]

    def velocities(self, contexts: list[Context], block: Tensor) -> list[Tensor]:
        """velocity(ctx, block) [N, 64] for each of P contexts, as batched passes: the layer stack runs once, on
        the P·(N+2) rows of the block's copies (Qwen2MoTModel.passes: each weight read once per call, P times the
        activations of one pass); each copy attends to its own context at that context's RoPE position."""
        L = block.shape[0]
        gen = slice(1, L - 1)
        positions = [torch.full((L,), ctx.rope, device=self.device) for ctx in contexts]
        hidden = self.language_model.model.passes(block, positions, [ctx.kv for ctx in contexts], gen)  # P x [L, D]
        return [self.llm2vae(h[gen]) for h in hidden]  # P x [N, 64]

    def next_token_logits(self, ctx: Context, token: int) -> tuple[Tensor, Context]:
        """Feed one token at ctx.rope (causal, und) and return the next-token logits [V] and the new ctx."""
        hidden, kv = self.extend(ctx, self.embed_ids([token]), torch.tensor([ctx.rope]), gen=None, causal=True)
        logits = self.language_model.lm_head(hidden[-1])  # [V]
        return logits, Context(kv, ctx.length + 1, ctx.rope + 1)
