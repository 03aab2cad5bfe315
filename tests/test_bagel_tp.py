"""Tensor-parallel BAGEL: the shard plan, and real gloo ranks against the single-process, unsharded model.

The ranks load their shards of a tiny checkpoint with 8 query heads on 2 KV heads (TINY_TP_PARAMS), so that
2 ranks split the KV heads, 3 ranks get uneven heads (3, 3, 2) and rank 1 of 3 reads both KV heads, and 4 ranks
replicate each KV head on two ranks. Each rank runs a causal text prefill, a generation-expert velocity pass (alone,
and batched with a pass against the empty context), a clean latent block that updates the cache, and greedy decode
steps; the reference is `load_bagel` in this process, which shares no sharding code. With FP8 weights every rank must
hold exactly the slices of the FP8 model `load_bagel` builds, worked out by hand below (a column split keeps its
whole rows' scales).
"""

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from ranks import gloo_group, run_ranks

from bagel_vae_pp.bagel.config import CONFIGS
from bagel_vae_pp.bagel.loader import load_bagel
from bagel_vae_pp.bagel.model import EMPTY_CONTEXT
from bagel_vae_pp.bagel.quantize import FP8
from bagel_vae_pp.bagel.tiny import TINY_TP_PARAMS, write_tiny_checkpoint
from bagel_vae_pp.bagel.tokenizer import BagelTokenizer, SpecialTokens
from bagel_vae_pp.bagel.tp import load_bagel_shard, shard_nbytes, shard_plan

TIMEOUT_S = 120  # the whole run, spawn included (about 10 s with 4 ranks on 2 cores)
DECODE_STEPS = 4
LATENT_TOKENS = 12
SPECIAL_IDS = SpecialTokens(151644, 151645, 151652, 151653)
REL_TOL = 1e-5
# The KV heads [start, stop) each rank must cache, by world, worked out by hand: query head h reads KV head h // 4.
KV_HEADS = {
    1: [(0, 2)],
    2: [(0, 1), (1, 2)],
    3: [(0, 1), (0, 2), (1, 2)],  # heads 0-2, 3-5, 6-7: heads 3 and 4, 5 straddle the two groups
    4: [(0, 1), (0, 1), (1, 2), (1, 2)],
}
# The rest of each rank's slices of TINY_TP_PARAMS, by hand: query heads (16 dims each), MLP rows (176, not a
# multiple of 64: split row by row). q/k/v/gate/up_proj are split by output rows, o/down_proj by input columns.
HEAD_DIM = 16
HEADS = {1: [(0, 8)], 2: [(0, 4), (4, 8)], 3: [(0, 3), (3, 6), (6, 8)]}
MLP_ROWS = {1: [(0, 176)], 2: [(0, 88), (88, 176)], 3: [(0, 59), (59, 118), (118, 176)]}
ROW_SPLIT = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads", "gate_proj": "mlp", "up_proj": "mlp"}
COLUMN_SPLIT = {"o_proj": "heads", "down_proj": "mlp"}
# (checkpoint layout, weight dtype) of the shards compared with load_bagel's model.
FP8_CASES = [("bf16", "fp8_e4m3fn"), ("fp8", "fp8_e4m3fn"), ("fp8", "bf16")]


def run_passes(model, tokenizer) -> dict:
    """Text prefill, a velocity pass, a clean latent block into the cache, then greedy decoding."""
    special = tokenizer.special
    latent = torch.randn(LATENT_TOKENS, 64, generator=torch.Generator().manual_seed(0))  # [N, 64]
    positions = torch.arange(LATENT_TOKENS)
    ctx = model.prefill_text(EMPTY_CONTEXT, tokenizer.text_block("the cat in the hat"))
    block = model.wrap_image(model.latent_tokens(latent, 0.6, positions), special)
    velocity = model.velocity(ctx, block)
    # batched passes: each all-reduce sums both passes' rows; one pass at a time is the reference's
    velocities = model.velocities([ctx, EMPTY_CONTEXT], block)
    alone = [velocity, model.velocity(EMPTY_CONTEXT, block)]
    clean = model.wrap_image(model.latent_tokens(latent, 0.0, positions), special)
    ctx = model.prefill_image_block(ctx, clean, is_latent=True)
    token, tokens, logits = special.bos, [], []
    for _ in range(DECODE_STEPS):
        step_logits, ctx = model.next_token_logits(ctx, token)  # [V]
        token = int(torch.argmax(step_logits))
        tokens.append(token)
        logits.append(step_logits)
    return {"kv": ctx.kv, "velocity": velocity, "velocities": velocities, "alone": alone,
            "logits": torch.stack(logits), "tokens": tokens}  # fmt: skip


