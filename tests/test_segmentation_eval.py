"""Segmentation: mask losses, instance/panoptic/semantic post-processing, RLE, mask AP and panoptic quality.

Each result is checked against an independent computation: the criterion's mask losses against a per-mask
brute force (and the reference's layout), post-processing against hand-made logits whose output is known
exactly, mask AP against pycocotools' ``COCOeval(iouType="segm")``, and PQ against a plain NumPy rendition of
panopticapi's ``pq_compute`` rules written here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from detrkit.cli import main
from detrkit.config import LossConfig
from detrkit.criterion import SetCriterion
from detrkit.engine.builders import build_criterion
from detrkit.evaluation import (
    COCO_METRIC_KEYS,
    PANOPTIC_METRIC_KEYS,
    CocoEvaluator,
    CocoImages,
    PanopticEvaluator,
    evaluate_model,
    evaluate_panoptic,
    evaluate_results_file,
    masks_to_rle,
)
from detrkit.labels import LabelMap
from detrkit.postprocess import postprocess, postprocess_instances, postprocess_panoptic, postprocess_semantic

mask_utils = pytest.importorskip("pycocotools.mask")
COCO = pytest.importorskip("pycocotools.coco").COCO
COCOeval = pytest.importorskip("pycocotools.cocoeval").COCOeval


# ------------------------------------------------------------------------------------------------------------
# Criterion: loss_mask and loss_dice


class FixedMatcher(nn.Module):
    """Returns the given matching whatever the outputs (the mask losses are tested, not the matching)."""

    def __init__(self, indices: list[tuple[list[int], list[int]]]) -> None:
        super().__init__()
        self.indices = [(torch.tensor(p, dtype=torch.int64), torch.tensor(t, dtype=torch.int64)) for p, t in indices]

    def forward(self, outputs, targets):
        return self.indices


def _targets(sizes: list[tuple[int, int, int]], generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Per image (N, H, W): N objects with random boxes and random masks at (H, W)."""
    targets = []
    for n, h, w in sizes:
        boxes = torch.rand(n, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.25
        targets.append(
            {
                "labels": torch.randint(0, 3, (n,), generator=generator),
                "boxes": boxes,
                "masks": torch.rand(n, h, w, generator=generator) > 0.6,
            }
        )
    return targets


def _outputs(batch: int, queries: int, h: int, w: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "pred_logits": torch.randn(batch, queries, 4, generator=generator, dtype=torch.float64),
        "pred_boxes": torch.rand(batch, queries, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.25,
        "pred_masks": (torch.randn(batch, queries, h, w, generator=generator, dtype=torch.float64) * 3),
    }


def brute_force_mask_losses(pred_masks, targets, indices, num_boxes) -> tuple[float, float]:
    """One matched pair at a time: the prediction upsampled 4x and cropped, the target zero-padded to the batch's
    largest, then the two formulas written out pixel-wise."""
    height = max(t["masks"].shape[1] for t in targets)
    width = max(t["masks"].shape[2] for t in targets)
    focal_total, dice_total = 0.0, 0.0
    for b, (queries, objects) in enumerate(indices):
        for q, j in zip(queries, objects, strict=True):
            x = F.interpolate(pred_masks[b, q][None, None], scale_factor=4, mode="bilinear", align_corners=False)
            x = x[0, 0, :height, :width]
            mask = targets[b]["masks"][j]
            t = torch.zeros(height, width, dtype=torch.float64)
            t[: mask.shape[0], : mask.shape[1]] = mask.double()
            p = torch.sigmoid(x)
            ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
            p_t = torch.where(t == 1, p, 1 - p)
            alpha_t = torch.where(t == 1, 0.25, 0.75)
            focal_total += float((alpha_t * (1 - p_t) ** 2 * ce).mean())
            dice_total += float(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    return focal_total / num_boxes, dice_total / num_boxes


def test_mask_losses_equal_a_brute_force_per_mask() -> None:
    g = torch.Generator().manual_seed(0)
    # Targets of different sizes, none as large as the padded input (4h x 4w = 24 x 32).
    targets = _targets([(3, 21, 30), (2, 17, 26), (0, 19, 22)], g)
    indices = [([4, 0, 2], [1, 2, 0]), ([3, 1], [0, 1]), ([], [])]
    outputs = _outputs(3, 5, 6, 8, g)
    outputs["pred_masks"].requires_grad_(True)
    criterion = SetCriterion(num_classes=3, matcher=FixedMatcher(indices), mask_loss=True, weight_mask=3, weight_dice=7)
    losses = criterion(outputs, targets)
    focal, dice = brute_force_mask_losses(outputs["pred_masks"].detach(), targets, indices, num_boxes=5.0)
    assert losses["loss_mask"].item() == pytest.approx(focal, rel=1e-12)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-12)

    # The total is the box losses plus the weighted mask terms; the detection terms are unchanged.
    plain = SetCriterion(num_classes=3, matcher=FixedMatcher(indices))(outputs, targets)
    assert "loss_mask" not in plain  # mask_loss=False ignores pred_masks
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert torch.equal(losses[key], plain[key])
    expected = plain["loss"] + 3 * losses["loss_mask"] + 7 * losses["loss_dice"]
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-12, atol=0)

    losses["loss"].backward()
    grad = outputs["pred_masks"].grad
    assert torch.isfinite(grad).all()
    assert grad[0, [0, 2, 4]].abs().sum(dim=(1, 2)).gt(0).all()  # matched queries learn
    assert grad[2].abs().sum() == 0 and grad[0, [1, 3]].abs().sum() == 0  # unmatched ones get nothing from masks
    assert "mask_loss=True" in repr(criterion) and "weight_dice=7.0" in repr(criterion)


def reference_layout_losses(pred_masks, targets, indices, num_boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """The official loss_masks' steps: targets padded to the batch max, predictions interpolated straight to it."""
    height = max(t["masks"].shape[1] for t in targets)
    width = max(t["masks"].shape[2] for t in targets)
    padded = torch.zeros(len(targets), max(len(t["masks"]) for t in targets), height, width, dtype=torch.float64)
    for b, t in enumerate(targets):
        padded[b, : len(t["masks"]), : t["masks"].shape[1], : t["masks"].shape[2]] = t["masks"].double()
    src = torch.cat([pred_masks[b, torch.tensor(q, dtype=torch.long)] for b, (q, _) in enumerate(indices)])
    tgt = torch.cat([padded[b, torch.tensor(j, dtype=torch.long)] for b, (_, j) in enumerate(indices)])
    src = F.interpolate(src[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    tgt = tgt.flatten(1)
    prob = src.sigmoid()
    ce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none")
    p_t = prob * tgt + (1 - prob) * (1 - tgt)
    focal = (0.25 * tgt + 0.75 * (1 - tgt)) * ce * (1 - p_t) ** 2
    dice = 1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)
    return focal.mean(1).sum() / num_boxes, dice.sum() / num_boxes


def test_mask_losses_are_the_references_when_the_largest_target_fills_the_input() -> None:
    g = torch.Generator().manual_seed(1)
    targets = _targets([(2, 24, 20), (3, 16, 32)], g)  # batch max 24 x 32 = 4 x (6, 8): no extra padding
    indices = [([1, 3], [1, 0]), ([0, 2, 4], [2, 0, 1])]
    outputs = _outputs(2, 5, 6, 8, g)
    losses = SetCriterion(num_classes=3, matcher=FixedMatcher(indices), mask_loss=True)(outputs, targets)
    focal, dice = reference_layout_losses(outputs["pred_masks"], targets, indices, num_boxes=5.0)
    torch.testing.assert_close(losses["loss_mask"], focal, rtol=1e-12, atol=0)
    torch.testing.assert_close(losses["loss_dice"], dice, rtol=1e-12, atol=0)


def test_mask_losses_use_the_box_normaliser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Distributed runs divide by num_boxes averaged over processes: the mask terms by the same number."""
    g = torch.Generator().manual_seed(2)
    targets = _targets([(2, 20, 20), (1, 12, 16)], g)
    indices = [([0, 1], [0, 1]), ([2], [0])]
    outputs = _outputs(2, 3, 5, 5, g)
    criterion = SetCriterion(num_classes=3, matcher=FixedMatcher(indices), mask_loss=True)
    local = criterion(outputs, targets)
    monkeypatch.setattr(SetCriterion, "_num_boxes", staticmethod(lambda targets, device: 7.5))
    averaged = criterion(outputs, targets)
    for key in ("loss_mask", "loss_dice", "loss_bbox"):
        torch.testing.assert_close(averaged[key] * 7.5, local[key] * 3.0, rtol=1e-12, atol=0)


def test_mask_losses_empty_batch_and_float32() -> None:
    g = torch.Generator().manual_seed(3)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    outputs = {k: v.float() for k, v in _outputs(2, 3, 4, 4, g).items()}
    outputs["pred_masks"].requires_grad_(True)
    losses = SetCriterion(num_classes=3, matcher=FixedMatcher([([], []), ([], [])]), mask_loss=True)(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    losses["loss"].backward()  # still connected to the graph
    assert torch.isfinite(losses["loss"])


def test_mask_loss_errors() -> None:
    g = torch.Generator().manual_seed(4)
    targets = _targets([(2, 20, 20)], g)
    outputs = _outputs(1, 3, 5, 5, g)
    criterion = SetCriterion(num_classes=3, matcher=FixedMatcher([([0, 1], [0, 1])]), mask_loss=True)
    with pytest.raises(ValueError, match="pred_masks"):
        criterion({k: v for k, v in outputs.items() if k != "pred_masks"}, targets)
    with pytest.raises(ValueError, match="no 'masks'"):
        criterion(outputs, [{k: v for k, v in targets[0].items() if k != "masks"}])
    with pytest.raises(ValueError, match=r"masks \(N, H, W\) with N = 2"):
        criterion(outputs, [{**targets[0], "masks": targets[0]["masks"][:1]}])
    with pytest.raises(ValueError, match="do not fit"):
        criterion(outputs, [{**targets[0], "masks": torch.zeros(2, 24, 20, dtype=torch.bool)}])


def test_loss_config_and_build_criterion() -> None:
    assert (LossConfig().weight_mask, LossConfig().weight_dice) == (1.0, 1.0)
    with pytest.raises(ValueError, match="weight_mask"):
        LossConfig(weight_mask=-1.0)
    with pytest.raises(ValueError, match="weight_dice"):
        LossConfig(weight_dice=float("nan"))
    loss = LossConfig(weight_mask=2.0, weight_dice=4.0)
    with_masks = build_criterion(SimpleNamespace(loss=loss, model=SimpleNamespace(focal=False, masks=True)), 3)
    assert with_masks.mask_loss and with_masks.mask_weights == {"loss_mask": 2.0, "loss_dice": 4.0}
    # A model config without the field (or masks=False) trains no mask loss.
    assert not build_criterion(SimpleNamespace(loss=loss, model=SimpleNamespace(focal=True)), 3).mask_loss


# ------------------------------------------------------------------------------------------------------------
# Post-processing


def test_postprocess_instances_hand_made() -> None:
    label_map = LabelMap((3, 7), ("a", "b"))
    logits = torch.tensor([[[5.0, 0, 0], [0, 4, 0], [0, 0, 5]]])  # (1, 3, K+1): the last query is no-object
    masks = torch.full((1, 3, 2, 3), -10.0)
    masks[0, 0, 0, 0] = 10  # top-left 4x4 block of the 8x12 padded input
    masks[0, 1, 1, :] = 10  # the bottom row of blocks (rows 4-7)
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((1, 3, 4), 0.5), "pred_masks": masks}
    sizes = {"orig_sizes": torch.tensor([[3, 5]]), "image_sizes": torch.tensor([[6, 10]])}
    (result,) = postprocess_instances(outputs, **sizes, label_map=label_map, threshold=0.5)
    (boxes_only,) = postprocess(outputs, sizes["orig_sizes"], label_map=label_map, threshold=0.5)
    for key in ("scores", "labels", "boxes"):
        assert torch.equal(result[key], boxes_only[key])
    assert result["labels"].tolist() == [3, 7]
    # 8x12 padded, 6x10 valid, 3x5 original: nearest sampling takes rows 0, 2, 4 and columns 0, 2, 4, 6, 8.
    expected0 = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    expected1 = torch.zeros(3, 5, dtype=torch.bool)
    expected1[2, :] = True
    assert result["masks"].dtype == torch.bool
    assert torch.equal(result["masks"], torch.stack([expected0, expected1]))

    # Focal: one query may give two detections; they share its mask.
    focal_logits = torch.tensor([[[3.0, 2.0], [-9.0, -9.0], [-9.0, -9.0]]])
    (focal,) = postprocess_instances(
        {**outputs, "pred_logits": focal_logits}, **sizes, label_map=label_map, threshold=0.5, focal=True
    )
    assert focal["labels"].tolist() == [3, 7] and torch.equal(focal["masks"][0], focal["masks"][1])
    (empty,) = postprocess_instances(outputs, **sizes, label_map=label_map, threshold=0.999)
    assert empty["masks"].shape == (0, 3, 5)


def reference_instance_masks(pred_masks, query_idx, image_sizes, orig_sizes) -> list[torch.Tensor]:
    """PostProcessSegm's steps: interpolate to the batch's largest image, threshold, crop, nearest resize."""
    max_h, max_w = image_sizes.max(0).values.tolist()
    up = F.interpolate(pred_masks, size=(max_h, max_w), mode="bilinear", align_corners=False)
    binary = up.sigmoid() > 0.5
    out = []
    for i, (size, orig) in enumerate(zip(image_sizes.tolist(), orig_sizes.tolist(), strict=True)):
        m = binary[i, query_idx[i]][:, None, : size[0], : size[1]].float()
        out.append(F.interpolate(m, size=tuple(orig), mode="nearest")[:, 0].bool())
    return out


def test_postprocess_instances_equal_the_references_steps() -> None:
    g = torch.Generator().manual_seed(5)
    outputs = {
        "pred_logits": torch.randn(2, 7, 4, generator=g),
        "pred_boxes": torch.rand(2, 7, 4, generator=g),
        "pred_masks": torch.randn(2, 7, 9, 11, generator=g) * 4,
    }
    image_sizes, orig_sizes = torch.tensor([[34, 41], [29, 44]]), torch.tensor([[50, 61], [20, 33]])
    padded = (34, 44)  # the reference's padded input: the batch's largest image
    results = postprocess_instances(
        outputs, orig_sizes=orig_sizes, image_sizes=image_sizes, top_k=5, padded_size=padded
    )
    query_idx = outputs["pred_logits"].softmax(-1)[..., :-1].max(-1).values.topk(5).indices
    expected = reference_instance_masks(outputs["pred_masks"], query_idx, image_sizes, orig_sizes)
    for result, masks in zip(results, expected, strict=True):
        assert torch.equal(result["masks"], masks)


def _panoptic_case(focal: bool = False) -> dict[str, torch.Tensor]:
    """Six queries on an 8x8 map (classes: 0 thing id 3, 1 thing id 7, 2 stuff id 21).

    q0 thing (rows 0-3, cols 0-3), q1 and q2 stuff of one class (rows 0-3, cols 4-7; rows 4-7), q3 no-object and
    q4 a low score (both with the highest mask everywhere: dropped), q5 a thing winning only 3 pixels, where q0
    is second best.
    """
    s = 10.0
    if focal:
        logits = torch.tensor([[s, -s, -s], [-s, -s, s], [-s, -s, s], [-s, -s, -s], [0.5, -s, -s], [-s, s, -s]])
    else:
        logits = torch.tensor(
            [[s, 0, 0, 0], [0, 0, s, 0], [0, 0, 9, 0], [0, 0, 0, s], [2, 0, 0, 0], [0, s, 0, 0]], dtype=torch.float32
        )
    masks = torch.full((6, 8, 8), -5.0)
    masks[0, :4, :4] = 5
    masks[1, :4, 4:] = 5
    masks[2, 4:, :] = 5
    masks[3:5] = 100
    small = ([7, 7, 6], [0, 1, 0])
    masks[5][small] = 6
    masks[0][small] = 3
    masks[2][small] = 1
    return {"pred_logits": logits[None], "pred_boxes": torch.full((1, 6, 4), 0.5), "pred_masks": masks[None]}


PANOPTIC_LABELS = LabelMap((3, 7, 21), ("thing_a", "thing_b", "stuff"), isthing=(True, True, False))


@pytest.mark.parametrize("focal", [False, True])
def test_postprocess_panoptic_hand_made(focal: bool) -> None:
    outputs = _panoptic_case(focal)
    scores = outputs["pred_logits"][0].sigmoid() if focal else outputs["pred_logits"][0].softmax(-1)

    def run(orig: int, **kwargs):
        sizes = {"orig_sizes": torch.tensor([[orig, orig]]), "image_sizes": torch.tensor([[8, 8]])}
        (result,) = postprocess_panoptic(
            outputs, **sizes, label_map=PANOPTIC_LABELS, padded_size=(8, 8), focal=focal, **kwargs
        )
        return result["segments"], result["segments_info"]

    # At the model's size: q5 (3 pixels < 5) is dropped, its pixels go to q0; the two stuff queries are one segment.
    segments, info = run(8)
    expected = torch.full((8, 8), 2, dtype=torch.int32)
    expected[:4, :4] = 1
    expected[7, 0] = expected[7, 1] = expected[6, 0] = 1
    assert segments.dtype == torch.int32 and torch.equal(segments, expected)
    thing_score, stuff_score = float(scores[0].max()), float(max(scores[1].max(), scores[2].max()))
    assert info == [
        {"id": 1, "category_id": 3, "isthing": True, "score": pytest.approx(thing_score), "area": 19},
        {"id": 2, "category_id": 21, "isthing": False, "score": pytest.approx(stuff_score), "area": 45},
    ]

    # Areas count at the original size: 2x up, q5's 3 pixels are 12 and it stays.
    segments, info = run(16)
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 3, 64), (2, 21, 180), (3, 7, 12)]
    expected = torch.full((8, 8), 2, dtype=torch.int32)
    expected[:4, :4] = 1
    expected[7, 0] = expected[7, 1] = expected[6, 0] = 3
    assert torch.equal(segments, expected.repeat_interleave(2, 0).repeat_interleave(2, 1))

    # 2x down (pixel centres: rows and columns 1, 3, 5, 7): q5 keeps 1 pixel; with min_area 2 it alone is
    # dropped and its pixel (7, 1) goes to q0.
    segments, info = run(4, min_area=2)
    assert segments.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [2, 2, 2, 2], [1, 2, 2, 2]]
    assert [s["area"] for s in info] == [5, 11]
    # With 5, q0 (4 pixels in the first pass) goes too, at once: one stuff segment, renumbered 1, everywhere.
    segments, info = run(4)
    assert segments.tolist() == [[1] * 4] * 4
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 21, 16)]

    # Nothing above the threshold: all void.
    segments, info = run(8, threshold=0.99999)
    assert info == [] and segments.eq(0).all()


def test_segment_maps_resize_as_pils_nearest() -> None:
    """The reference resizes its id map with PIL's NEAREST (torch's nearest-exact differs where a source
    position falls on an integer, e.g. 2 -> 7 pixels); postprocess_panoptic samples as PIL does."""
    from detrkit.postprocess import _resize_nearest_like_pil

    g = torch.Generator().manual_seed(6)
    for n_in in (2, 3, 7, 23, 28):
        ids = torch.randint(0, 200, (n_in, 5), generator=g)
        for n_out in range(1, 64):
            ours = _resize_nearest_like_pil(ids, (n_out, 5))
            pil = Image.fromarray(ids.numpy().astype(np.uint8)).resize((5, n_out), resample=Image.NEAREST)
            assert torch.equal(ours, torch.from_numpy(np.asarray(pil).astype(np.int64))), (n_in, n_out)
    ids = torch.randint(0, 200, (23, 37), generator=g)
    for size in [(23, 37), (46, 74), (11, 18), (50, 29), (7, 81)]:
        pil = Image.fromarray(ids.numpy().astype(np.uint8)).resize(size[::-1], resample=Image.NEAREST)
        assert torch.equal(_resize_nearest_like_pil(ids, size), torch.from_numpy(np.asarray(pil).astype(np.int64)))


def reference_panoptic(outputs, image_size, orig_size, isthing_by_label) -> tuple[np.ndarray, list[int]]:
    """PostProcessPanoptic's steps for one image without two kept stuff queries of one class (where it and
    postprocess_panoptic agree): keep, interpolate to the image size, argmax, PIL-resize, drop areas <= 4, repeat.
    Returns the id map (ids = positions among the finally kept queries) and the kept labels."""
    prob = outputs["pred_logits"][0].softmax(-1)
    scores, labels = prob.max(-1)
    keep = (labels != prob.shape[-1] - 1) & (scores > 0.85)
    masks = F.interpolate(outputs["pred_masks"][0, keep][:, None], size=image_size, mode="bilinear")[:, 0]
    labels = labels[keep]
    assert len({int(c) for c in labels if not isthing_by_label[int(c)]}) == sum(
        not isthing_by_label[int(c)] for c in labels
    )
    while True:
        winner = masks.argmax(0).numpy().astype(np.uint8)
        ids = np.asarray(Image.fromarray(winner).resize(orig_size[::-1], resample=Image.NEAREST)).astype(np.int64)
        area = np.bincount(ids.ravel(), minlength=len(masks))
        small = area <= 4
        if not small.any():
            return ids, labels.tolist()
        masks, labels = masks[~torch.from_numpy(small)], labels[~torch.from_numpy(small)]


def test_postprocess_panoptic_equals_the_references_steps() -> None:
    g = torch.Generator().manual_seed(7)
    isthing = (True, True, True, False, False, False)
    label_map = LabelMap((1, 2, 3, 10, 11, 12), tuple("abcdef"), isthing=isthing)
    checked = 0
    for _ in range(30):
        logits = torch.randn(1, 12, 7, generator=g) * 4
        # One query per stuff class at most (the reference's merging differs there): others made no-object.
        best = logits[0].softmax(-1).max(-1)
        seen = set()
        for q in range(12):
            c = int(best.indices[q])
            if c < 6 and not isthing[c] and best.values[q] > 0.85:
                if c in seen:
                    logits[0, q, 6] = 50
                seen.add(c)
        outputs = {
            "pred_logits": logits,
            "pred_boxes": torch.rand(1, 12, 4, generator=g),
            "pred_masks": torch.randn(1, 12, 7, 9, generator=g) * 3,
        }
        image_size, orig_size = (28, 36), (int(torch.randint(10, 60, (1,), generator=g)), 47)
        (result,) = postprocess_panoptic(
            outputs,
            orig_sizes=torch.tensor([orig_size]),
            image_sizes=torch.tensor([image_size]),
            label_map=label_map,
            padded_size=image_size,  # the reference's padded input is the largest image: here this one
        )
        ref_ids, ref_labels = reference_panoptic(outputs, image_size, orig_size, isthing)
        if not ref_labels:
            continue
        checked += 1
        assert torch.equal(result["segments"], torch.from_numpy(ref_ids + 1).int())
        assert [s["category_id"] for s in result["segments_info"]] == [label_map.category_ids[c] for c in ref_labels]
        assert [s["area"] for s in result["segments_info"]] == np.bincount(ref_ids.ravel()).tolist()
    assert checked >= 10


def test_postprocess_semantic_hand_made() -> None:
    label_map = LabelMap((4, 9), ("left", "right"))
    logits = torch.tensor([[[10.0, 0, 0], [0, 10, 0], [0, 0, 10]]])  # q2: no-object
    masks = torch.full((1, 3, 4, 6), -10.0)
    masks[0, 0, :, :3] = 10
    masks[0, 1, :, 3:] = 10
    masks[0, 2] = 10
    outputs = {"pred_logits": logits, "pred_boxes": torch.zeros(1, 3, 4), "pred_masks": masks}
    kwargs = {"image_sizes": torch.tensor([[4, 6]]), "label_map": label_map, "padded_size": (4, 6)}
    (same,) = postprocess_semantic(outputs, orig_sizes=torch.tensor([[4, 6]]), **kwargs)
    assert same.tolist() == [[4, 4, 4, 9, 9, 9]] * 4
    (double,) = postprocess_semantic(outputs, orig_sizes=torch.tensor([[8, 12]]), **kwargs)
    assert double.tolist() == [[4] * 6 + [9] * 6] * 8
    # Equal class scores everywhere: the lower label wins.
    tie = {**outputs, "pred_logits": torch.zeros(1, 3, 3)}
    (tied,) = postprocess_semantic(tie, orig_sizes=torch.tensor([[4, 6]]), **kwargs)
    assert tied.eq(4).all()
    (focal,) = postprocess_semantic(
        {**outputs, "pred_logits": logits[..., :2]}, orig_sizes=torch.tensor([[4, 6]]), focal=True, **kwargs
    )
    assert focal.tolist() == same.tolist()
    (labels,) = postprocess_semantic(
        outputs, orig_sizes=torch.tensor([[4, 6]]), image_sizes=kwargs["image_sizes"], padded_size=(4, 6)
    )
    assert labels.tolist() == [[0, 0, 0, 1, 1, 1]] * 4  # no label map: contiguous labels


def test_mask_postprocessing_errors() -> None:
    outputs = _panoptic_case()
    sizes = {"orig_sizes": torch.tensor([[8, 8]]), "image_sizes": torch.tensor([[8, 8]])}
    with pytest.raises(ValueError, match="isthing"):
        postprocess_panoptic(outputs, **sizes, label_map=LabelMap((3, 7, 21), ("a", "b", "c")))
    with pytest.raises(ValueError, match="pred_masks"):
        postprocess_instances({k: v for k, v in outputs.items() if k != "pred_masks"}, **sizes)
    with pytest.raises(ValueError, match="within the padded input"):
        postprocess_semantic(outputs, orig_sizes=sizes["orig_sizes"], image_sizes=torch.tensor([[40, 8]]))
    with pytest.raises(ValueError, match="label_map has 2 classes"):
        postprocess_panoptic(outputs, **sizes, label_map=LabelMap((1, 2), ("a", "b"), isthing=(True, False)))
    with pytest.raises(TypeError):
        postprocess_panoptic(outputs, sizes["image_sizes"], sizes["orig_sizes"], PANOPTIC_LABELS)  # keywords only


# ------------------------------------------------------------------------------------------------------------
# RLE and mask AP


def test_masks_to_rle_is_pycocotools_encoding() -> None:
    rng = np.random.default_rng(8)
    masks = rng.random((5, 17, 23)) > 0.5
    masks[0] = False
    masks[1] = True
    rles = masks_to_rle(torch.from_numpy(masks))
    expected = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in rles] == [e["counts"].decode() for e in expected]
    assert all(r["size"] == [17, 23] and isinstance(r["counts"], str) for r in rles)
    assert np.array_equal(mask_utils.decode(rles).transpose(2, 0, 1), masks)
    json.dumps(rles)
    assert masks_to_rle(np.zeros((0, 4, 4), dtype=bool)) == []


def _rectangle(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
    mask = np.zeros((h, w), dtype=bool)
    mask[y : y + int(rng.integers(2, h - y + 1)), x : x + int(rng.integers(2, w - x + 1))] = True
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (crowd annotations): run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [len(flat)]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


SEGM_CATEGORIES = (2, 5, 11)


def make_segm_case(seed: int, num_images: int = 24) -> tuple[dict, dict[int, dict[str, np.ndarray]]]:
    """Ground truth with polygons, crowd RLEs, objects of all sizes and empty images; predictions jittered from
    it with wrong classes, false positives, tied scores and > 100 detections on one image."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], {}
    for i in range(num_images):
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        image_id = 100 + 3 * i
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.png"})
        masks, scores, labels = [], [], []
        for _ in range(0 if i % 7 == 6 else int(rng.integers(1, 6))):
            category = int(rng.choice(SEGM_CATEGORIES))
            crowd = rng.random() < 0.1
            if crowd:
                mask = _rectangle(h, w, rng)
                segmentation = _uncompressed_rle(mask)
            else:
                # A polygon (a random quadrilateral) as COCO's objects are; its mask as pycocotools draws it.
                cx, cy = rng.uniform(5, w - 5), rng.uniform(5, h - 5)
                r = rng.uniform(2, min(h, w) / 2, 4)
                angles = np.sort(rng.uniform(0, 2 * np.pi, 4))
                poly = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).clip(0, [w - 1, h - 1])
                segmentation = [poly.ravel().tolist()]
                mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))).astype(bool)
                if not mask.any():
                    continue
            ys, xs = np.nonzero(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                    "iscrowd": int(crowd),
                }
            )
            if rng.random() < 0.85:
                shifted = np.roll(mask, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
                masks.append(shifted)
                labels.append(category if rng.random() > 0.15 else int(rng.choice(SEGM_CATEGORIES)))
                scores.append(round(float(rng.uniform(0.3, 1.0)), 1))  # ties
        for _ in range(120 if i == 0 else int(rng.integers(0, 4))):
            masks.append(_rectangle(h, w, rng))
            labels.append(int(rng.choice(SEGM_CATEGORIES)))
            scores.append(round(float(rng.uniform(0, 0.6)), 1))
        if i % 5 == 4:  # some images updated without detections
            masks, scores, labels = masks[:0], scores[:0], labels[:0]
        predictions[image_id] = {
            "masks": np.array(masks, dtype=bool).reshape(-1, h, w),
            "scores": np.array(scores, dtype=np.float32),
            "labels": np.array(labels, dtype=np.int64),
        }
    categories = [{"id": c, "name": f"c{c}"} for c in SEGM_CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


def pycocotools_segm(gt: dict, predictions: dict[int, dict[str, np.ndarray]]) -> dict[str, float]:
    results = []
    for image_id, p in predictions.items():
        encoded = mask_utils.encode(np.asfortranarray(p["masks"].transpose(1, 2, 0).astype(np.uint8)))
        for rle, score, label in zip(encoded, p["scores"].tolist(), p["labels"].tolist(), strict=True):
            results.append({"image_id": image_id, "category_id": label, "segmentation": rle, "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(zip(COCO_METRIC_KEYS, coco_eval.stats.tolist(), strict=True))


def _max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    assert list(a) == list(b)
    return max(abs(a[k] - b[k]) for k in a)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
@pytest.mark.parametrize("seed", [0, 1])
def test_segm_ap_equals_pycocotools(tmp_path: Path, seed: int, backend: str) -> None:
    gt, predictions = make_segm_case(seed)
    expected = pycocotools_segm(gt, predictions)
    assert expected["AP"] > 0.05 and expected["APs"] >= 0  # a non-trivial case, small objects present
    evaluator = CocoEvaluator(gt, iou_type="segm", backend=backend, all_images=True)
    evaluator.update({i: {k: torch.from_numpy(v) for k, v in p.items()} for i, p in predictions.items()})
    metrics = evaluator.summarize()
    assert _max_difference(metrics, expected) <= 1e-6

    results = evaluator.results()
    assert {"image_id", "category_id", "segmentation", "score"} == set(results[0])
    path = tmp_path / "segm_results.json"
    path.write_text(json.dumps(results))
    from_file = evaluate_results_file(gt, path, iou_type="segm", backend=backend)
    assert _max_difference(from_file, expected) <= 1e-6


def test_segm_errors(tmp_path: Path) -> None:
    gt, predictions = make_segm_case(3, num_images=3)
    image_id = gt["images"][0]["id"]
    evaluator = CocoEvaluator(gt, iou_type="segm")
    h, w = gt["images"][0]["height"], gt["images"][0]["width"]
    with pytest.raises(ValueError, match="original image size"):
        evaluator.update({image_id: {"masks": np.zeros((1, h + 1, w), bool), "scores": [0.5], "labels": [2]}})
    with pytest.raises(ValueError, match="'masks', 'scores' and 'labels'"):
        evaluator.update({image_id: {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}})
    with pytest.raises(ValueError, match="iou_type"):
        CocoEvaluator(gt, iou_type="keypoints")  # type: ignore[arg-type]
    bad = copy.deepcopy(gt)
    del bad["annotations"][0]["segmentation"]
    with pytest.raises(ValueError, match="segmentation"):
        CocoEvaluator(bad, iou_type="segm")
    record = {"image_id": image_id, "category_id": 2, "score": 0.5}
    with pytest.raises(ValueError, match=r"record 0 lacks \['segmentation'\]"):
        evaluate_results_file(gt, [{**record, "bbox": [0, 0, 1, 1]}], iou_type="segm")
    with pytest.raises(ValueError, match="expected a COCO RLE"):
        evaluate_results_file(gt, [{**record, "segmentation": [[0, 0, 1, 0, 1, 1]]}], iou_type="segm")
    rle = masks_to_rle(np.zeros((1, h, w + 2), bool))[0]
    with pytest.raises(ValueError, match="but the image is"):
        evaluate_results_file(gt, [{**record, "segmentation": rle}], iou_type="segm")


# ------------------------------------------------------------------------------------------------------------
# Panoptic quality


PANOPTIC_CATEGORIES = [
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "b", "isthing": 1},
    {"id": 3, "name": "c", "isthing": 1},
    {"id": 10, "name": "s1", "isthing": 0},
    {"id": 11, "name": "s2", "isthing": 0},
    {"id": 12, "name": "s3", "isthing": 0},
]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def read_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path), dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def make_panoptic_case(root: Path, seed: int, num_images: int = 12) -> tuple[Path, Path]:
    """COCO panoptic ground truth (stuff bands, things, crowd things, VOID patches, ids > 255) and predictions
    (shifted segments, wrong classes, missed segments, false positives on VOID, crowd and elsewhere)."""
    rng = np.random.default_rng(seed)
    (root / "gt").mkdir(parents=True)
    (root / "pred").mkdir()
    gt: dict = {"images": [], "annotations": [], "categories": PANOPTIC_CATEGORIES}
    pred: dict = {"annotations": []}
    things, all_categories = [1, 2, 3], [1, 2, 3, 10, 11, 12]
    for i in range(num_images):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        gt["images"].append({"id": i + 1, "file_name": f"im{i}.jpg", "height": h, "width": w})
        ids = np.zeros((h, w), np.int64)
        free = list(rng.permutation(np.arange(1, 4000))[:40])
        info = {}
        for _ in range(int(rng.integers(0, 3))):
            sid = int(free.pop())
            ids[int(rng.integers(0, h)) :, :] = sid
            info[sid] = {"id": sid, "category_id": int(rng.choice([10, 11, 12])), "iscrowd": 0}
        for _ in range(int(rng.integers(0, 6))):
            sid = int(free.pop())
            ids[_rectangle(h, w, rng)] = sid
            info[sid] = {"id": sid, "category_id": int(rng.choice(things)), "iscrowd": int(rng.random() < 0.2)}
        for _ in range(int(rng.integers(0, 3))):  # VOID
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            ids[y : y + int(rng.integers(1, 10)), x : x + int(rng.integers(1, 10))] = 0
        segments = []
        for sid, segment in info.items():
            area = int((ids == sid).sum())
            if area:
                segments.append({**segment, "area": area, "bbox": [0, 0, 1, 1]})
        Image.fromarray(id2rgb(ids)).save(root / "gt" / f"im{i}.png")
        gt["annotations"].append({"image_id": i + 1, "file_name": f"im{i}.png", "segments_info": segments})

        predicted = np.zeros((h, w), np.int64)
        pred_info = []
        for segment in segments:
            if rng.random() < 0.2:
                continue  # missed
            moved = np.roll(ids == segment["id"], tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
            category = segment["category_id"] if rng.random() > 0.15 else int(rng.choice(all_categories))
            predicted[moved] = len(pred_info) + 1
            pred_info.append({"id": len(pred_info) + 1, "category_id": category})
        for _ in range(int(rng.integers(0, 3))):  # false positives (some on VOID or crowd)
            predicted[_rectangle(h, w, rng)] = len(pred_info) + 1
            pred_info.append({"id": len(pred_info) + 1, "category_id": int(rng.choice(all_categories))})
        present = set(np.unique(predicted).tolist())
        pred_info = [s for s in pred_info if s["id"] in present]
        Image.fromarray(id2rgb(predicted)).save(root / "pred" / f"im{i}.png")
        pred["annotations"].append({"image_id": i + 1, "file_name": f"im{i}.png", "segments_info": pred_info})
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "pred.json").write_text(json.dumps(pred))
    return root / "gt.json", root / "pred.json"


def oracle_pq(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict[str, float]:
    """panopticapi's pq_compute, from its rules: per category TP (IoU > 0.5 with VOID taken out of the union),
    FN (unmatched non-crowd truth), FP (unmatched predictions not mostly on VOID + the category's crowd region)."""
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    categories = {c["id"]: c for c in gt["categories"]}
    stats = {c: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for c in categories}
    predictions = {a["image_id"]: a for a in pred["annotations"]}
    for gt_ann in gt["annotations"]:
        pred_ann = predictions[gt_ann["image_id"]]
        g, p = read_ids(gt_dir / gt_ann["file_name"]), read_ids(pred_dir / pred_ann["file_name"])
        truths = {s["id"]: s for s in gt_ann["segments_info"]}
        guesses = {s["id"]: s for s in pred_ann["segments_info"]}
        pred_area = {sid: int((p == sid).sum()) for sid in guesses}
        matched_truth, matched_guess = set(), set()
        for tid, truth in truths.items():
            if truth["iscrowd"]:
                continue
            for pid, guess in guesses.items():
                if guess["category_id"] != truth["category_id"]:
                    continue
                intersection = int(((g == tid) & (p == pid)).sum())
                if intersection == 0:
                    continue
                union = pred_area[pid] + truth["area"] - intersection - int(((g == 0) & (p == pid)).sum())
                if intersection / union > 0.5:
                    stats[truth["category_id"]]["tp"] += 1
                    stats[truth["category_id"]]["iou"] += intersection / union
                    matched_truth.add(tid)
                    matched_guess.add(pid)
        crowd_of = {}
        for tid, truth in truths.items():
            if truth["iscrowd"]:
                crowd_of[truth["category_id"]] = tid  # the last crowd segment of a category, as pq_compute's dict
            elif tid not in matched_truth:
                stats[truth["category_id"]]["fn"] += 1
        for pid, guess in guesses.items():
            if pid in matched_guess:
                continue
            ignored = int(((g == 0) & (p == pid)).sum())
            if guess["category_id"] in crowd_of:
                ignored += int(((g == crowd_of[guess["category_id"]]) & (p == pid)).sum())
            if ignored / pred_area[pid] <= 0.5:
                stats[guess["category_id"]]["fp"] += 1

    def average(selected: list[int]) -> tuple[float, float, float]:
        pq = sq = rq = 0.0
        n = 0
        for c in selected:
            s = stats[c]
            if s["tp"] + s["fp"] + s["fn"] == 0:
                continue
            n += 1
            denominator = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
            pq += s["iou"] / denominator
            sq += s["iou"] / s["tp"] if s["tp"] else 0.0
            rq += s["tp"] / denominator
        return (pq / n, sq / n, rq / n) if n else (-1.0, -1.0, -1.0)

    groups = [list(categories), [c for c in categories if categories[c]["isthing"]]]
    groups.append([c for c in categories if not categories[c]["isthing"]])
    values = [v for group in groups for v in average(group)]
    return dict(zip(PANOPTIC_METRIC_KEYS, values, strict=True))


@pytest.fixture(scope="module")
def panoptic_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_panoptic_case(tmp_path_factory.mktemp("panoptic"), seed=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pq_equals_the_oracle(tmp_path: Path, seed: int) -> None:
    gt_json, pred_json = make_panoptic_case(tmp_path, seed)
    expected = oracle_pq(gt_json, tmp_path / "gt", pred_json, tmp_path / "pred")
    assert 0 < expected["PQ"] < 1 and expected["PQ_st"] > 0  # things, stuff, matches and misses all present
    metrics = evaluate_panoptic(gt_json, None, pred_json, None)  # folders: the JSON paths without .json
    assert list(metrics) == list(PANOPTIC_METRIC_KEYS)
    assert _max_difference(metrics, expected) <= 1e-12


def test_panoptic_evaluator_from_segment_maps(panoptic_case: tuple[Path, Path], tmp_path: Path) -> None:
    gt_json, pred_json = panoptic_case
    root = gt_json.parent
    pred = json.loads(pred_json.read_text())
    maps = {
        a["image_id"]: {
            "segments": torch.from_numpy(read_ids(root / "pred" / a["file_name"]).astype(np.int32)),
            "segments_info": a["segments_info"],
        }
        for a in pred["annotations"]
    }
    out = tmp_path / "kept" / "panoptic.json"
    evaluator = PanopticEvaluator(gt_json, output_json=out)
    evaluator.update(maps)
    assert evaluator.summarize() == evaluate_panoptic(gt_json, root / "gt", pred_json, root / "pred")
    assert json.loads(out.read_text())["annotations"] == evaluator.results()  # kept for --results
    assert (out.parent / "panoptic" / "im0.png").is_file()

    # Only updated images count, unless all_images: the others then have no segment at all.
    some = {i: maps[i] for i in list(maps)[:5]}
    partial = PanopticEvaluator(gt_json)
    partial.update(some)
    subset = json.loads(gt_json.read_text())
    subset["annotations"] = [a for a in subset["annotations"] if a["image_id"] in some]
    subset_json = tmp_path / "subset.json"
    subset_json.write_text(json.dumps(subset))
    assert partial.summarize() == evaluate_panoptic(subset_json, root / "gt", pred_json, root / "pred")
    everything = PanopticEvaluator(gt_json, all_images=True)
    everything.update(some)
    assert everything.summarize()["RQ"] < partial.summarize()["RQ"]

    with pytest.raises(ValueError, match="exactly the non-zero ids"):
        PanopticEvaluator(gt_json).update(
            {1: {**maps[1], "segments_info": []}}
            if maps[1]["segments_info"]
            else {1: {**maps[1], "segments": torch.ones_like(maps[1]["segments"])}}
        )
    with pytest.raises(ValueError, match="no annotation in the ground truth"):
        PanopticEvaluator(gt_json).update({999: maps[1]})


def _rewrite(root: Path, mutate) -> tuple[Path, Path]:
    gt, pred = json.loads((root / "gt.json").read_text()), json.loads((root / "pred.json").read_text())
    mutate(gt, pred)
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "pred.json").write_text(json.dumps(pred))
    return root / "gt.json", root / "pred.json"


def test_panoptic_errors_name_the_file_and_the_image(tmp_path: Path) -> None:
    def case(name: str, mutate) -> tuple[Path, Path]:
        gt_json, pred_json = make_panoptic_case(tmp_path / name, seed=1, num_images=3)
        return _rewrite(gt_json.parent, mutate)

    def first_with_segments(pred: dict) -> dict:
        return next(a for a in pred["annotations"] if a["segments_info"])

    gt_json, pred_json = case("png_only", lambda gt, pred: first_with_segments(pred)["segments_info"].pop())
    with pytest.raises(ValueError, match=r"pred\.json.*image \d+.*segment \d+ is in the PNG"):
        evaluate_panoptic(gt_json, None, pred_json, None)
    gt_json, pred_json = case(
        "json_only", lambda gt, pred: pred["annotations"][0]["segments_info"].append({"id": 999, "category_id": 1})
    )
    with pytest.raises(ValueError, match=r"pred\.json.*segment 999"):
        evaluate_panoptic(gt_json, None, pred_json, None)
    gt_json, pred_json = case(
        "unknown", lambda gt, pred: first_with_segments(pred)["segments_info"][0].update(category_id=77)
    )
    with pytest.raises(ValueError, match=r"pred\.json: image \d+: .*category ids \[77\]"):
        evaluate_panoptic(gt_json, None, pred_json, None)
    gt_json, pred_json = case(
        "repeated",
        lambda gt, pred: first_with_segments(pred)["segments_info"].append(
            dict(first_with_segments(pred)["segments_info"][0])
        ),
    )
    with pytest.raises(ValueError, match=r"pred\.json: image \d+: segment ids \[\d+\] appear more than once"):
        evaluate_panoptic(gt_json, None, pred_json, None)
    gt_json, pred_json = case("no_prediction", lambda gt, pred: pred["annotations"].pop(0))
    with pytest.raises(ValueError, match=r"pred\.json: no prediction for the ground truth's images 1"):
        evaluate_panoptic(gt_json, None, pred_json, None)
    gt_json, pred_json = case("flagless", lambda gt, pred: gt["categories"][0].pop("isthing"))
    with pytest.raises(ValueError, match=r"gt\.json: categories 1 lack 'isthing'"):
        evaluate_panoptic(gt_json, None, pred_json, None)
    gt_json, pred_json = case("missing_png", lambda gt, pred: None)
    (gt_json.parent / "pred" / "im1.png").unlink()
    with pytest.raises(FileNotFoundError, match="im1.png"):
        evaluate_panoptic(gt_json, None, pred_json, None)
    with pytest.raises(FileNotFoundError, match="no PNG folder"):
        evaluate_panoptic(gt_json, None, pred_json, tmp_path / "nowhere")


def test_pq_without_stuff_is_minus_one(tmp_path: Path) -> None:
    def things_only(gt: dict, pred: dict) -> None:
        gt["categories"] = [c for c in gt["categories"] if c["isthing"]]

    gt_json, pred_json = make_panoptic_case(tmp_path, seed=2, num_images=4)
    root = gt_json.parent
    # Erase stuff from both sides: VOID in the ground truth, nothing in the predictions.
    for side in ("gt", "pred"):
        data = json.loads((root / f"{side}.json").read_text())
        for ann in data["annotations"]:
            ids = read_ids(root / side / ann["file_name"]).astype(np.int64)
            keep = [s for s in ann["segments_info"] if s["category_id"] < 10]
            ids[~np.isin(ids, [s["id"] for s in keep])] = 0
            Image.fromarray(id2rgb(ids)).save(root / side / ann["file_name"])
            ann["segments_info"] = keep
        (root / f"{side}.json").write_text(json.dumps(data))
    gt_json, pred_json = _rewrite(root, things_only)
    metrics = evaluate_panoptic(gt_json, None, pred_json, None)
    assert metrics["PQ_st"] == metrics["SQ_st"] == metrics["RQ_st"] == -1.0
    assert (
        metrics["PQ"]
        == metrics["PQ_th"]
        == pytest.approx(oracle_pq(gt_json, root / "gt", pred_json, root / "pred")["PQ"])
    )


# ------------------------------------------------------------------------------------------------------------
# The CLI on results files


def test_cli_eval_panoptic_results(panoptic_case: tuple[Path, Path], tmp_path: Path) -> None:
    gt_json, pred_json = panoptic_case
    root = gt_json.parent
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "--task",
                "panoptic",
                "--results",
                str(pred_json),
                "--annotations",
                str(gt_json),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == list(PANOPTIC_METRIC_KEYS)
    assert metrics == evaluate_panoptic(gt_json, None, pred_json, None)

    # Folders elsewhere: --gt-dir and --results-dir.
    moved = tmp_path / "moved"
    moved.mkdir()
    (root / "gt").rename(moved / "truth")
    (root / "pred").rename(moved / "guesses")
    try:
        out2 = tmp_path / "out2"
        args = ["eval", "--task", "panoptic", "--results", str(pred_json), "--annotations", str(gt_json)]
        assert main(args + ["--out", str(out2)]) == 2  # the default folders are gone
        extra = ["--gt-dir", str(moved / "truth"), "--results-dir", str(moved / "guesses"), "--out", str(out2)]
        assert main(args + extra) == 0
        assert json.loads((out2 / "metrics.json").read_text()) == metrics
    finally:
        (moved / "truth").rename(root / "gt")
        (moved / "guesses").rename(root / "pred")


def test_cli_eval_segm_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, predictions = make_segm_case(4, num_images=8)
    evaluator = CocoEvaluator(gt, iou_type="segm", all_images=True)
    evaluator.update(predictions)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(evaluator.results()))
    args = ["eval", "--annotations", str(tmp_path / "gt.json"), "--results", str(tmp_path / "results.json")]
    assert main([*args, "--task", "segm", "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics) == [*COCO_METRIC_KEYS, "per_class", "errors", "pr_curves"]
    metrics = {k: metrics[k] for k in COCO_METRIC_KEYS}
    assert _max_difference(metrics, pycocotools_segm(gt, predictions)) <= 1e-6
    # The same file as bbox results is refused with the record named; PNG folders belong to panoptic.
    assert main([*args, "--out", str(tmp_path / "out2")]) == 2
    assert "record 0 lacks ['bbox']" in capsys.readouterr().err
    assert main([*args, "--task", "segm", "--gt-dir", str(tmp_path)]) == 2
    assert "--task panoptic" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# evaluate_model with a model that returns masks


class StubSegmenter(nn.Module):
    """Finds the white rectangle of each image (query 0, a thing) and the black rest (query 1, stuff): its masks
    are right to the pixel when the geometry (padding, crop, resizes) is, so AP and PQ are 1.

    The mask logits are 20 on cells inside a rectangle and -12.4 outside: bilinear upsampling weighs a pixel
    inside at least 0.39 on inside cells (at a corner), one outside at most 0.375, so the sign keeps corners.
    """

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(focal=False, arch="stub")
        self.label_map = LabelMap((1, 5), ("box", "background"), isthing=(True, False))

    def forward(self, pixel_values: torch.Tensor, padding_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        white = (pixel_values[:, 0] > 0) & ~padding_mask  # (B, H, W)
        inside = F.avg_pool2d(white[:, None].float(), 4)[:, 0]  # (B, H/4, W/4): 0 or 1 on aligned rectangles
        thing = torch.where(inside > 0.5, 20.0, -12.4)
        masks = torch.stack([thing, -thing, torch.full_like(thing, -20)], 1)  # (B, 3, H/4, W/4)
        logits = torch.tensor([[10.0, 0, 0], [0, 10, 0], [0, 0, 10]]).expand(len(pixel_values), 3, 3)
        return {"pred_logits": logits, "pred_boxes": torch.full((len(pixel_values), 3, 4), 0.5), "pred_masks": masks}


def make_rectangle_dataset(root: Path) -> dict[str, Path]:
    """Three images of different shapes, one white rectangle each (on multiples of 8 pixels), as an instances
    JSON (RLE masks) and a panoptic JSON + PNGs (the rectangle a thing, the rest stuff, a VOID band)."""
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    shapes = [((48, 64), (8, 24, 16, 40)), ((64, 48), (16, 48, 8, 32)), ((48, 80), (24, 40, 40, 72))]
    instances = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}, {"id": 5, "name": "bg"}]}
    panoptic = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "box", "isthing": 1}, {"id": 5, "name": "bg", "isthing": 0}],
    }
    for i, ((h, w), (y0, y1, x0, x1)) in enumerate(shapes):
        image_id = 10 + i
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[y0:y1, x0:x1] = 255
        Image.fromarray(pixels).save(root / "images" / f"{image_id}.png")
        image = {"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w}
        instances["images"].append(image)
        panoptic["images"].append(image)
        mask = pixels[..., 0] > 0
        instances["annotations"].append(
            {
                "id": i + 1,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": masks_to_rle(mask[None])[0],
                "area": float(mask.sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0,
            }
        )
        ids = np.where(mask, 7, 300)
        if i == 0:
            ids[-8:] = 0  # VOID: left out of the stuff segment's union
        Image.fromarray(id2rgb(ids)).save(root / "panoptic" / f"{image_id}.png")
        segments = [
            {"id": 7, "category_id": 1, "iscrowd": 0, "area": int((ids == 7).sum())},
            {"id": 300, "category_id": 5, "iscrowd": 0, "area": int((ids == 300).sum())},
        ]
        panoptic["annotations"].append(
            {"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": segments}
        )
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "panoptic.json").write_text(json.dumps(panoptic))
    return {"images": root / "images", "instances": root / "instances.json", "panoptic": root / "panoptic.json"}


def test_evaluate_model_segm_and_panoptic_with_a_stub(tmp_path: Path) -> None:
    from detrkit.transforms import eval_transforms

    data = make_rectangle_dataset(tmp_path / "data")
    transforms = eval_transforms(size=96, max_size=1333)  # 2x: orig, model and padded sizes all differ
    model = StubSegmenter()

    class Instances(CocoImages):  # the images with their instances JSON, as CocoDetection would give them
        pass

    segm, results = evaluate_model(model, Instances(data["images"], data["instances"], transforms), task="segm")
    assert segm["AP"] == 1.0 and segm["AP50"] == 1.0
    assert results[0]["segmentation"]["size"] == [48, 64]

    out = tmp_path / "eval" / "panoptic.json"
    dataset = CocoImages(data["images"], data["panoptic"], transforms)
    pq, annotations = evaluate_model(model, dataset, task="panoptic", batch_size=3, panoptic_output=out)
    assert pq == dict.fromkeys(PANOPTIC_METRIC_KEYS, 1.0)
    assert [a["image_id"] for a in annotations] == [10, 11, 12]
    assert evaluate_panoptic(data["panoptic"], None, out, None) == pq  # the kept predictions score the same

    no_masks = StubSegmenter()
    no_masks.forward = lambda pixel_values, padding_mask: {  # type: ignore[method-assign]
        k: v for k, v in StubSegmenter.forward(model, pixel_values, padding_mask).items() if k != "pred_masks"
    }
    with pytest.raises(ValueError, match="no 'pred_masks'"):
        evaluate_model(no_masks, dataset, task="panoptic")
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate_model(model, dataset, task="keypoints")
