"""Tokenizer: Qwen2.5 special-token ids, BAGEL text blocks, decoding with special tokens kept."""

import pytest
from tokenizers import Tokenizer

from bagel_vae_pp.bagel.tiny import tokenizer_files
from bagel_vae_pp.bagel.tokenizer import BagelTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return BagelTokenizer(Tokenizer.from_str(tokenizer_files()["tokenizer.json"]))


class TestBagelTokenizer:
    def test_special_tokens_carry_the_qwen25_ids(self, tokenizer):
        s = tokenizer.special
        assert (s.bos, s.eos, s.start_of_image, s.end_of_image) == (151644, 151645, 151652, 151653)

    def test_text_block_wraps_in_im_start_and_im_end(self, tokenizer):
        ids = tokenizer.text_block("the cat")
        assert ids[0] == 151644 and ids[-1] == 151645
        assert ids[1:-1] == tokenizer.encode("the cat")

    def test_merges_apply(self, tokenizer):
        assert len(tokenizer.encode("the cat")) == 2  # "the", "Ġcat"

    def test_special_token_text_maps_to_its_id(self, tokenizer):
        assert tokenizer.encode("a<|vision_end|>") == [tokenizer.encode("a")[0], 151653]

    def test_decode_keeps_special_tokens(self, tokenizer):
        ids = [151644, *tokenizer.encode("the cat"), 151645]
        assert tokenizer.decode(ids) == "<|im_start|>the cat<|im_end|>"

    def test_tokenizer_without_bagel_specials_is_rejected(self):
        bare = Tokenizer.from_str(tokenizer_files()["tokenizer.json"].replace("<|vision_start|>", "<|other|>"))
        with pytest.raises(ValueError, match="vision_start"):
            BagelTokenizer(bare)
