import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from detrkit.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from detrkit.matcher import HungarianMatcher, NonFiniteCostError


def random_case(
    batch: int, num_queries: int, num_targets: list[int], *, num_classes: int = 5, focal: bool, seed: int
) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    num_logits = num_classes if focal else num_classes + 1
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_logits, generator=g),
        "pred_boxes": torch.rand(batch, num_queries, 4, generator=g),
    }
    targets = []
    for n in num_targets:
        cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
        wh = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (n,), generator=g),
                "boxes": torch.cat([cxcy, wh], dim=1),
            }
        )
    return outputs, targets


def reference_cost(logits, boxes, labels, tgt_boxes, *, focal, weights=(1.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    """One image's (Q, N) cost written as in the official DETR / Deformable DETR matchers."""
    if focal:
        prob = logits.sigmoid()
        neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        class_cost = pos[:, labels] - neg[:, labels]
    else:
        class_cost = -logits.softmax(-1)[:, labels]
    bbox_cost = torch.cdist(boxes, tgt_boxes, p=1)
    giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return weights[0] * class_cost + weights[1] * bbox_cost + weights[2] * giou_cost


def brute_force_min(cost: torch.Tensor) -> float:
    """Smallest total cost over every one-to-one assignment of min(Q, N) pairs."""
    num_queries, num_targets = cost.shape
    if num_targets <= num_queries:
        return min(
            sum(cost[q, t].item() for t, q in enumerate(qs))
            for qs in itertools.permutations(range(num_queries), num_targets)
        )
    return min(
        sum(cost[q, t].item() for q, t in enumerate(ts))
        for ts in itertools.permutations(range(num_targets), num_queries)
    )


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(focal, seed):
    num_targets = [4, 1, 3, 4, 2]
    num_queries = 3 if seed == 3 else 6  # seed 3: more targets than queries
    outputs, targets = random_case(len(num_targets), num_queries, num_targets, focal=focal, seed=seed)
    weights = (2.0, 5.0, 2.0) if focal else (1.0, 5.0, 2.0)
    matcher = HungarianMatcher(cost_class=weights[0], cost_bbox=weights[1], cost_giou=weights[2], focal=focal)
    indices = matcher(outputs, targets)
    for b, ((pred_idx, tgt_idx), target) in enumerate(zip(indices, targets, strict=True)):
        cost = reference_cost(
            outputs["pred_logits"][b], outputs["pred_boxes"][b], target["labels"], target["boxes"],
            focal=focal, weights=weights,
        )  # fmt: skip
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64 and pred_idx.device.type == "cpu"
        assert len(pred_idx) == len(tgt_idx) == min(num_queries, len(target["labels"]))
        assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(tgt_idx.tolist())) == len(tgt_idx)
        assert torch.equal(pred_idx, pred_idx.sort().values)  # as linear_sum_assignment returns rows
        assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-4)


def test_batched_equals_each_image_alone():
    outputs, targets = random_case(6, 30, [5, 0, 12, 1, 30, 7], num_classes=20, focal=False, seed=5)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b, target in enumerate(targets):
        alone = matcher({k: v[b : b + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[b][0], alone[0]) and torch.equal(batched[b][1], alone[1])


def test_zero_target_images():
    outputs, targets = random_case(3, 10, [0, 3, 0], focal=False, seed=6)
    indices = HungarianMatcher()(outputs, targets)
    assert [len(p) for p, _ in indices] == [0, 3, 0]
    assert all(p.dtype == t.dtype == torch.int64 for p, t in indices)
    outputs, targets = random_case(2, 10, [0, 0], focal=True, seed=6)
    assert all(len(p) == len(t) == 0 for p, t in HungarianMatcher(focal=True)(outputs, targets))


def test_weights_validated():
    with pytest.raises(ValueError, match="at least one non-zero"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    with pytest.raises(ValueError, match=">= 0"):
        HungarianMatcher(cost_bbox=-1)


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_single_cost_terms(weights):
    outputs, targets = random_case(2, 6, [3, 2], focal=False, seed=7)
    matcher = HungarianMatcher(cost_class=weights[0], cost_bbox=weights[1], cost_giou=weights[2])
    for b, (pred_idx, tgt_idx) in enumerate(matcher(outputs, targets)):
        t = targets[b]
        cost = reference_cost(
            outputs["pred_logits"][b],
            outputs["pred_boxes"][b],
            t["labels"],
            t["boxes"],
            focal=False,
            weights=weights,
        )
        assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-5)


@pytest.mark.parametrize("key", ["pred_logits", "pred_boxes"])
def test_non_finite_predictions_give_a_clear_error(key):
    outputs, targets = random_case(3, 5, [2, 2, 0], focal=False, seed=8)
    outputs[key][1, 0, 0] = float("nan") if key == "pred_logits" else float("inf")
    with pytest.raises(NonFiniteCostError, match=rf"NaN or inf entries for images \[1\].*{key} finite: False"):
        HungarianMatcher()(outputs, targets)


def test_labels_out_of_range_give_a_clear_error():
    outputs, targets = random_case(1, 5, [2], num_classes=5, focal=False, seed=9)
    targets[0]["labels"][0] = 5  # the no-object index of 6 softmax logits
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        HungarianMatcher()(outputs, targets)


def test_degenerate_predicted_boxes():
    outputs, targets = random_case(2, 6, [3, 2], focal=True, seed=10)
    outputs["pred_boxes"][0, :3] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    outputs["pred_boxes"][1, :2] = torch.tensor([0.5, 0.5, -0.2, 0.1])
    assert [len(p) for p, _ in HungarianMatcher(focal=True)(outputs, targets)] == [3, 2]


@pytest.mark.parametrize("focal", [False, True])
def test_same_assignment_as_transformers(focal):
    loss_module = pytest.importorskip("transformers.loss.loss_deformable_detr")
    outputs, targets = random_case(4, 40, [5, 0, 17, 40], num_classes=10, focal=focal, seed=11)
    if focal:  # its alpha and gamma are fixed at 0.25 and 2
        theirs = loss_module.DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
        ours = HungarianMatcher(cost_class=2, focal=True)
    else:
        theirs = loss_module.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
        ours = HungarianMatcher()
    expected = theirs(
        {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
        [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets],
    )
    for (p, t), (ep, et) in zip(ours(outputs, targets), expected, strict=True):
        assert torch.equal(p, ep) and torch.equal(t, et)


@pytest.mark.parametrize("num_queries", [6, 2])
def test_ties_resolve_as_official_detr(num_queries):
    # Identical queries and duplicated targets make many assignments equally good; the indices must still be
    # those of linear_sum_assignment on official DETR's (Q, N) matrix.
    outputs, targets = random_case(1, num_queries, [4], focal=False, seed=12)
    outputs["pred_logits"][:] = outputs["pred_logits"][:, :1].clone()
    outputs["pred_boxes"][:, ::2] = outputs["pred_boxes"][:, :1].clone()
    targets[0]["boxes"][2:] = targets[0]["boxes"][:2].clone()
    targets[0]["labels"][2:] = targets[0]["labels"][:2].clone()
    ((pred_idx, tgt_idx),) = HungarianMatcher()(outputs, targets)
    cost = reference_cost(
        outputs["pred_logits"][0],
        outputs["pred_boxes"][0],
        targets[0]["labels"],
        targets[0]["boxes"],
        focal=False,
    )
    expected_pred, expected_tgt = linear_sum_assignment(cost.numpy())
    assert pred_idx.tolist() == expected_pred.tolist() and tgt_idx.tolist() == expected_tgt.tolist()
