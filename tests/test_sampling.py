"""The training sampler's aspect-ratio grouping: batches of one orientation, nothing lost, resumable."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from detrkit.data import CocoDetection
from detrkit.engine.sampling import EpochSampler, aspect_ratio_groups


def _sampler(groups, batch_size=4, **kwargs):
    return EpochSampler(len(groups), shuffle=True, seed=3, groups=groups, batch_size=batch_size, **kwargs)


def test_full_batches_come_from_one_group_and_no_sample_is_lost():
    groups = [int(i % 3 == 0) for i in range(50)]  # 17 portrait, 33 landscape, interleaved
    for epoch in range(3):
        sampler = _sampler(groups)
        sampler.set_epoch(epoch)
        order = list(sampler)
        plain = EpochSampler(len(groups), shuffle=True, seed=3)
        plain.set_epoch(epoch)
        assert Counter(order) == Counter(plain)  # a rearrangement of the same permutation
        full = len(order) // 4 * 4
        mixed = [b for b in range(0, full, 4) if len({groups[i] for i in order[b : b + 4]}) > 1]
        # at most one bucket per group can be left over, and only the leftovers (at the end) may mix
        assert all(b >= full - 4 * 2 for b in mixed)
        plain_mixed = sum(len({groups[i] for i in list(plain)[b : b + 4]}) > 1 for b in range(0, full, 4))
        assert len(mixed) < plain_mixed


def test_one_group_keeps_the_ungrouped_order_and_skip_resumes():
    sampler, plain = _sampler([0] * 20), EpochSampler(20, shuffle=True, seed=3)
    sampler.set_epoch(1)
    plain.set_epoch(1)
    assert list(sampler) == list(plain)
    grouped = _sampler([i % 2 for i in range(20)])
    grouped.set_epoch(2)
    whole = list(grouped)
    grouped.set_epoch(2, skip=8)
    assert list(grouped) == whole[8:]


def test_shards_of_a_padded_split_cover_every_sample():
    groups = [i % 2 for i in range(11)]
    shares = []
    for rank in range(2):
        s = _sampler(groups, batch_size=2, rank=rank, world_size=2)
        plain = EpochSampler(11, shuffle=True, seed=3, rank=rank, world_size=2)
        assert Counter(s) == Counter(plain)  # the padding duplicate stays where DistributedSampler puts it
        shares.append(list(s))
    assert len(shares[0]) == len(shares[1]) == 6
    assert set(shares[0]) | set(shares[1]) == set(range(11))


def test_groups_must_fit_the_dataset():
    with pytest.raises(ValueError, match="groups has 3 entries for 4 samples"):
        EpochSampler(4, shuffle=True, seed=0, groups=[0, 1, 0], batch_size=2)


def test_groups_from_a_coco_dataset_read_no_pixels(tmp_path: Path):
    images = []
    for i, (w, h) in enumerate([(40, 30), (30, 40), (50, 50)], start=1):
        Image.new("RGB", (w, h)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    dataset = CocoDetection(tmp_path, ann)
    assert aspect_ratio_groups(dataset) == [0, 1, 0]
    assert aspect_ratio_groups(list(range(3))) is None  # no sizes: no grouping
