"""The LDM-family autoencoder (FLUX / BAGEL `ae.safetensors`, SD1.5, SDXL, SD3 VAEs).

Module names mirror the checkpoints (`encoder.down.0.block.1.conv2`, `decoder.mid.attn_1.q`, ...), so a
state dict loads with `strict=True` and no key map. The configuration is read off the weights by
`detect_params`. Everything here works in ComfyUI's raw VAE space: `encode` returns the posterior mean
and `decode` takes it back; model-specific scale/shift (FLUX: 0.3611 / 0.1159) is the caller's business.

The encoder/decoder structure (resnets, mid block, levels, GroupNorm + SiLU) is written once, over a `Layers`
set: IMAGE's 2-D convs here, HunyuanVideo's 3-D ones in `hunyuan_video.py` (as ComfyUI builds that VAE: this
structure with 3-D convs). This is the single-process reference. `sharded.py` walks the same modules band by band.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Checkpoint wrappers seen in the wild: SD3 / SDXL single files, BAGEL's `vae_model.`, diffusers-style dumps.
KEY_PREFIXES = ("first_stage_model.", "vae_model.", "vae.")
# Training-only keys that some SD VAE files still carry; they hold no inference weights.
IGNORED_KEY_PREFIXES = ("loss.", "model_ema.")


@dataclass(frozen=True)
class AutoEncoderParams:
    in_channels: int  # image channels (3)
    out_ch: int  # decoded image channels (3)
    ch: int  # base width (128)
    ch_mult: tuple[int, ...]  # width multiplier per resolution level ((1, 2, 4, 4))
    num_res_blocks: int  # resnets per encoder level; the decoder has one more
    z_channels: int  # latent channels (FLUX/SD3: 16, SD1.5/SDXL: 4)
    has_quant_conv: bool  # SD1.5/SDXL carry 1x1 quant_conv / post_quant_conv; FLUX and SD3 do not
    has_encoder: bool
    has_decoder: bool

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def to_tokens(x: Tensor) -> Tensor:
    """[B, C, *S] -> contiguous [B, L, C] (L = H*W, or T*H*W frame-major): SDPA's efficient kernels need a unit
    stride in the last dim."""
    return x.flatten(2).transpose(1, 2).contiguous()


def from_tokens(x: Tensor, *sizes: int) -> Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *sizes)  # [B, C, H, W] (or [B, C, T, H, W])


def linear_1x1(conv: nn.Conv2d | nn.Conv3d, tokens: Tensor) -> Tensor:
    """A 1x1 conv applied to tokens [B, L, C] as a matmul, keeping the token layout."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def one_head_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(C)) v for one head, q [B, Lq, C], k and v [B, L, C]: one SDPA call."""
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass(frozen=True)
class Layers:
    """What the LDM structure below is built of: the image VAEs' 2-D layers (IMAGE), or 3-D ones with their own
    padding, resampling and attention (`hunyuan_video.video_layers`). Only the constructors and `attend` differ;
    the blocks, their names (the checkpoints' keys) and their forwards are the same."""

    conv: Callable[[int, int], nn.Module]  # (c_in, c_out) -> a 3x3 conv keeping the size
    shortcut: Callable[[int, int], nn.Module]  # (c_in, c_out) -> the resnet's 1x1 channel change
    linear: Callable[[int, int], nn.Module]  # (c, c) -> the attention's 1x1 q, k, v and proj_out
    attend: Callable[[Tensor, Tensor, Tensor], Tensor]  # one head: q [B, Lq, C], k, v [B, L, C] -> [B, Lq, C]
    downsample: Callable[[int, int], nn.Module]  # (channels, encoder level)
    upsample: Callable[[int, int], nn.Module]  # (channels, decoder level)


