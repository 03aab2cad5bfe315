"""Are a Wan decoder's causal 3x3x3 convs faster as conv3d or as 2-D convs over the three time taps?

The pool's Wan decode runs at ~230 (Wan 2.1) to ~460 (Wan 2.2) TFLOP/s of the plain model's FLOPs on an H100
(BENCHMARKS.md, 2026-12-08): almost all of it 3x3x3 convs over a chunk's frames plus the two cached ones. cuDNN's
2-D NHWC kernels are its most tuned; a 3x3x3 conv over T+2 input frames is also the sum over the time taps k of a
3x3 conv of frames [k, k+T) with that tap's weights. This takes the conv3d input shapes the real decoder meets
(hooked while it decodes two latent frames at the given size), and times per shape:

- conv3d on NDHWC (as our GPU workers run it) and on NCDHW (as ComfyUI does), cuDNN heuristics and benchmark mode;
- "3 x conv2d": three NHWC conv2d calls on frame views of the same NDHWC buffer (no copy), summed;
- "conv2d 3Co": one NHWC conv2d with the three taps' weights stacked as 3*Co outputs over all T+2 frames, then
  the three shifted slices summed (wastes the two extra frames' FLOPs).

Each form is checked against the fp32 conv3d; FLOP rates count the conv's useful FLOPs (2 * Co * C * 27 per output).

    python bench/conv3d_forms.py --arch wan2.1 --size 832x480
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.cli import RANDOM_VAES  # noqa: E402
from bagel_vae_pp.vae_kinds import in_memory_format  # noqa: E402
from bagel_vae_pp.video_layout import to_layout  # noqa: E402
from bench.timing import cuda_median_ms  # noqa: E402


def decoder_conv_shapes(arch: str, size: tuple[int, int], device) -> list[tuple[tuple, tuple]]:
    """(input shape, weight shape) of every distinct 3x3x3 conv3d of the second decode chunk, in order."""
    ae = in_memory_format(RANDOM_VAES[arch]().to(device, torch.bfloat16), torch.channels_last)
    s = ae.params.downscale
    z = torch.randn(1, ae.params.z_channels, 2, size[1] // s, size[0] // s, device=device, dtype=torch.bfloat16)
    seen, conv3d = [], F.conv3d

    def hook(x, w, *args, **kwargs):
        if tuple(w.shape[2:]) == (3, 3, 3) and (tuple(x.shape), tuple(w.shape)) not in seen:
            seen.append((tuple(x.shape), tuple(w.shape)))
        return conv3d(x, w, *args, **kwargs)

    F.conv3d = hook
    try:
        with torch.inference_mode():
            ae.decode(to_layout(z, True))
    finally:
        F.conv3d = conv3d
    return seen


def taps_as_conv2d(x, taps, b):
    """x [B, C, T+2, H, W] NDHWC (frames padded in time already), taps: the weights' three [Co, C, 3, 3] time taps
    -> [B, Co, T, H, W]."""
    B, C, T2, H, W = x.shape
    T = T2 - 2
    frames = x.transpose(1, 2)  # [B, T+2, C, H, W], a view; each frame NHWC
    y = None
    for k in range(3):
        part = F.conv2d(frames[:, k : k + T].reshape(B * T, C, H, W), taps[k], b if k == 0 else None, padding=1)
        y = part if y is None else y.add_(part)
    return y.reshape(B, T, -1, H, W).transpose(1, 2)


def stacked_conv2d(x, w3, b):
    """As taps_as_conv2d, with the taps' weights w3 [3*Co, C, 3, 3] in one conv over all T+2 frames."""
    B, C, T2, H, W = x.shape
    T, Co = T2 - 2, w3.shape[0] // 3
    z = F.conv2d(x.transpose(1, 2).reshape(B * T2, C, H, W), w3, padding=1).reshape(B, T2, 3, Co, H, W)
    y = z[:, 0:T, 0] + z[:, 1 : T + 1, 1] + z[:, 2:T2, 2] + b.view(1, 1, Co, 1, 1)
    return y.transpose(1, 2)


def row(xs: tuple, ws: tuple, dev) -> str:
    """One table row: each form of the conv of input shape xs and weight shape ws, timed and checked."""
    x = torch.randn(xs, device=dev, dtype=torch.bfloat16)
    w = torch.randn(ws, device=dev, dtype=torch.bfloat16) * (ws[1] * 27) ** -0.5
    b = torch.randn(ws[0], device=dev, dtype=torch.bfloat16)
    xl = x.contiguous(memory_format=torch.channels_last_3d)
    wl = w.contiguous(memory_format=torch.channels_last_3d)
    taps = [w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
    w3 = torch.cat([w[:, :, k] for k in range(3)]).contiguous(memory_format=torch.channels_last)
    pad = (1, 1, 1, 1, 0, 0)  # rows and columns; time is already padded (the cached frames)
    flop = 2 * ws[0] * ws[1] * 27 * xs[0] * (xs[2] - 2) * xs[3] * xs[4]
    ref = F.conv3d(F.pad(x.float(), pad), w.float(), b.float())
    forms = {
        "NDHWC": lambda: F.conv3d(xl, wl, b, padding=(0, 1, 1)),
        "NCDHW": lambda: F.conv3d(x, w, b, padding=(0, 1, 1)),
        "3x": lambda: taps_as_conv2d(xl, taps, b),
        "3Co": lambda: stacked_conv2d(xl, w3, b),
    }
    ms = {}
    torch.backends.cudnn.benchmark = False
    for name, fn in forms.items():
        ms[name] = cuda_median_ms(fn, repeat=10, warmup=2)
    torch.backends.cudnn.benchmark = True
    ms["bench"] = cuda_median_ms(forms["NDHWC"], repeat=10, warmup=2)
    torch.backends.cudnn.benchmark = False
    scale = ref.abs().max().item()
    errs = [(f().float() - ref).abs().max().item() / scale for f in (forms["3x"], forms["3Co"])]
    cells = " | ".join(f"{ms[k]:.2f} ms {flop / ms[k] / 1e9:.0f}" for k in ("NDHWC", "NCDHW", "bench", "3x", "3Co"))
    return f"| {'×'.join(map(str, xs))} | {ws[0]} | {cells} | {errs[0]:.1e} / {errs[1]:.1e} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wan2.1", choices=["wan2.1", "wan2.2"])
    p.add_argument("--size", default="832x480", help="W x H of the decoded video")
    args = p.parse_args()
    dev = torch.device("cuda:0")
    size = tuple(int(v) for v in args.size.split("x"))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cudnn {torch.backends.cudnn.version()}")
    print("| input B×C×T×H×W | Co | NDHWC | NCDHW | NDHWC bench | 3 x conv2d | conv2d 3Co | max err 3x / 3Co |")
    print("|---|---|---|---|---|---|---|---|")
    for xs, ws in decoder_conv_shapes(args.arch, size, dev):
        print(row(xs, ws, dev), flush=True)


if __name__ == "__main__":
    main()
