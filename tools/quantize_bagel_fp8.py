"""Write an FP8 copy of a bf16 BAGEL-7B-MoT checkpoint folder, streaming tensor by tensor.

python tools/quantize_bagel_fp8.py models/bagel/BAGEL-7B-MoT models/bagel/BAGEL-7B-MoT-fp8

The new ema.safetensors holds every decoder-layer Linear weight as float8_e4m3fn with its fp32 per-output-channel
`weight_scale`, and every other tensor as stored (the layout in bagel_vae_pp/bagel/quantize.py); load_bagel reads
it with weight_dtype "fp8_e4m3fn" without a bf16 detour. The json/txt/md files and ae.safetensors are copied.
The header is written first, from the shapes; then each source tensor is read, converted and written at its
offset, so one tensor is in memory at a time (the largest, embed_tokens or lm_head, is 1.1 GB in bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.bagel.loader import find_vae_file, is_bagel_folder  # noqa: E402
from bagel_vae_pp.bagel.quantize import is_fp8_checkpoint, is_quantized_weight, quantize_rows, scale_key  # noqa: E402

ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
COPIED_SUFFIXES = (".json", ".txt", ".md")


def output_layout(f) -> dict[str, tuple[str, list[int]]]:
    """Output name -> (safetensors dtype, shape), in file order: widest dtypes first, so that every tensor
    starts at a multiple of its item size (as safetensors' own writer does)."""
    entries = {}
    for key in f.keys():
        piece = f.get_slice(key)
        shape = piece.get_shape()
        if is_quantized_weight(key, shape):
            entries[key] = ("F8_E4M3", shape)
            entries[scale_key(key)] = ("F32", shape[:1])
        else:
            entries[key] = (piece.get_dtype(), shape)
    return dict(sorted(entries.items(), key=lambda item: -ITEMSIZE[item[1][0]]))  # stable within a width


def converted(f):
    """(output name, tensor) for each tensor of the source file, in its order, one source tensor at a time."""
    for key in f.keys():
        t = f.get_tensor(key)
        if is_quantized_weight(key, t.shape):
            q, scale = quantize_rows(t)
            yield key, q
            yield scale_key(key), scale
        else:
            yield key, t


def write_fp8_ema(src: str, dst: str) -> None:
    """src ema.safetensors (bf16 layout) -> dst in the FP8 layout, via dst + ".partial" (renamed when complete)."""
    with safe_open(src, framework="pt") as f:
        if is_fp8_checkpoint(f.keys()):
            raise ValueError(f"{src} already holds FP8 weights with scales; nothing to do.")
        layout = output_layout(f)
        header, offset = {}, 0
        for name, (dtype, shape) in layout.items():
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {**(f.metadata() or {}), "format": "pt", "quantization": "fp8_e4m3fn per row"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-aligned
        with open(dst + ".partial", "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            start = out.tell()
            for name, t in converted(f):
                begin, end = header[name]["data_offsets"]
                data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                assert data.nbytes == end - begin, (name, data.nbytes, end - begin)
                out.seek(start + begin)
                out.write(data)
    os.replace(dst + ".partial", dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a bf16 BAGEL checkpoint folder (ema.safetensors, json configs, ae.safetensors)")
    parser.add_argument("dst", help="the folder to write (created; files of the same names are replaced)")
    args = parser.parse_args(argv)
    if not is_bagel_folder(args.src):
        raise SystemExit(f"{args.src} is not a BAGEL checkpoint folder (ema.safetensors, llm_config.json, ...).")
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise SystemExit("src and dst are the same folder; choose another dst.")
    os.makedirs(args.dst, exist_ok=True)
    for name in sorted(os.listdir(args.src)):
        if name.endswith(COPIED_SUFFIXES) and os.path.isfile(os.path.join(args.src, name)):
            shutil.copy2(os.path.join(args.src, name), os.path.join(args.dst, name))
    vae = os.path.relpath(find_vae_file(args.src), args.src)
    os.makedirs(os.path.dirname(os.path.join(args.dst, vae)), exist_ok=True)
    shutil.copy2(os.path.join(args.src, vae), os.path.join(args.dst, vae))
    write_fp8_ema(os.path.join(args.src, "ema.safetensors"), os.path.join(args.dst, "ema.safetensors"))
    print(f"wrote {args.dst}: {', '.join(sorted(os.listdir(args.dst)))}")


if __name__ == "__main__":
    main()
