"""Write a tiny random-weight BAGEL-7B-MoT checkpoint folder (real file layout) for tests and demos.

python tools/make_tiny_bagel.py models/bagel/tiny-bagel [--seed 0] [--vae-in-subfolder]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="output folder, e.g. ComfyUI/models/bagel/tiny-bagel")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--vae-in-subfolder", action="store_true", help="write vae/ae.safetensors (DF11 layout)")
    args = parser.parse_args(argv)
    folder = write_tiny_checkpoint(args.folder, seed=args.seed, vae_in_subfolder=args.vae_in_subfolder)
    print(f"wrote {folder}: {', '.join(sorted(os.listdir(folder)))}")


if __name__ == "__main__":
    main()