def rank_main(rank, world, folder, store_path, out_path):
    torch.set_num_threads(1)  # up to four ranks share the test machine's cores
    with gloo_group(rank, world, store_path):
        model = load_bagel_shard(folder, rank, world, "cpu", torch.float32, group=dist.group.WORLD)
        with torch.inference_mode():
            torch.save(run_passes(model, BagelTokenizer.from_folder(folder)), out_path)


def run_tp_ranks(tmp_path, world, folder) -> list[dict]:
    """Spawn `world` gloo ranks; a rank still running after TIMEOUT_S (a hang in a collective) fails the test."""
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    store = str(tmp_path / "store")
    run_ranks(rank_main, lambda r: (r, world, folder, store, str(outs[r])), world, TIMEOUT_S)
    return [torch.load(path) for path in outs]


def shards_main(rank, world, cases, store_path, out_path):
    """Load this rank's shard for each (folder, weight dtype) of `cases` and save their state dicts."""
    torch.set_num_threads(1)
    with gloo_group(rank, world, store_path):
        shards = [load_bagel_shard(folder, rank, world, "cpu", torch.float32, dist.group.WORLD, weight_dtype)
                  for folder, weight_dtype in cases]  # fmt: skip
        torch.save([shard.state_dict() for shard in shards], out_path)


def rel_err(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def expected_slice(key: str, whole: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """What rank `rank` of `world` holds of the whole model's tensor `key`, from the hand-worked tables: a row
    split's rows of the weight, its scales and its bias; a column split's columns of the weight and all scales."""
    parts = key.split(".")
    linear = parts[-2].removesuffix("_moe_gen")
    if not key.startswith("language_model.model.layers.") or linear not in ROW_SPLIT | COLUMN_SPLIT:
        return whole
    dims = lambda heads: [(a * HEAD_DIM, b * HEAD_DIM) for a, b in heads]  # noqa: E731
    blocks = {"heads": dims(HEADS[world]), "kv_heads": dims(KV_HEADS[world]), "mlp": MLP_ROWS[world]}
    if linear in ROW_SPLIT:
        a, b = blocks[ROW_SPLIT[linear]][rank]
        return whole[a:b]
    a, b = blocks[COLUMN_SPLIT[linear]][rank]
    return whole if parts[-1] == "weight_scale" else whole[:, a:b]


def assert_same_bits(got: dict, whole: dict, rank: int, world: int) -> None:
    assert got.keys() == whole.keys()
    for key, t in got.items():
        want = expected_slice(key, whole[key], rank, world)
        assert t.dtype == want.dtype and t.shape == want.shape, (key, t.dtype, t.shape, want.dtype, want.shape)
        bits = (lambda x: x.view(torch.uint8)) if t.dtype == FP8 else (lambda x: x)  # noqa: E731
        assert torch.equal(bits(t), bits(want)), key


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("bagel_tp")), seed=3, params=TINY_TP_PARAMS)


@pytest.fixture(scope="module")
def fp8_checkpoint(checkpoint, tmp_path_factory):
    """The same checkpoint in the FP8 layout, written by tools/quantize_bagel_fp8.py."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools/quantize_bagel_fp8.py")
    spec = importlib.util.spec_from_file_location("quantize_bagel_fp8", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = str(tmp_path_factory.mktemp("bagel_tp_fp8"))
    tool.main([checkpoint, folder])
    return folder


@pytest.fixture(scope="module")
def fp8_cases(checkpoint, fp8_checkpoint):
    """[(folder, weight dtype)] of FP8_CASES, and load_bagel's whole model of each (its state dict)."""
    cases = [({"bf16": checkpoint, "fp8": fp8_checkpoint}[layout], wd) for layout, wd in FP8_CASES]
    wholes = [load_bagel(folder, dtype=torch.float32, weight_dtype=wd).model.state_dict() for folder, wd in cases]
    return cases, wholes


@pytest.fixture(scope="module")
def reference(checkpoint):
    loaded = load_bagel(checkpoint, dtype=torch.float32)
    with torch.inference_mode():
        return run_passes(loaded.model, loaded.tokenizer)


