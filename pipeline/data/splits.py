"""The train/val/test split of source images: stratified per class, seeded, and grouped.

Near-copy groups (from dedup) go to one split as a whole, so no image is tested on after a
copy of it was trained on; `split_shares` says, per class, what was asked and what was made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.settings import SPLIT_OFF_POINTS, PrepareSettings
from pipeline.data import dedup


@dataclass
class SplitPlan:
    """Where each source image goes, and what report.json, the terminal and inspect say of it."""

    split_of: np.ndarray  # "train" | "val" | "test" per source image
    shares: dict  # report.json's split_shares: per class, asked and made
    near: list[dict]  # report.json's near_duplicate_groups
    warnings: list[str]  # classes a group pushed off their shares; near copies across classes


def plan_split(
    labels: np.ndarray,
    class_names: list[str],
    paths: list[str],
    phashes: np.ndarray,
    thumbnails_of: Callable[[np.ndarray], np.ndarray],
    s: PrepareSettings,
) -> SplitPlan:
    """Group the near copies among the source images (`dedup.near_copy_groups`: hashes, then
    the pixels of the candidates, `thumbnails_of(rows)`), split them per class with every
    group whole (`split_by_group`), and say per class what was asked and made
    (`split_shares`): a warning for a class a group pushed more than SPLIT_OFF_POINTS off,
    and one for near copies that sit in different classes. prepare runs it on what it
    decoded; inspect on the same, at prepare's defaults. `paths`: each source's relative path."""
    groups = dedup.near_copy_groups(phashes, thumbnails_of, s.near_duplicate_distance)
    split_of = split_by_group(labels, groups, s.test_size, s.val_size, s.seed, class_names)
    shares, warnings = split_shares(labels, groups, split_of, class_names, s.test_size, s.val_size, paths.__getitem__)
    near = near_duplicate_groups(groups, paths, [class_names[label] for label in labels.tolist()], split_of)
    if across := across_classes(near):
        warnings.append(
            f"{len(across)} group(s) of near copies sit in different classes: kept, each in one split; "
            "report.json's cross_class_near_copies lists them (audit shows them too)"
        )
    return SplitPlan(split_of, shares, near, warnings)


def split_by_group(
    labels: np.ndarray,
    groups: np.ndarray,
    test_size: float,
    val_size: float,
    seed: int,
    class_names: list[str],
) -> np.ndarray:
    """Stratified train/val/test split that never puts one group in two splits.

    scikit-learn has group-aware splitters (GroupShuffleSplit, StratifiedGroupKFold) but
    none that is stratified, grouped and takes fractions, hence this: per class, shuffle
    its groups with the seed and fill test, then val, then train, by image count, never
    overshooting a split's share by more than it would fall short without the group.
    """
    rng = np.random.default_rng(seed)
    group_ids, first = np.unique(groups, return_index=True)
    group_size = np.bincount(groups)
    group_label = labels[first]  # a group belongs to the class of its first image
    group_split = np.full(len(group_ids), "train", dtype=object)
    for label, name in enumerate(class_names):
        class_groups = rng.permutation(group_ids[group_label == label])
        total = int(group_size[class_groups].sum())
        wanted = _wanted(total, test_size, val_size)
        if total - wanted["test"] - wanted["val"] < 1:
            needed = 3 if val_size > 0 else 2
            raise PipelineError(
                f"class '{name}' has {total} usable image(s) (after duplicates); splitting into "
                f"{'train, val and test' if val_size > 0 else 'train and test'} needs at least {needed} per class: "
                "add images or lower --test-size/--val-size"
            )
        taken = {"test": 0, "val": 0}
        chosen = []
        for size in group_size[class_groups].tolist():  # plain ints: 10 million groups in seconds
            # A group joins test (then val) only if that lands nearer the wanted count than
            # leaving it out: one big near-duplicate group must not swell the test split.
            split = next((s for s in ("test", "val") if size - (wanted[s] - taken[s]) < wanted[s] - taken[s]), "train")
            if split != "train":
                taken[split] += size
            chosen.append(split)
        group_split[class_groups] = np.array(chosen, dtype=object)
        for split in ("test", "val"):  # every group too big: the smallest still goes, if train keeps one
            if wanted[split] and not taken[split]:
                in_train = class_groups[group_split[class_groups] == "train"]
                if len(in_train) > 1:
                    g = in_train[np.argmin(group_size[in_train])]  # the first of the smallest, as min() took
                    group_split[g], taken[split] = split, int(group_size[g])
        if not np.any(group_split[class_groups] == "train"):
            raise PipelineError(
                f"class '{name}': its near-duplicate groups leave no image for training; add distinct images"
            )
    return group_split[groups]


def _wanted(total: int, test_size: float, val_size: float) -> dict[str, int]:
    """The test and validation images a class of `total` asks for, one at least of each."""
    return {"test": max(1, round(total * test_size)), "val": max(1, round(total * val_size)) if val_size > 0 else 0}


def near_duplicate_groups(
    groups: np.ndarray, group_paths: list[str], group_classes: list[str], split_of: np.ndarray
) -> list[dict]:
    """The groups of two or more images, as report.json lists them: their paths, the class
    of each and their split."""
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    found = []
    for members in np.split(order, bounds):
        if len(members) > 1:
            found.append(
                {
                    "paths": [group_paths[m] for m in members],
                    "class_of": [group_classes[m] for m in members],
                    "split": str(split_of[members[0]]),
                }
            )
    return found


def across_classes(near_groups: list[dict]) -> list[dict]:
    """The near-copy groups whose pictures sit in different class folders: label conflicts
    for a person to look at (report.json's cross_class_near_copies; audit shows them). They
    are kept, in one split, where byte-identical conflicts are left out."""
    return [
        {**group, "classes": sorted(set(group["class_of"]))} for group in near_groups if len(set(group["class_of"])) > 1
    ]


def split_shares(
    labels: np.ndarray,
    groups: np.ndarray,
    split_of: np.ndarray,
    class_names: list[str],
    test_size: float,
    val_size: float,
    path_of,
) -> tuple[dict, list[str]]:
    """Per class, the split asked for and the split made (report.json's split_shares, the
    terminal and inspect show it), and a warning for each class more than SPLIT_OFF_POINTS
    points off, naming the near-copy group that forced it.

    A class too small for the fractions (3 images: one of each) is as close as it can be,
    not forced: it is warned about only where its images fell otherwise than one at a time.
    `path_of(i)` names source image i.
    """
    asked = {"train": round(1 - test_size - val_size, 6), "val": val_size, "test": test_size}
    group_size = np.bincount(groups)
    table: dict[str, dict] = {}
    warnings = []
    by_class = np.argsort(labels, kind="stable")  # each class's images, without a pass per class
    bounds = np.searchsorted(labels[by_class], np.arange(len(class_names) + 1))
    for label, name in enumerate(class_names):
        members = by_class[bounds[label] : bounds[label + 1]]
        total = len(members)
        images = {s: int(np.sum(split_of[members] == s)) for s in asked}
        made = {s: round(images[s] / total, 4) if total else 0.0 for s in asked}
        off = {s: abs(made[s] - asked[s]) * 100 for s in asked}
        table[name] = {"images": images, "made": made, "off_by": round(max(off.values()), 2)}
        one_at_a_time = _wanted(total, test_size, val_size)
        if max(off.values()) <= SPLIT_OFF_POINTS or all(images[s] == one_at_a_time[s] for s in one_at_a_time):
            continue
        worst = max(asked, key=lambda s: made[s] - asked[s])  # the split that got too many
        in_worst = members[split_of[members] == worst]
        biggest = in_worst[np.argmax(group_size[groups[in_worst]])] if len(in_worst) else None
        shares = ", ".join(f"{s} {made[s]:.0%} (asked {asked[s]:.0%})" for s in asked)
        cause = (
            f": its near-copy group of {int(group_size[groups[biggest]])} images (first: {path_of(_first_of(groups, groups[biggest]))}) "
            f"went whole to {worst}"
            if biggest is not None and group_size[groups[biggest]] > 1
            else ""
        )
        warnings.append(f"class '{name}' split {shares}{cause}")
    largest = int(group_size.max()) if len(group_size) else 0
    return {"asked": asked, "classes": table, "largest_group": largest}, warnings


def _first_of(groups: np.ndarray, group: int) -> int:
    return int(np.flatnonzero(groups == group)[0])


def audit_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The audit's fold (0..folds-1) of each source image: stratified by label, and a
    near-duplicate group (`groups`, one id per image) always within one fold, as it stays
    within one split; scikit-learn's StratifiedGroupKFold, shuffled with the seed."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(groups)) < folds:
        raise PipelineError(
            f"--folds {folds}: the data folder has only {len(np.unique(groups))} distinct images or "
            "near-duplicate groups; use fewer folds"
        )
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class smaller than the folds: it simply misses some
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            fold_of[held_out] = fold
    return fold_of
