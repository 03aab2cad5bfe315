"""BAGEL through the worker pool (gloo on CPU, fp32) against the in-process pipeline on a tiny checkpoint.

The host keeps the random numbers and the guidance arithmetic, the workers the model and its contexts; a pool of
1 worker, tensor-parallel groups of 2 and 3 (8 query heads over 2 KV heads: uneven at 3), and CFG-parallel groups
(2 groups of 1 and of 2 workers, 3 groups of 1: edit's three passes at once) must give the final latent of the
in-process path within 1e-5 relative and the same greedy text. With FP8 weights (fp8_e4m3fn, computed in fp32) the
reference is the in-process FP8 model; fp8_e4m3fn_fast is refused on CPU workers before any worker starts.
"""

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from host_stub import InterruptProcessingException

from bagel_vae_pp.bagel.loader import load_bagel
from bagel_vae_pp.bagel.pipeline import autoencoder_moments, edit_image, text_to_image, understand_image
from bagel_vae_pp.bagel.sampler import GuidanceOptions
from bagel_vae_pp.bagel.split import Split
from bagel_vae_pp.bagel.stream import pass_work_bytes
from bagel_vae_pp.bagel.tiny import TINY_TP_PARAMS, write_tiny_checkpoint
from bagel_vae_pp.bagel.tp import shard_nbytes
from bagel_vae_pp.bagel_job import PoolBagel, auto_split, load_on_pool
from bagel_vae_pp.pool import PoolSpec, WorkerError, WorkerPool

pytestmark = pytest.mark.timeout(240)
T2I = GuidanceOptions(6, 3.0, 4.0, 1.5, (0.4, 1.0), "global", 0.0)
EDIT = GuidanceOptions(6, 3.0, 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bagel") / "tiny-tp")
    write_tiny_checkpoint(folder, seed=5, params=TINY_TP_PARAMS)
    return load_bagel(folder, "cpu", torch.float32)


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def image() -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, 72), torch.linspace(0, 1, 100), indexing="ij")
    return torch.stack([x, y, x * y], dim=-1)  # [72, 100, 3]


@pytest.fixture(scope="module", params=["1x1", "1x2", "1x3", "2x1", "2x2", "3x1"])
def pool_bagel(request, checkpoint):
    split = Split(*map(int, request.param.split("x")))
    pool = WorkerPool(PoolSpec.parse(f"cpu:{split.workers}", "fp32", 60))
    bagel = PoolBagel(pool, checkpoint.folder, checkpoint.tokenizer.special, "fp32", split)
    bagel.load()
    yield bagel
    pool.shutdown()


class TestSameAsInProcess:
    def test_text_to_image(self, checkpoint, pool_bagel):
        want, _ = text_to_image(checkpoint.model, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I)
        got, _ = text_to_image(pool_bagel, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I)
        pool_bagel.release()
        assert close(got, want) <= 1e-5

    def test_step_cache_skips_the_same_steps(self, checkpoint, pool_bagel):
        """StepCache decides on the host's latent: the pool skips what in-process skips (fewer passes, same latent)."""
        cached = replace(T2I, num_timesteps=12, step_cache=0.2)
        want, _ = text_to_image(checkpoint.model, checkpoint.tokenizer, "a red cube", 64, 48, 3, cached)
        calls = []
        velocities = pool_bagel.velocities
        pool_bagel.velocities = lambda *args: calls.append(1) or velocities(*args)
        try:
            got, _ = text_to_image(pool_bagel, checkpoint.tokenizer, "a red cube", 64, 48, 3, cached)
        finally:
            del pool_bagel.velocities
        pool_bagel.release()
        assert close(got, want) <= 1e-5 and len(calls) < 11

    def test_edit(self, checkpoint, pool_bagel):
        encode = autoencoder_moments(checkpoint.vae)  # the conditioning encode stays on the host here
        want, _ = edit_image(checkpoint.model, checkpoint.tokenizer, image(), "make it blue", encode, 4, EDIT)
        got, _ = edit_image(pool_bagel, checkpoint.tokenizer, image(), "make it blue", encode, 4, EDIT)
        pool_bagel.release()
        assert close(got, want) <= 1e-5

    def test_understanding_text_and_thinking(self, checkpoint, pool_bagel):
        args = (checkpoint.tokenizer, image(), "what is it?", 8)
        assert understand_image(pool_bagel, *args) == understand_image(checkpoint.model, *args)
        want = text_to_image(
            checkpoint.model, checkpoint.tokenizer, "a cat", 32, 32, 1, T2I, think=True, max_think_tokens=5
        )
        got = text_to_image(pool_bagel, checkpoint.tokenizer, "a cat", 32, 32, 1, T2I, think=True, max_think_tokens=5)
        pool_bagel.release()
        assert got[1] == want[1] and close(got[0], want[0]) <= 1e-5


@pytest.fixture(scope="module")
def fp8_checkpoint(checkpoint):
    return load_bagel(checkpoint.folder, "cpu", torch.float32, weight_dtype="fp8_e4m3fn")


