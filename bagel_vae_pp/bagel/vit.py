"""SigLIP NaViT vision encoder of BAGEL (modeling/bagel/siglip_navit.py with rope=False), one image per call.

Only what BAGEL runs: a linear patch embedding over (patch_row, patch_col, channel)-ordered pixels, a learned
position table indexed by `row * side + col` ("extrapolated" ids), `layers_used` pre-norm encoder layers with
full attention inside the image, and the post-LayerNorm. Module names follow `vit_model.vision_model.*` of
ema.safetensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ViTConfig


def patchify(image: Tensor, p: int) -> Tensor:
    """[C, H, W] -> [H/p * W/p, p*p*C], rows of patches in raster order, pixels as (row, col, channel)."""
    C, H, W = image.shape
    assert H % p == 0 and W % p == 0, f"image {H}x{W} is not a multiple of the patch size {p}"
    x = image.reshape(C, H // p, p, W // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * C)


def flat_position_ids(rows: int, cols: int, side: int) -> Tensor:
    """Position ids row*side + col of a rows x cols patch grid in a side x side table, [rows*cols]."""
    return (torch.arange(rows)[:, None] * side + torch.arange(cols)[None]).flatten()


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        N, D = x.shape
        q, k, v = (
            proj(x).view(N, self.n_heads, -1).transpose(0, 1) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # [H, N, Dh]; 4-D for the fused kernels
        return self.out_proj(out.transpose(0, 1).reshape(N, D))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.layers_used))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        """Patches [N, p*p*C] of one image and their position ids [N] -> features [N, D]."""
        x = self.embeddings.patch_embedding(patches) + self.embeddings.position_embedding(position_ids)  # [N, D]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        return self.vision_model(patches, position_ids)
