"""Write a tiny random-weight BAGEL-7B-MoT checkpoint folder (real file layout) for tests and demos.

python tools/make_tiny_bagel.py models/bagel/tiny-bagel [--seed 0] [--vae-in-subfolder]
    [--vae-size flux|tiny] [--vae-dtype bf16|fp32]

The default ae.safetensors is a random FLUX VAE at the released widths (84M parameters, 168 MB in bf16): the
only one ComfyUI's VAE class builds, so the BAGEL Model Loader node refuses others. --vae-size tiny (32 wide)
is for the engine alone.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.autoencoder import random_autoencoder  # noqa: E402
from bagel_vae_pp.bagel.loader import DTYPES  # noqa: E402
from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="output folder, e.g. ComfyUI/models/bagel/tiny-bagel")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--vae-in-subfolder", action="store_true", help="write vae/ae.safetensors (DF11 layout)")
    parser.add_argument("--vae-size", choices=("tiny", "flux"), default="flux", help="ae.safetensors size")
    parser.add_argument("--vae-dtype", choices=tuple(DTYPES), default="bf16", help="ae.safetensors dtype")
    args = parser.parse_args(argv)
    vae = random_autoencoder(args.vae_size, seed=args.seed)
    folder = write_tiny_checkpoint(args.folder, seed=args.seed, vae_in_subfolder=args.vae_in_subfolder, vae=vae,
                                   vae_dtype=DTYPES[args.vae_dtype])  # fmt: skip
    print(f"wrote {folder}: {', '.join(sorted(os.listdir(folder)))}")


if __name__ == "__main__":
    main()
