"""The bench's exactness check: which pool rows fail it, and that a failure is the exit code."""

import json

import pytest

from bagel_vae_pp import cli
from bagel_vae_pp.wan import random_wan
from bagel_vae_pp.wan22 import random_wan22


def row(op, mode, dtype, err):
    return {"op": op, "mode": mode, "dtype": dtype, "max_rel_err": err}


@pytest.mark.parametrize(
    "dtype,full_err,pool_err,fails",
    [("fp32", 2e-6, 9e-5, False), ("fp32", 2e-6, 2e-4, True), ("bf16", 6e-2, 7e-2, False),
     ("bf16", 6e-2, 8e-2, True), ("bf16", 1e-6, 9e-5, False)],
)  # fmt: skip
def test_pool_rows_beyond_the_bound_fail(dtype, full_err, pool_err, fails):
    rows = [row(op, mode, dtype, err) for op in ("decode", "encode")
            for mode, err in (("full", full_err), ("exact", pool_err))]  # fmt: skip
    assert [r["op"] for r in cli.inexact(rows)] == (["decode", "encode"] if fails else [])


def test_tiled_rows_are_not_held_to_the_exact_bound():
    assert cli.inexact([row("decode", "full", "fp32", 1e-6), row("decode", "tiled", "fp32", 0.3)]) == []


def test_a_failed_check_is_exit_code_1(monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench", lambda args: [row("decode", "full", "fp32", 1e-6) | {"workers": 1},
                                                    row("decode", "exact", "fp32", 1e-3) | {"workers": 2}])  # fmt: skip
    monkeypatch.setattr(cli, "print_table", lambda rows: None)
    assert cli.main(["bench", "--device", "cpu"]) == 1
    assert "exactness check failed: decode through the pool is off by 1.00e-03" in capsys.readouterr().err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch, workers, size", [("wan2.1", 2, 40), ("wan2.1", 3, 40), ("wan2.2", 2, 80)])
def test_wan_bench_rows_carry_frames_and_pass_the_exactness_check(monkeypatch, capsys, arch, workers, size):
    """The video bench end to end on the real pool (the tiny Wans for speed): 5 latent rows, 5 frames."""
    tiny = {"wan2.1": lambda: random_wan("tiny", seed=2), "wan2.2": lambda: random_wan22("tiny", seed=2)}
    monkeypatch.setitem(cli.RANDOM_VAES, arch, tiny[arch])
    shapes, bench_op = {}, cli.bench_op
    monkeypatch.setattr(
        cli, "bench_op", lambda ae, op, data, *a: shapes.setdefault(op, data.shape) and bench_op(ae, op, data, *a)
    )
    argv = ["bench", "--vae-arch", arch, "--device", "cpu", "--workers", str(workers), "--size", str(size)]
    assert cli.main([*argv, "--frames", "5", "--repeat", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    keys = {"op", "size", "batch", "frames", "dtype", "device", "mode", "workers", "ms", "peak_gib", "max_abs_err",
            "max_rel_err"}  # fmt: skip
    assert [(r["op"], r["mode"], r["workers"]) for r in rows] == [
        ("decode", "full", 1), ("decode", "exact", workers), ("encode", "full", 1), ("encode", "exact", workers)
    ]  # fmt: skip
    assert all(set(r) == keys and r["frames"] == 5 for r in rows)
    assert all(r["max_rel_err"] <= 1e-4 for r in rows)
    assert shapes == {"decode": (1, 4, 2, 5, 5), "encode": (5, size, size, 3)}  # 5 frames in, 2 latent frames


def test_a_video_bench_refuses_a_batch(capsys):
    assert cli.main(["bench", "--vae-arch", "wan2.1", "--device", "cpu", "--batch", "2"]) == 2
    assert "a video VAE bench runs one video" in capsys.readouterr().err