IMAGE = Layers(
    conv=partial(nn.Conv2d, kernel_size=3, padding=1),
    shortcut=partial(nn.Conv2d, kernel_size=1),
    linear=partial(nn.Conv2d, kernel_size=1),
    attend=one_head_attention,
    downsample=lambda channels, level: Downsample(channels),
    upsample=lambda channels, level: Upsample(channels),
)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: Layers = IMAGE):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = layers.conv(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = layers.conv(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = layers.shortcut(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W (or T*H*W) positions, head dim = channels (512), no mask."""

    def __init__(self, channels: int, layers: Layers = IMAGE):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = layers.linear(channels, channels)
        self.k = layers.linear(channels, channels)
        self.v = layers.linear(channels, channels)
        self.proj_out = layers.linear(channels, channels)
        self.attend = layers.attend

    def forward(self, x: Tensor) -> Tensor:
        h = to_tokens(self.norm(x))  # [B, L, C]
        q, k, v = (linear_1x1(conv, h) for conv in (self.q, self.k, self.v))
        return x + from_tokens(linear_1x1(self.proj_out, self.attend(q, k, v)), *x.shape[2:])


class MidBlock(nn.Module):
    def __init__(self, channels: int, layers: Layers = IMAGE):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, layers)
        self.attn_1 = AttnBlock(channels, layers)
        self.block_2 = ResnetBlock(channels, channels, layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """p: the LDM sizes (AutoEncoderParams, or a video VAE's params with the same fields)."""

    def __init__(self, p, layers: Layers = IMAGE):
        super().__init__()
        self.conv_in = layers.conv(p.in_channels, p.ch)
        widths = [p.ch * m for m in (1, *p.ch_mult)]
        self.down = nn.ModuleList()
        for level in range(len(p.ch_mult)):
            stage = nn.Module()
            c_in, c_out = widths[level], widths[level + 1]
            stage.block = nn.ModuleList(
                ResnetBlock(c_in if i == 0 else c_out, c_out, layers) for i in range(p.num_res_blocks)
            )
            if level != len(p.ch_mult) - 1:
                stage.downsample = layers.downsample(c_out, level)
            self.down.append(stage)
        self.mid = MidBlock(widths[-1], layers)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = layers.conv(widths[-1], 2 * p.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2*z, (T',) H/8, W/8]: mean, logvar


class Decoder(nn.Module):
    """p: as for Encoder."""

    def __init__(self, p, layers: Layers = IMAGE):
        super().__init__()
        top = p.ch * p.ch_mult[-1]
        self.conv_in = layers.conv(p.z_channels, top)
        self.mid = MidBlock(top, layers)
        # `up[i]` is resolution level i; level len-1 (lowest resolution) runs first, as in the checkpoints.
        self.up = nn.ModuleList()
        c_in = top
        for level in reversed(range(len(p.ch_mult))):
            stage = nn.Module()
            c_out = p.ch * p.ch_mult[level]
            stage.block = nn.ModuleList(
                ResnetBlock(c_in if i == 0 else c_out, c_out, layers) for i in range(p.num_res_blocks + 1)
            )
            if level != 0:
                stage.upsample = layers.upsample(c_out, level)
            self.up.insert(0, stage)
            c_in = c_out
        self.norm_out = group_norm(c_in)
        self.conv_out = layers.conv(c_in, p.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, (T',) 8h, 8w] in [-1, 1]


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        if params.has_encoder:
            self.encoder = Encoder(params)
        if params.has_decoder:
            self.decoder = Decoder(params)
        if params.has_quant_conv:
            z2 = 2 * params.z_channels
            if params.has_encoder:
                self.quant_conv = nn.Conv2d(z2, z2, 1)
            if params.has_decoder:
                self.post_quant_conv = nn.Conv2d(params.z_channels, params.z_channels, 1)

    def encode(self, x: Tensor) -> Tensor:
        """Image [B, 3, H, W] in [-1, 1] (H, W multiples of 8) -> posterior mean [B, z, H/8, W/8]."""
        moments = self.encoder(x)
        if self.params.has_quant_conv:
            moments = self.quant_conv(moments)
        return moments[:, : self.params.z_channels]

    def decode(self, z: Tensor) -> Tensor:
        """Latent [B, z, h, w] in raw VAE space -> image [B, 3, 8h, 8w], nominally in [-1, 1]."""
        if self.params.has_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a checkpoint wrapper prefix and training-only keys, keeping the autoencoder's own names."""
    out = {}
    for key, value in sd.items():
        if key.startswith(IGNORED_KEY_PREFIXES):
            continue
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def describe_keys(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def detect_params(sd: dict[str, Tensor]) -> AutoEncoderParams:
    """Read the configuration off an LDM-layout state dict (prefixes already stripped)."""
    if "encoder.conv_in.weight" not in sd and "decoder.conv_in.weight" not in sd:
        raise ValueError(
            "vae: not an LDM/FLUX autoencoder state dict: no 'encoder.conv_in.weight' or "
            f"'decoder.conv_in.weight' among {len(sd)} keys (found: {describe_keys(sd)}). Supported: FLUX/BAGEL "
            "ae.safetensors, SD1.5/SDXL/SD3 VAE files in LDM layout, ComfyUI VAE objects of those families."
        )
    has_quant_conv = "quant_conv.weight" in sd or "post_quant_conv.weight" in sd
    return AutoEncoderParams(**ldm_sizes(sd, "", "autoencoder"), has_quant_conv=has_quant_conv)


def ldm_sizes(sd: dict[str, Tensor], conv: str, what: str) -> dict:
    """The LDM structure's sizes and parts read off its weights: the fields every LDM-built params class has.

    Args:
        sd: the state dict, prefixes stripped, with an encoder or a decoder (the caller has checked).
        conv: where a 3x3 conv keeps its weight below the conv's name: "" (`conv_in.weight`) or, for
            HunyuanVideo's wrapped 3-D convs, ".conv" (`conv_in.conv.weight`).
        what: the model, for the error messages.
    """
    has_encoder, has_decoder = f"encoder.conv_in{conv}.weight" in sd, f"decoder.conv_in{conv}.weight" in sd
    if any(".attn." in k for k in sd if k.startswith(("encoder.down.", "decoder.up."))):
        raise ValueError(
            f"vae: this {what} has attention inside its resolution levels; only mid-block attention (as in FLUX, "
            "SD and HunyuanVideo) is supported."
        )
    side, stage = ("encoder", "down") if has_encoder else ("decoder", "up")
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith(f"{side}.{stage}.")})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"vae: {what} {side}.{stage}.* levels are missing or not contiguous (found {levels}).")
    blocks = {int(k.split(".")[4]) for k in sd if k.startswith(f"{side}.{stage}.0.block.")}
    widths = [int(sd[f"{side}.{stage}.{i}.block.0.conv1{conv}.weight"].shape[0]) for i in levels]
    if has_encoder:
        ch, in_channels = sd[f"encoder.conv_in{conv}.weight"].shape[:2]
        z_channels = sd[f"encoder.conv_out{conv}.weight"].shape[0] // 2
    else:
        ch, in_channels = sd[f"decoder.conv_out{conv}.weight"].shape[1], sd[f"decoder.conv_out{conv}.weight"].shape[0]
        z_channels = sd[f"decoder.conv_in{conv}.weight"].shape[1]
    if has_decoder and sd[f"decoder.conv_in{conv}.weight"].shape[1] != z_channels:
        raise ValueError(
            f"vae: encoder gives {z_channels} latent channels but decoder takes "
            f"{sd[f'decoder.conv_in{conv}.weight'].shape[1]}."
        )
    return dict(
        in_channels=int(in_channels),
        out_ch=int(sd[f"decoder.conv_out{conv}.weight"].shape[0]) if has_decoder else int(in_channels),
        ch=int(ch),
        ch_mult=tuple(w // int(ch) for w in widths),
        num_res_blocks=len(blocks) - (0 if has_encoder else 1),
        z_channels=int(z_channels),
        has_encoder=has_encoder,
        has_decoder=has_decoder,
    )


def autoencoder_from_state_dict(
    sd: dict[str, Tensor], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> AutoEncoder:
    """Build the autoencoder the weights describe and load them strictly (meta init + assign).

    Args:
        sd: an LDM-layout state dict, optionally under `first_stage_model.` / `vae_model.` / `vae.`.
        device: where the weights go.
        dtype: weight dtype; None keeps the checkpoint's.
    """
    sd = strip_prefixes(sd)
    return load_strict(AutoEncoder, detect_params(sd), sd, device, dtype)


def load_strict(model_class, params, sd: dict[str, Tensor], device, dtype) -> nn.Module:
    """model_class(params) built on meta and given `sd`'s tensors; any missing, unexpected or misshapen key
    raises with the counts and the first few keys."""
    with torch.device("meta"):
        model = model_class(params)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise ValueError(
            f"vae: weights do not match the detected {params}: {len(missing)} missing "
            f"({describe_keys(missing)}), {len(unexpected)} unexpected ({describe_keys(unexpected)})."
        )
    for key, tensor in model.state_dict().items():
        if sd[key].shape != tensor.shape:
            raise ValueError(f"vae: {key} has shape {tuple(sd[key].shape)}, expected {tuple(tensor.shape)}.")
    sd = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# Named sizes for random-weight models: the CLI's full-size default and the tests' tiny one.
CONFIGS = {
    "flux": AutoEncoderParams(3, 3, 128, (1, 2, 4, 4), 2, 16, False, True, True),
    "sd": AutoEncoderParams(3, 3, 128, (1, 2, 4, 4), 2, 4, True, True, True),
    "tiny": AutoEncoderParams(3, 3, 32, (1, 2, 2, 2), 1, 16, False, True, True),
    "tiny-sd": AutoEncoderParams(3, 3, 32, (1, 1, 2, 2), 1, 4, True, True, True),
}


def random_autoencoder(name: str = "flux", seed: int = 0) -> AutoEncoder:
    """A seeded random-weight autoencoder of a named size."""
    return randomized(AutoEncoder(CONFIGS[name]), seed)


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """The model (LDM-built: GroupNorms and convs) with seeded random weights, non-trivial GroupNorm affines.

    Default init leaves GroupNorm at weight 1 / bias 0 and scales convs so that activations shrink; we
    perturb norms and keep the signal alive so that a wrong statistic, padding or halo shows in the output.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if key.endswith("weight") and "norm" in key else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
    return model.eval().requires_grad_(False)
