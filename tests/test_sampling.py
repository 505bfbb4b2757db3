"""The batch order is a deterministic function of (seed, epoch); grouping by length cuts padding."""

from __future__ import annotations

import random

from post_training.data_sft.sampling import epoch_batches


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_epoch_batches_are_deterministic_disjoint_and_full() -> None:
    lengths = [random.Random(0).randint(5, 90) for _ in range(1000)]
    for group in (False, True):
        a = epoch_batches(lengths, 32, seed=3, epoch=1, group_by_length=group)
        assert a == epoch_batches(lengths, 32, seed=3, epoch=1, group_by_length=group)
        assert a != epoch_batches(lengths, 32, seed=3, epoch=2, group_by_length=group)
        flat = [i for b in a for i in b]
        assert len(a) == 1000 // 32 and all(len(b) == 32 for b in a)
        assert len(set(flat)) == len(flat)


def test_group_by_length_reduces_padding_and_keeps_the_same_examples() -> None:
    rng = random.Random(1)
    lengths = [int(rng.lognormvariate(3.3, 0.5)) + 1 for _ in range(4096)]
    plain = epoch_batches(lengths, 32, seed=0, epoch=0)
    grouped = epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in plain for i in b) == sorted(i for b in grouped for i in b)
    assert padded_tokens(grouped, lengths) < 0.8 * padded_tokens(plain, lengths)
