"""Checks shared by the video VAE pool tests (Wan, HunyuanVideo): the module's frames as a node returns them, and
the bad inputs every video VAE must refuse in one line without harming a worker."""

from __future__ import annotations

import pytest
import torch


def max_rel_err(out, ref) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def module_frames(vae, z: torch.Tensor, **decode_args) -> torch.Tensor:
    """The single-process module's decode of video latents z [B, C, T, h, w] as IMAGE frames [B*frames, H, W, 3]."""
    with torch.inference_mode():
        return ((vae.decode(z, **decode_args) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1)


def assert_bands_equal_the_module(parts: list[dict], vae, z: torch.Tensor, video: torch.Tensor) -> None:
    """The ranks' row bands (`decoded` / `encoded`, in rank order), stitched along the rows, against the single-process
    module's decode of z and encode of video (max rel err <= 1e-4)."""
    with torch.inference_mode():
        ref_decoded, ref_encoded = vae.decode(z), vae.encode(video)
    decoded = torch.cat([p["decoded"] for p in parts], dim=3)
    encoded = torch.cat([p["encoded"] for p in parts], dim=3)
    assert decoded.shape == (1, 3, video.shape[2], *video.shape[3:])
    assert encoded.shape == (1, vae.params.z_channels, *z.shape[2:])
    assert max_rel_err(decoded, ref_decoded) <= 1e-4
    assert max_rel_err(encoded, ref_encoded) <= 1e-4


def assert_bad_inputs_refused_then_decodes(pool, vae, z: torch.Tensor, more_cases=()) -> None:
    """A 4-D latent, too few channels, a NaN and a bad temporal tile each get one ValueError naming the problem; then
    the same pool decodes z as the module does (within 1e-4)."""
    bad = z.clone()
    bad[0, 1, 1, 1, 1] = float("nan")
    cases = [
        (lambda: pool.decode(vae, z[:, :, 0]), r"video VAE decodes a video latent \[B, C, T, H, W\]"),
        *more_cases,
        (lambda: pool.decode(vae, z[:, :3]), "the latent has 3 channels but this VAE takes 4"),
        (lambda: pool.decode(vae, bad), "contains 1 NaN/Inf"),
        (lambda: pool.decode(vae, z, mode="tiled", temporal_size=6), "temporal_size/temporal_overlap: got 6/8"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert max_rel_err(pool.decode(vae, z), module_frames(vae, z)) <= 1e-4