class TestFp8Weights:
    @pytest.mark.parametrize("split", [Split(1, 2), Split(2, 1)], ids=str)
    def test_latent_and_text_are_the_in_process_fp8_models(self, checkpoint, fp8_checkpoint, split):
        pool = WorkerPool(PoolSpec.parse(f"cpu:{split.workers}", "fp32", 60))
        try:
            bagel = PoolBagel(pool, checkpoint.folder, checkpoint.tokenizer.special, "fp32", split,
                              weight_dtype="fp8_e4m3fn")  # fmt: skip
            want, _ = text_to_image(fp8_checkpoint.model, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I)
            got, _ = text_to_image(bagel, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I)
            unquantized, _ = text_to_image(checkpoint.model, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I)
            assert close(got, want) <= 1e-5 < close(unquantized, want)  # the workers hold the FP8 weights
            args = (checkpoint.tokenizer, image(), "what is it?", 8)
            assert understand_image(bagel, *args) == understand_image(fp8_checkpoint.model, *args)
        finally:
            pool.shutdown()

    def test_auto_split_counts_fp8_bytes_and_keeps_a_held_model_of_the_same_weight_dtype(self, checkpoint):
        """Two GPUs with room for one FP8 copy (not a bf16 one) each: fp8 gets a copy per worker, bf16 a TP pair."""
        params = checkpoint.model.params
        free = pass_work_bytes(params, torch.bfloat16) + shard_nbytes(params, 0, 1, torch.bfloat16, "fp8_e4m3fn")
        pool = SimpleNamespace(spec=SimpleNamespace(devices=("cuda:0", "cuda:1")), is_running=False, holding={},
                               call=lambda *args: [{"free_bytes": free}] * 2)  # fmt: skip
        assert auto_split(pool, checkpoint.folder, "bf16", "fp8_e4m3fn") == Split(2, 1)
        assert auto_split(pool, checkpoint.folder, "bf16", "bf16") == Split(1, 2)
        pool.is_running, pool.holding["bagel"] = True, (checkpoint.folder, "bf16", "fp8_e4m3fn", Split(1, 1))
        assert auto_split(pool, checkpoint.folder, "bf16", "fp8_e4m3fn") == Split(1, 1)
        assert auto_split(pool, checkpoint.folder, "bf16", "bf16") == Split(1, 2) and "bagel" not in pool.holding

    def test_fp8_gemms_on_cpu_workers_are_refused_in_one_line_before_a_worker_starts(self, checkpoint):
        pool = WorkerPool(PoolSpec.parse("cpu:2", "bf16", 60))
        special, folder = checkpoint.tokenizer.special, checkpoint.folder
        for load in (lambda: PoolBagel(pool, folder, special, "bf16", Split(1, 2), weight_dtype="fp8_e4m3fn_fast"),
                     lambda: load_on_pool(pool, folder, "bf16", weight_dtype="fp8_e4m3fn_fast")):  # fmt: skip
            with pytest.raises(ValueError, match=r"fp8_e4m3fn_fast needs FP8 tensor cores .*; cpu has no compute "
                               r"capability \(not a CUDA GPU\)\. Use fp8_e4m3fn") as refused:  # fmt: skip
                load()
            assert "\n" not in str(refused.value) and not pool.is_running


class TestContexts:
    def test_contexts_the_host_drops_are_freed_in_the_workers(self, checkpoint):
        pool = WorkerPool(PoolSpec.parse("cpu:1", "fp32", 60))
        try:
            bagel = PoolBagel(pool, checkpoint.folder, checkpoint.tokenizer.special, "fp32")
            bagel.load()
            text_to_image(bagel, checkpoint.tokenizer, "a red cube", 32, 32, 0, T2I)  # its contexts, then dropped
            ids = checkpoint.tokenizer.text_block("x")
            kept = bagel.prefill_text(bagel.empty_context, ids)
            assert bagel.call("prefill_text", ctx=kept.id, out=999, ids=ids)[0]["held"] == 3  # empty, kept, 999
        finally:
            pool.shutdown()


class TestFaults:
    def test_cancel_mid_sampling_then_the_next_image_is_right(self, checkpoint):
        pool = WorkerPool(PoolSpec.parse("cpu:2", "fp32", 60))
        try:
            bagel = PoolBagel(pool, checkpoint.folder, checkpoint.tokenizer.special, "fp32", Split(1, 2))
            bagel.load()
            steps = []

            def cancel_at_step_3(done, total):
                steps.append(done)
                if done == 3:
                    raise InterruptProcessingException()

            with pytest.raises(InterruptProcessingException):
                text_to_image(bagel, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I, progress=cancel_at_step_3)
            bagel.release()
            want, _ = text_to_image(checkpoint.model, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I)
            got, _ = text_to_image(bagel, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I)
            assert steps == [1, 2, 3] and close(got, want) <= 1e-5
        finally:
            pool.shutdown()

    def test_a_killed_worker_mid_sampling_is_an_error_within_5_s(self, checkpoint):
        pool = WorkerPool(PoolSpec.parse("cpu:2", "fp32", 60))
        try:
            bagel = PoolBagel(pool, checkpoint.folder, checkpoint.tokenizer.special, "fp32", Split(1, 2))
            bagel.load()
            killed = {}

            def kill_rank_1(done, total):
                if not killed:
                    pool.procs[1].kill()
                    killed["at"] = time.monotonic()

            with pytest.raises(WorkerError, match=r"worker 1 on cpu died"):
                text_to_image(bagel, checkpoint.tokenizer, "a red cube", 64, 48, 3, T2I, progress=kill_rank_1)
            assert time.monotonic() - killed["at"] < 5 and not pool.is_running
            bagel.load()  # the next prompt starts a fresh pool and loads again
            want, _ = text_to_image(checkpoint.model, checkpoint.tokenizer, "a cube", 32, 32, 0, T2I)
            got, _ = text_to_image(bagel, checkpoint.tokenizer, "a cube", 32, 32, 0, T2I)
            assert close(got, want) <= 1e-5
        finally:
            pool.shutdown()

    def test_a_split_larger_than_the_pool_is_refused(self, checkpoint):
        pool = WorkerPool(PoolSpec.parse("cpu:2", "fp32", 60))
        with pytest.raises(ValueError, match="split: 2x2 needs 4 workers; the pool has 2"):
            PoolBagel(pool, checkpoint.folder, checkpoint.tokenizer.special, "fp32", Split(2, 2))
