"""The host's checked copy into shared memory: every chunk copied, every chunk checked for NaN/Inf.

`copy_in_checked` splits the input into CHUNK_BYTES pieces handed to a thread pool; inputs here span one to
several chunks, with a ragged last one, so a copy or a check that stops early leaves values behind.
"""

import pytest
import torch

from bagel_vae_pp import shm

STEP = shm.CHUNK_BYTES // 4  # float32 values per chunk
SIZES = [1, STEP - 1, STEP, STEP + 1, 3 * STEP + 3, 7 * STEP + 5]  # 3 * STEP + 3: 3 * 2 MiB + 12 bytes


@pytest.fixture(params=[1, 3], ids=["one thread", "three threads"])
def threads(request, monkeypatch):
    """The copy with one thread (the serial path) and with a pool of three (fewer threads than chunks)."""
    monkeypatch.setattr(shm, "COPY_THREADS", request.param)
    monkeypatch.setattr(shm, "_copier", None)  # a fresh executor of this size
    yield request.param
    if shm._copier is not None:
        shm._copier.shutdown()


def staged(tmp_path, numel):
    """A shared file of `numel` float32 values, filled with a value no source holds (as a reused file is)."""
    dst = shm.create(str(tmp_path / "input"), (numel,))
    dst.fill_(-5.0)
    return dst


class TestCopyInChecked:
    @pytest.mark.parametrize("numel", SIZES)
    def test_every_value_is_copied(self, tmp_path, threads, numel):
        src = torch.rand(numel, generator=torch.Generator().manual_seed(numel))
        dst = staged(tmp_path, numel)
        assert shm.copy_in_checked(dst, src)
        assert torch.equal(dst, src)

    def test_an_image_shaped_batch_is_copied_whole(self, tmp_path, threads):
        src = torch.rand(2, 200, 312, 3)  # 2 * 200 * 312 * 3 * 4 bytes: 2.86 chunks
        dst = staged(tmp_path, src.numel()).view(src.shape)
        assert shm.copy_in_checked(dst, src)
        assert torch.equal(dst, src)

    @pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
    @pytest.mark.parametrize("where", ["first", "middle", "last"])
    def test_a_non_finite_value_in_any_chunk_is_reported(self, tmp_path, threads, value, where):
        numel = 3 * STEP + 3
        position = {"first": 0, "middle": STEP + STEP // 2, "last": numel - 1}[where]
        src = torch.rand(numel)
        src[position] = value
        assert not shm.copy_in_checked(staged(tmp_path, numel), src)

    def test_plus_and_minus_inf_in_different_chunks_are_reported(self, tmp_path, threads):
        src = torch.rand(3 * STEP + 3)
        src[5], src[-1] = float("inf"), -float("inf")
        assert not shm.copy_in_checked(staged(tmp_path, src.numel()), src)

    def test_the_largest_finite_values_are_not_mistaken_for_inf(self, tmp_path, threads):
        """Summing float32 values in float32 would overflow to Inf here; the check sums in float64."""
        src = torch.full((3 * STEP + 3,), torch.finfo(torch.float32).max)
        dst = staged(tmp_path, src.numel())
        assert shm.copy_in_checked(dst, src)
        assert torch.equal(dst, src)
