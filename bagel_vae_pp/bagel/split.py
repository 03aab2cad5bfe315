"""How a pool's N workers share BAGEL: G groups of T workers each (G × T ≤ N). The T workers of a group hold one
tensor-parallel copy of the model; the G groups hold G copies and compute the guidance passes of a step at the
same time (CFG-parallel: text-to-image has 2 passes inside the CFG interval, edit 3; pass i runs on group i mod G).

The split never changes a result: every group computes what one process would, and the host mixes the passes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

GIB = 1 << 30
DEFAULT_MAX_GROUPS = 2  # text-to-image, the common case, has two passes to run side by side


@dataclass(frozen=True)
class Split:
    groups: int
    tp: int

    @property
    def workers(self) -> int:
        return self.groups * self.tp

    def group_of(self, rank: int) -> int | None:
        """The group worker `rank` belongs to; None where it sits BAGEL jobs out (N not a multiple of T)."""
        g = rank // self.tp
        return g if g < self.groups else None

    def __str__(self) -> str:
        return f"{self.groups}x{self.tp}"


def parse_split(text: str, workers: int) -> Split | None:
    """'auto' -> None (choose_split decides); 'GxT' -> G groups of T workers, checked against the pool's size."""
    text = text.strip().lower()
    if text == "auto":
        return None
    m = re.fullmatch(r"(\d+)\s*x\s*(\d+)", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ValueError(
            f"split: '{text}' is not valid; use 'auto' or GROUPSxTP, e.g. '2x2' (2 CFG groups of 2 tensor-parallel "
            "workers) or '1x4'."
        )
    split = Split(int(m[1]), int(m[2]))
    if split.workers > workers:
        raise ValueError(f"split: '{text}' needs {split.workers} workers; the pool has {workers}.")
    return split


def choose_split(
    workers: int,
    need_bytes: Callable[[int], int],
    free_bytes: list[int | None],
    max_groups: int = DEFAULT_MAX_GROUPS,
) -> Split:
    """The smallest tensor-parallel size whose worker's need (`need_bytes(tp)`: its shard and a step's working
    memory) fits every worker's free memory (None: a CPU worker, always fits), then as many groups of it as there
    are passes to share (max_groups) and workers for, each group as wide as the workers allow: more TP shortens
    every pass, more groups run passes side by side."""
    room = min((f for f in free_bytes if f is not None), default=None)
    for tp in range(1, workers + 1):
        if room is None or need_bytes(tp) <= room:
            groups = max(1, min(max_groups, workers // tp))
            return Split(groups, workers // groups)
    raise ValueError(
        f"BAGEL does not fit the pool: split over all {workers} worker(s) each needs "
        f"{need_bytes(workers) / GIB:.1f} GiB and the fullest device has {room / GIB:.1f} GiB free. "
        "Add devices to the pool, free memory on them, or store the weights in FP8 (weight_dtype fp8_e4m3fn)."
    )
