"""split_items and fold_items: stratified per label, duplicate groups never straddle splits, the seed decides
everything; cross-validation folds test every item once."""

from collections import Counter, defaultdict

import pytest

from cxr_fast.data.split import SPLITS, fold_items, parse_fractions, split_items
from cxr_fast.errors import CxrFastError


def dataset_with_duplicates():
    """300 items: 150 Normal, 100 Pneumonia, 50 COVID-19; a few duplicate groups of 2-3 images."""
    labels, groups = [], []
    for label, count in [("Normal", 150), ("Pneumonia", 100), ("COVID-19", 50)]:
        for i in range(count):
            labels.append(label)
            # every 10th image starts a group that the next 1-3 images join
            groups.append(f"{label}-{i - i % 10 if i % 10 < 1 + (i // 10) % 3 else i}")
    return labels, groups


def test_fractions_per_label_within_two_points():
    labels, groups = dataset_with_duplicates()
    assert max(Counter(groups).values()) > 1
    splits = split_items(labels, groups, (0.6, 0.2, 0.2), seed=0)
    for label in set(labels):
        mine = [s for s, lab in zip(splits, labels, strict=True) if lab == label]
        for split, fraction in zip(SPLITS, (0.6, 0.2, 0.2), strict=True):
            assert abs(mine.count(split) / len(mine) - fraction) <= 0.02, (label, split)


def test_groups_are_never_split():
    labels, groups = dataset_with_duplicates()
    for seed in range(5):
        splits = split_items(labels, groups, seed=seed)
        split_of_group = defaultdict(set)
        for group, split in zip(groups, splits, strict=True):
            split_of_group[group].add(split)
        assert all(len(found) == 1 for found in split_of_group.values())


def test_seed_determines_the_split():
    labels, groups = dataset_with_duplicates()
    first = split_items(labels, groups, seed=3)
    assert split_items(labels, groups, seed=3) == first
    assert split_items(labels, groups, seed=4) != first
    assert set(first) == set(SPLITS)


def test_other_fractions_and_empty_test_split():
    labels = ["A"] * 100 + ["B"] * 40
    groups = list(range(140))
    splits = split_items(labels, groups, (0.8, 0.2, 0.0))
    assert Counter(splits) == {"train": 112, "valid": 28}
    splits = split_items(labels, groups, "70,15,15")
    assert Counter(s for s, lab in zip(splits, labels, strict=True) if lab == "A") == {
        "train": 70,
        "valid": 15,
        "test": 15,
    }


def test_tiny_classes_fill_train_first():
    splits = split_items(["rare", "rare", "rare", "common"], [1, 2, 3, 4])
    assert Counter(splits[:3]) == {"train": 2, "valid": 1}
    assert splits[3] == "train"


@pytest.mark.parametrize(
    "fractions, message",
    [
        ((0.5, 0.5), "three numbers"),
        ((0.7, 0.2, 0.2), "add up to 1"),
        ((1.2, -0.1, -0.1), "negative"),
        ((0.0, 0.5, 0.5), "train fraction"),
        ("100,0,0", "valid fraction"),
        ("0.6;0.2;0.2", "three numbers"),
        ("nan,nan,nan", "finite"),  # NaN passed every comparison: all images went to train
        ("inf,0.2,0.2", "finite"),
    ],
)
def test_bad_fractions(fractions, message):
    with pytest.raises(CxrFastError, match=message):
        parse_fractions(fractions)


def test_fraction_text():
    assert parse_fractions("0.6,0.2,0.2") == (0.6, 0.2, 0.2)
    assert parse_fractions("60/20/20") == (0.6, 0.2, 0.2)


def test_adding_a_class_leaves_the_others_alone():
    labels = ["B"] * 30 + ["C"] * 30
    before = split_items(labels, list(range(60)), seed=7)
    after = split_items(["A"] * 10 + labels, list(range(70)), seed=7)
    assert after[10:] == before


def test_folds_test_every_item_once_and_keep_groups_together():
    labels, groups = dataset_with_duplicates()
    folds = [fold_items(labels, groups, 5, fold, seed=1) for fold in range(5)]
    tested = Counter(i for splits in folds for i, split in enumerate(splits) if split == "test")
    assert sorted(tested) == list(range(len(labels))) and set(tested.values()) == {1}
    for fold, splits in enumerate(folds):
        # the next fold's test part is this fold's valid part
        assert [s == "valid" for s in splits] == [s == "test" for s in folds[(fold + 1) % 5]]
        for label in set(labels):
            mine = [s for s, lab in zip(splits, labels, strict=True) if lab == label]
            assert abs(mine.count("test") / len(mine) - 0.2) <= 0.04, (fold, label)
            assert abs(mine.count("train") / len(mine) - 0.6) <= 0.04, (fold, label)
        split_of_group = defaultdict(set)
        for group, split in zip(groups, splits, strict=True):
            split_of_group[group].add(split)
        assert all(len(found) == 1 for found in split_of_group.values())
    assert fold_items(labels, groups, 5, 0, seed=2) != folds[0]


@pytest.mark.parametrize("folds, fold, message", [(2, 0, "at least 3"), (5, 5, "between 0 and 4"), (5, -1, "between")])
def test_bad_folds(folds, fold, message):
    with pytest.raises(CxrFastError, match=message):
        fold_items(["A"] * 10, list(range(10)), folds, fold)


def test_spread_ties_keeps_many_small_strata_from_starving_test():
    # 10 sites x 3 labels x 12 images: the spare image of every stratum went to valid (90 valid, 60 test)
    strata = [f"{label} @ {site}" for site in range(10) for label in "ABC" for _ in range(12)]
    singletons = list(range(len(strata)))
    assert Counter(split_items(strata, singletons)) == {"train": 210, "valid": 90, "test": 60}  # the default kept
    spread = split_items(strata, singletons, spread_ties=True)
    assert Counter(spread) == {"train": 210, "valid": 75, "test": 75}
    for stratum in set(strata):  # and every stratum is still within one image of its own targets
        counts = Counter(split for split, s in zip(spread, strata, strict=True) if s == stratum)
        assert counts["train"] == 7 and sorted([counts["valid"], counts["test"]]) == [2, 3]


def test_a_large_group_is_placed_first_so_every_split_meets_its_target():
    # 10 images: one group of 4 and 6 singletons, at 0.6/0.2/0.2. Placed first, the group fills 4 of train's 6
    # and the singletons make 6/2/2 exactly; placed after singletons had filled train, it overshot a split by 2-3.
    labels = ["A"] * 10
    groups = ["big"] * 4 + list(range(6))
    for seed in range(10):
        splits = split_items(labels, groups, seed=seed)
        assert Counter(splits) == {"train": 6, "valid": 2, "test": 2}, seed
        assert set(splits[:4]) == {"train"}, seed


def test_a_group_of_mixed_labels_counts_towards_its_most_common_label():
    # group g: three A images and one B. It belongs to A's stratum, which then holds 10 images and splits 6/2/2
    # (the group in train); B's ten singletons split 6/2/2 on their own.
    labels = ["A", "A", "A", "B"] + ["A"] * 6 + ["B"] * 10
    groups = ["g"] * 4 + [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(10)]
    for seed in range(5):
        splits = split_items(labels, groups, seed=seed)
        stratum_a = Counter(splits[:10])
        stratum_b = Counter(splits[10:])
        assert stratum_a == {"train": 6, "valid": 2, "test": 2}, seed
        assert stratum_b == {"train": 6, "valid": 2, "test": 2}, seed
