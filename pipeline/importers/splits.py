"""Which seed images are train and which test, and which part of a large set is kept."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from dextra.pipeline.importers.records import Record
from dextra.pipeline.manifest import Subset


def stratified_split(keys: list[str], classes: list[str | None], fraction: float, seed: int) -> dict[str, str]:
    """train/test per key: round(fraction * n) test keys (at least one, and one train key), shared out among
    classes by largest remainder so every class keeps its share, picked at random within each class."""
    groups: dict[str | None, list[str]] = defaultdict(list)
    for key, cls in zip(keys, classes):
        groups[cls].append(key)
    order = sorted(groups, key=lambda c: (c is None, c or ""))
    n = len(keys)
    n_test = min(max(round(n * fraction), 1), n - 1) if n > 1 else 0
    ideal = {c: len(groups[c]) * n_test / max(n, 1) for c in order}
    quota = {c: int(ideal[c]) for c in order}
    for c in sorted(order, key=lambda c: quota[c] - ideal[c])[: n_test - sum(quota.values())]:
        quota[c] += 1
    rng = np.random.default_rng([seed, 4])
    test = set()
    for c in order:
        members = sorted(groups[c])
        test.update(members[j] for j in rng.permutation(len(members))[: quota[c]])
    return {key: "test" if key in test else "train" for key in keys}


def split_unassigned(records: list[Record], fraction: float, seed: int) -> list[Record]:
    """Give the records that have no split one, by stratified_split over them alone."""
    open_ = [r for r in records if r.split is None]
    chosen = stratified_split([r.key for r in open_], [r.cls for r in open_], fraction, seed)
    return [r if r.split else dataclasses.replace(r, split=chosen[r.key]) for r in records]


def take_subset(records: list[Record], subset: Subset | None) -> list[Record]:
    """At most subset.train / subset.test records of each split, drawn at random with subset.seed. The draw is a
    prefix of one permutation of the sorted keys, so a larger size keeps every record of a smaller one."""
    if subset is None:
        return records
    kept = set()
    for split, size in (("train", subset.train), ("test", subset.test)):
        keys = sorted(r.key for r in records if r.split == split)
        if size is None or size >= len(keys):
            kept.update(keys)
            continue
        order = np.random.default_rng([subset.seed, 7]).permutation(len(keys))
        kept.update(keys[i] for i in order[:size])
    return [r for r in records if r.key in kept]
