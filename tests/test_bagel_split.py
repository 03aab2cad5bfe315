"""How a pool's workers divide into CFG groups × tensor parallel (bagel/split.py): the parser and the automatic
choice, checked against the rule stated as properties over every small case."""

import functools
import itertools

import pytest

from bagel_vae_pp.bagel.split import GIB, Split, choose_split, parse_split

WORK = 2 * GIB  # a step's working memory, added to each shard below


class TestParse:
    @pytest.mark.parametrize(
        "text, want",
        [("auto", None), (" AUTO ", None), ("2x2", Split(2, 2)), ("1x4", Split(1, 4)), ("3 x 1", Split(3, 1))],
    )
    def test_valid(self, text, want):
        assert parse_split(text, 4) == want

    @pytest.mark.parametrize("text", ["", "2", "2x", "x2", "0x2", "2x0", "two", "2*2", "-1x2"])
    def test_malformed_names_the_input_and_the_forms(self, text):
        with pytest.raises(ValueError, match=r"split: .* use 'auto' or GROUPSxTP"):
            parse_split(text, 4)

    def test_more_workers_than_the_pool_has(self):
        with pytest.raises(ValueError, match="split: '3x2' needs 6 workers; the pool has 4"):
            parse_split("3x2", 4)

    def test_group_of_each_rank(self):
        split = Split(2, 3)
        assert [split.group_of(r) for r in range(7)] == [0, 0, 0, 1, 1, 1, None]
        assert str(split) == "2x3" and split.workers == 6


def fits(shard, room, tp):
    return room is None or shard(tp) <= room


class TestChoose:
    def test_every_small_case_satisfies_the_rule(self):
        """Fits; at most max_groups; no fitting split with more groups; the widest groups for that many groups."""
        cases = itertools.product(range(1, 9), (1, 2, 3), (8, 20, 40), range(3, 44, 4))
        for workers, max_groups, total, room_gib in cases:
            shard = functools.partial(lambda total, tp: total * GIB // tp + WORK, total)
            room = room_gib * GIB
            if not any(fits(shard, room, tp) for tp in range(1, workers + 1)):
                with pytest.raises(ValueError, match="BAGEL does not fit the pool"):
                    choose_split(workers, shard, [room], max_groups)
                continue
            got = choose_split(workers, shard, [room, None, room + GIB], max_groups)
            case = (workers, max_groups, total, room_gib, got)
            assert got.workers <= workers and 1 <= got.groups <= max_groups and fits(shard, room, got.tp), case
            wider = range(got.groups + 1, min(max_groups, workers) + 1)
            assert not [g for g in wider if fits(shard, room, workers // g)], case
            assert got.tp == workers // got.groups, case

    def test_cpu_workers_always_fit(self):
        assert choose_split(4, lambda tp: 10**15, [None] * 4) == Split(2, 2)
        assert choose_split(3, lambda tp: 10**15, [None] * 3, max_groups=3) == Split(3, 1)

    def test_the_fullest_device_decides(self):
        shard = lambda tp: 28 * GIB // tp + WORK  # noqa: E731
        assert choose_split(4, shard, [80 * GIB] * 4) == Split(2, 2)
        assert choose_split(4, shard, [80 * GIB] * 3 + [20 * GIB]) == Split(2, 2)  # TP 2: 14 + 2 GiB fit
        assert choose_split(4, shard, [80 * GIB] * 3 + [12 * GIB]) == Split(1, 4)  # TP 3 at least: one group

    def test_refusal_says_what_is_needed_and_free(self):
        with pytest.raises(ValueError, match=r"each needs 9\.0 GiB and the fullest device has 8\.0 GiB free"):
            choose_split(4, lambda tp: 28 * GIB // tp + WORK, [8 * GIB, 30 * GIB])


def test_workers_make_a_process_group_for_every_group_a_split_or_a_vae_job_uses():
    """A sealed gloo group takes no new connections, so the workers make them all at start (worker.group_blocks):
    each TP group of every split the pool's size allows, and each prefix of ranks (a VAE job's bands)."""
    from bagel_vae_pp.worker import group_blocks

    assert group_blocks(1) == group_blocks(2) == []  # one rank needs no group; two use the whole world's
    for world in range(2, 9):
        made = set(group_blocks(world)) | {(0, world)}
        assert len(made) == len(group_blocks(world)) + 1, world  # each made once
        needed = {(g * tp, tp) for tp in range(2, world + 1) for g in range(world // tp)}
        assert needed | {(0, k) for k in range(2, world + 1)} == made, world