class TestPlan:
    """The split of the real model (28 query heads, 4 KV heads, MLP 18944), checked against hand-worked values."""

    def test_heads_kv_heads_and_groups_of_each_rank(self):
        cfg = CONFIGS["7b-mot"].llm
        want = {
            2: [((0, 14), (0, 2), (7, 7)), ((14, 28), (2, 4), (7, 7))],
            3: [((0, 10), (0, 2), (7, 3)), ((10, 19), (1, 3), (4, 5)), ((19, 28), (2, 4), (2, 7))],
            8: [((0, 4), (0, 1), (4,)), ((4, 8), (0, 2), (3, 1)), ((8, 12), (1, 2), (4,)),
                ((12, 16), (1, 3), (2, 2)), ((16, 19), (2, 3), (3,)), ((19, 22), (2, 4), (2, 1)),
                ((22, 25), (3, 4), (3,)), ((25, 28), (3, 4), (3,))],
        }  # fmt: skip
        for world, ranks in want.items():
            got = [shard_plan(cfg, r, world) for r in range(world)]
            assert [(p.heads, p.kv_heads, p.kv_groups) for p in got] == ranks, world

    def test_every_query_head_reads_its_own_kv_head_for_every_world(self):
        cfg = CONFIGS["7b-mot"].llm
        for world in range(1, 29):
            for rank in range(world):
                plan = shard_plan(cfg, rank, world)
                read = [plan.kv_heads[0] + j for j, n in enumerate(plan.kv_groups) for _ in range(n)]
                assert read == [h // 7 for h in range(*plan.heads)], (world, rank)

    def test_mlp_rows_in_units_of_64_and_all_rows_covered(self):
        cfg = CONFIGS["7b-mot"].llm
        assert [shard_plan(cfg, r, 3).mlp for r in range(3)] == [(0, 6336), (6336, 12672), (12672, 18944)]
        assert [shard_plan(cfg, r, 4).mlp for r in range(4)] == [(0, 4736), (4736, 9472), (9472, 14208),
                                                                 (14208, 18944)]  # fmt: skip
        tiny = TINY_TP_PARAMS.llm  # 176 rows: not a multiple of 64, split row by row
        assert [shard_plan(tiny, r, 3).mlp for r in range(3)] == [(0, 59), (59, 118), (118, 176)]

    def test_more_ranks_than_query_heads_is_refused(self):
        with pytest.raises(ValueError, match=r"29 ranks.*28 query heads.*1 to 28 ranks \(1, 2, 4, 7, 14, 28"):
            shard_plan(CONFIGS["7b-mot"].llm, 0, 29)

    def test_a_group_of_several_ranks_needs_its_process_group(self, checkpoint):
        with pytest.raises(ValueError, match="2-rank tensor-parallel group needs the group's process group"):
            load_bagel_shard(checkpoint, 0, 2, "cpu", torch.float32)


class TestShardBytes:
    def test_full_size_fp8_rank_holds_a_byte_per_weight_and_its_rows_scales(self):
        # Decoder-layer Linear weights in FP8 (1 byte) with an fp32 scale per output row: a row split halves its
        # rows, o_proj and down_proj keep all D rows (their scales are the whole rows'). Biases and the rest bf16.
        D, inter, kv, layers, total = 3584, 18944, 512, 28, 14_607_260_128
        weights = 2 * layers * (2 * D * D + 2 * kv * D + 3 * D * inter)
        biases = 2 * layers * (D + 2 * kv)
        rest = total - weights - biases
        split_rows, whole_rows = 2 * layers * (D + 2 * kv + 2 * inter), 2 * layers * 2 * D  # scales
        params = CONFIGS["7b-mot"]
        for weight_dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
            assert shard_nbytes(params, 0, 1, torch.bfloat16, weight_dtype) == (
                2 * (rest + biases) + weights + 4 * (split_rows + whole_rows)
            )
            for rank in range(2):
                assert shard_nbytes(params, rank, 2, torch.bfloat16, weight_dtype) == (
                    2 * (rest + biases // 2) + weights // 2 + 4 * (split_rows // 2 + whole_rows)
                )

    def test_full_size_rank_holds_its_half_of_every_layer_and_all_the_rest(self):
        # Per layer and expert (bf16): q_proj with bias, k/v_proj with bias, o_proj, gate/up/down; the q/k norms
        # and the two layer norms stay whole. Hand-counted from the config, not from a model.
        D, inter, kv, layers = 3584, 18944, 512, 28
        split = 2 * layers * (D * D + D + 2 * (kv * D + kv) + D * D + 3 * D * inter)
        total = 14_607_260_128  # parameters of ema.safetensors (notes/bagel.md)
        params = CONFIGS["7b-mot"]
        assert shard_nbytes(params, 0, 1, torch.bfloat16) == 2 * total
        for rank in range(2):
            assert shard_nbytes(params, rank, 2, torch.bfloat16) == 2 * (total - split + split // 2)


class TestRanksMatchTheUnshardedModel:
    def check(self, got: dict, want: dict, rank: int, world: int):
        assert got["tokens"] == want["tokens"]
        assert rel_err(got["velocity"], want["velocity"]) < REL_TOL
        assert all(rel_err(g, w) < REL_TOL for g, w in zip(got["velocities"], want["alone"], strict=True))
        assert rel_err(got["logits"], want["logits"]) < REL_TOL
        a, b = KV_HEADS[world][rank]
        for (k, v), (k_ref, v_ref) in zip(got["kv"], want["kv"]):
            assert k.shape[1] == b - a  # only this rank's KV heads are cached
            assert rel_err(k, k_ref[:, a:b]) < REL_TOL and rel_err(v, v_ref[:, a:b]) < REL_TOL

    def test_one_rank_loads_the_whole_model(self, checkpoint, reference):
        model = load_bagel_shard(checkpoint, 0, 1, "cpu", torch.float32)
        # no collective: the residual adds stay fused into the GEMMs, as in the in-process path
        assert all(layer.reduce is None for layer in model.language_model.model.layers)
        with torch.inference_mode():
            self.check(run_passes(model, BagelTokenizer.from_folder(checkpoint)), reference, 0, 1)

    def test_batched_passes_all_reduce_all_their_rows_at_once(self, checkpoint):
        """Two all-reduces a layer, each of both passes' rows [2·L, D], not one per pass (run with a counting
        identity in place of tp.all_reduce_sum)."""
        model = load_bagel(checkpoint, dtype=torch.float32).model
        sizes = []
        for layer in model.language_model.model.layers:
            layer.reduce = lambda x: sizes.append(tuple(x.shape)) or x
        latent = torch.randn(LATENT_TOKENS, 64, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ctx = model.prefill_text(EMPTY_CONTEXT, [151644, 10, 151645])
            sizes.clear()
            block = model.wrap_image(model.latent_tokens(latent, 0.6, torch.arange(LATENT_TOKENS)), SPECIAL_IDS)
            model.velocities([ctx, EMPTY_CONTEXT], block)
        L, D, layers = LATENT_TOKENS + 2, TINY_TP_PARAMS.llm.hidden_size, TINY_TP_PARAMS.llm.num_hidden_layers
        assert sizes == [(2 * L, D)] * (2 * layers)

    @pytest.mark.parametrize("world", [2, 3, 4])
    def test_gloo_ranks(self, tmp_path, checkpoint, reference, world):
        for rank, got in enumerate(run_tp_ranks(tmp_path, world, checkpoint)):
            self.check(got, reference, rank, world)


class TestFp8Shards:
    """Each rank's FP8 weights and scales are the slices of load_bagel's FP8 model, bit for bit, whether quantized
    from the bf16 file or read from an FP8 checkpoint (and its bf16 weights read back from the FP8 file)."""

    def test_one_rank_holds_the_whole_fp8_model(self, fp8_cases):
        for (folder, weight_dtype), whole in zip(*fp8_cases):
            assert_same_bits(load_bagel_shard(folder, 0, 1, "cpu", torch.float32, None, weight_dtype).state_dict(),
                             whole, 0, 1)  # fmt: skip

    @pytest.mark.parametrize("world", [2, 3])
    def test_gloo_ranks_hold_slices_of_the_fp8_model(self, tmp_path, fp8_cases, world):
        cases, wholes = fp8_cases
        outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
        store = str(tmp_path / "store")
        run_ranks(shards_main, lambda r: (r, world, cases, store, str(outs[r])), world, TIMEOUT_S)
        for rank, out in enumerate(outs):
            for got, whole in zip(torch.load(out), wholes):
                assert_same_bits(got, whole, rank, world)
