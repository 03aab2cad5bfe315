"""Qwen2.5 tokenization for BAGEL through the `tokenizers` library, from the checkpoint's tokenizer.json.

BAGEL encodes text without any chat template: a text block is `<|im_start|>` + encode(text) + `<|im_end|>`
(Bagel.prepare_prompts). Decoding keeps special tokens, as the official Qwen2Tokenizer.decode does, because
the inferencer cuts generated text between `<|im_start|>` and `<|im_end|>`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tokenizers import Tokenizer

from .config import BOS_TOKEN, END_OF_IMAGE_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN


@dataclass(frozen=True)
class SpecialTokens:
    bos: int  # <|im_start|> 151644: opens every text block and starts text generation
    eos: int  # <|im_end|> 151645: closes text blocks, stops generation
    start_of_image: int  # <|vision_start|> 151652
    end_of_image: int  # <|vision_end|> 151653


class BagelTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = {}
        for name, token in (
            ("bos", BOS_TOKEN),
            ("eos", EOS_TOKEN),
            ("start_of_image", START_OF_IMAGE_TOKEN),
            ("end_of_image", END_OF_IMAGE_TOKEN),
        ):
            ids[name] = tokenizer.token_to_id(token)
            if ids[name] is None:
                raise ValueError(
                    f"tokenizer.json has no {token!r} token; BAGEL needs the Qwen2.5 tokenizer that ships with "
                    "BAGEL-7B-MoT."
                )
        self.special = SpecialTokens(**ids)

    @classmethod
    def from_folder(cls, folder: str) -> BagelTokenizer:
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: the BAGEL model folder needs the Qwen2.5 tokenizer.json from "
                "ByteDance-Seed/BAGEL-7B-MoT."
            )
        return cls(Tokenizer.from_file(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (Qwen2.5 adds none)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text_block(self, text: str) -> list[int]:
        """`<|im_start|>` text `<|im_end|>`: how every text input enters BAGEL's context."""
        return [self.special.bos, *self.encode(text), self.special.eos]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
