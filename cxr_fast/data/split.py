"""Stratified, group-aware, seeded train/valid/test split.

- Group-aware: all members of a duplicate group land in one split, so no image is tested on a copy of
  itself that the model trained on.
- Stratified: each label is split on its own, so the rare class (COVID-19) gets its share of every split
  instead of whatever a global shuffle leaves it.
- Seeded: the same items, labels, groups and seed always give the same split.

Within a label, groups are shuffled by the seed, then taken largest first and each is given to the split
furthest below its target count. Singletons then fill the gaps, so each split ends within one image of its
target unless one group is bigger than a whole split. A group that fits two splits equally well goes to the
earlier one, so each label's spare image goes to valid rather than test: one image per label, which adds up over
many strata (labels x sites: 10 sites of 36 images put 90 in valid and 60 in test). With ``spread_ties`` (what
`prepare --sites` uses) it goes to the split furthest below its share of all strata placed so far instead (75 and
75). It is not the default because it changes the split of every existing dataset (most ties are broken
differently, and the choices cascade), and a manifest prepared again must keep its split.

Cross-validation (`fold_items`) cuts the items into k equal parts the same way and names one part test, the
next valid and the rest train.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from cxr_fast.errors import CxrFastError

SPLITS = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def parse_fractions(fractions: Sequence[float] | str) -> tuple[float, float, float]:
    """Validate split fractions given as three numbers or text like "0.6,0.2,0.2" (or "60,20,20")."""
    if isinstance(fractions, str):
        try:
            values = [float(part) for part in fractions.replace("/", ",").split(",") if part.strip()]
        except ValueError:
            raise CxrFastError(
                f"split fractions {fractions!r}: expected three numbers like 0.6,0.2,0.2"
            ) from None
    else:
        values = [float(value) for value in fractions]
    if len(values) != 3:
        raise CxrFastError(f"split fractions {fractions!r}: expected three numbers (train, valid, test)")
    if not all(math.isfinite(value) for value in values):
        raise CxrFastError(f"split fractions {fractions!r}: must be finite numbers")
    if any(value < 0 for value in values):
        raise CxrFastError(f"split fractions {fractions!r}: must not be negative")
    total = sum(values)
    if 99 <= total <= 101:  # percentages
        values, total = [value / 100 for value in values], total / 100
    if abs(total - 1.0) > 1e-6:
        raise CxrFastError(f"split fractions {fractions!r}: must add up to 1 (they add up to {total:g})")
    if values[0] <= 0:
        raise CxrFastError(f"split fractions {fractions!r}: the train fraction must be above 0")
    if values[1] <= 0:  # test may be 0 (a separate collection tests the model); valid may not
        raise CxrFastError(f"split fractions {fractions!r}: the valid fraction must be above 0 (training keeps "
                           f"the epoch and fits the temperature on valid)")
    return values[0], values[1], values[2]


def split_items(
    labels: Sequence[str],
    groups: Sequence[object],
    fractions: Sequence[float] | str = DEFAULT_FRACTIONS,
    seed: int = 0,
    spread_ties: bool = False,
) -> list[str]:
    """The split name ("train", "valid" or "test") of every item.

    ``groups``: any hashable id per item; items sharing one are kept together. A group whose members carry
    different labels is placed with its most common label (`prepare` removes such groups beforehand).
    ``spread_ties``: see the module docstring; for many small strata.
    """
    parts = _assign_parts(labels, groups, np.asarray(parse_fractions(fractions)), seed, spread_ties)
    return [SPLITS[part] for part in parts]


def fold_items(labels: Sequence[str], groups: Sequence[object], folds: int, fold: int, seed: int = 0,
               spread_ties: bool = False) -> list[str]:
    """Cross-validation: the items cut into ``folds`` equal parts, stratified and group-aware like `split_items`;
    part ``fold`` is the test split, the next part (cyclically) the valid split and the rest train.

    Preparing every ``fold`` from 0 to ``folds`` - 1 with one seed tests each item exactly once.
    """
    check_folds(folds, fold)
    parts = _assign_parts(labels, groups, np.full(folds, 1.0 / folds), seed, spread_ties)
    return ["test" if part == fold else "valid" if part == (fold + 1) % folds else "train" for part in parts]


def check_folds(folds: int, fold: int) -> None:
    if folds < 3:
        raise CxrFastError(f"folds must be at least 3 (one each for train, valid and test), got {folds}")
    if not 0 <= fold < folds:
        raise CxrFastError(f"fold must be between 0 and {folds - 1} for {folds} folds, got {fold}")


def _assign_parts(labels: Sequence[str], groups: Sequence[object], fractions: np.ndarray, seed: int,
                  spread_ties: bool = False) -> list[int]:
    """The part (an index into ``fractions``) of every item; see the module's docstring for how."""
    if len(labels) != len(groups):
        raise ValueError("labels and groups must have the same length")

    members: dict[object, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    groups_of_label: dict[str, list[object]] = defaultdict(list)
    for group, indices in members.items():
        counts = Counter(labels[i] for i in indices)
        # Majority label; ties go to the alphabetically first so the result does not depend on dict order.
        label = min(counts, key=lambda name: (-counts[name], name))
        groups_of_label[label].append(group)

    assignment: list[int] = [-1] * len(labels)
    placed = np.zeros(len(fractions))  # images of every label so far, per part: breaks ties (below)
    for label in sorted(groups_of_label):
        label_groups = sorted(groups_of_label[label], key=lambda group: min(members[group]))
        # One generator per label, seeded by (seed, label name): adding a class does not reshuffle the others.
        rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
        order = rng.permutation(len(label_groups))
        shuffled = [label_groups[k] for k in order]
        shuffled.sort(key=lambda group: -len(members[group]))  # stable: equal sizes keep the random order
        total = sum(len(members[group]) for group in shuffled)
        targets = fractions * total
        filled = np.zeros(len(fractions))
        for group in shuffled:
            size = len(members[group])
            # The part whose distance to its target shrinks most (or grows least) by taking this group;
            # ties go to the earlier part (for a split: train, then valid, then test). A part with fraction 0
            # gets nothing.
            gap_after = np.where(
                fractions > 0, np.abs(targets - filled - size) - np.abs(targets - filled), np.inf
            )
            if spread_ties:
                # Ties (12 images at 0.6/0.2/0.2: the last fits valid and test alike) go to the part furthest below
                # its share of all strata so far. The earlier part took them all, and over many strata (labels x
                # sites) test fell well short of its target.
                tied = np.flatnonzero(gap_after <= gap_after.min() + 1e-9)
                chosen = int(tied[np.argmax(fractions[tied] * (placed.sum() + size) - placed[tied])])
            else:
                chosen = int(np.argmin(gap_after))  # ties: the earlier part
            filled[chosen] += size
            placed[chosen] += size
            for index in members[group]:
                assignment[index] = chosen
    return assignment
