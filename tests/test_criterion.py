import math

import pytest
import torch
import torch.nn.functional as F

from detrkit.criterion import SetCriterion, matched_query_index, sigmoid_focal_loss
from detrkit.matcher import HungarianMatcher

K = 4  # classes


def make_batch(
    num_targets: list[int], *, num_queries: int = 8, focal: bool = False, num_aux: int = 0, seed: int = 0
) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    num_logits = K if focal else K + 1
    batch = len(num_targets)

    def layer() -> dict:
        return {
            "pred_logits": torch.randn(batch, num_queries, num_logits, generator=g).requires_grad_(),
            "pred_boxes": (0.2 + 0.6 * torch.rand(batch, num_queries, 4, generator=g)).requires_grad_(),
        }

    outputs = layer()
    if num_aux:
        outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
    targets = []
    for n in num_targets:
        cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
        wh = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(0, K, (n,), generator=g), "boxes": torch.cat([cxcy, wh], dim=1)})
    return outputs, targets


def make_criterion(focal: bool = False, **kwargs) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=2.0 if focal else 1.0, focal=focal)
    return SetCriterion(num_classes=K, matcher=matcher, focal=focal, weight_ce=2.0 if focal else 1.0, **kwargs)


def weighted_total(losses: dict, criterion: SetCriterion, prefix: str = "") -> torch.Tensor:
    return sum(criterion.weights[k] * losses[prefix + k] for k in ("loss_ce", "loss_bbox", "loss_giou"))


@pytest.mark.parametrize("focal", [False, True])
def test_finite_loss_and_gradients_reach_logits_and_boxes(focal):
    outputs, targets = make_batch([3, 1, 5], focal=focal)
    criterion = make_criterion(focal)
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss", "loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "class_error"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], weighted_total(losses, criterion))
    losses["loss"].backward()
    for key in ("pred_logits", "pred_boxes"):
        assert outputs[key].grad is not None and outputs[key].grad.abs().sum() > 0
    assert not losses["class_error"].requires_grad and not losses["cardinality_error"].requires_grad


@pytest.mark.parametrize("focal", [False, True])
def test_perfect_predictions_have_zero_box_losses(focal):
    outputs, targets = make_batch([3, 2], focal=focal)
    with torch.no_grad():
        for b, t in enumerate(targets):
            n = len(t["labels"])
            outputs["pred_boxes"][b, :n] = t["boxes"]
            outputs["pred_logits"][b, :n] = -10.0
            outputs["pred_logits"][b, torch.arange(n), t["labels"]] = 10.0
    losses = make_criterion(focal)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["class_error"].item() == 0


@pytest.mark.parametrize("focal", [False, True])
def test_zero_target_images(focal):
    criterion = make_criterion(focal)
    outputs, targets = make_batch([0, 0], focal=focal, num_aux=1)
    losses = criterion(outputs, targets)
    assert torch.isfinite(losses["loss"])
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    losses["loss"].backward()  # still differentiable: the classification pushes every query to no-object
    assert outputs["pred_logits"].grad.abs().sum() > 0
    outputs, targets = make_batch([0, 3], focal=focal)
    assert torch.isfinite(criterion(outputs, targets)["loss"])


def test_aux_layers_add_to_total_and_are_reported_per_layer():
    criterion = make_criterion()
    outputs, targets = make_batch([2, 3], num_aux=2)
    losses = criterion(outputs, targets)
    expected = weighted_total(losses, criterion)
    for i in range(2):
        expected = expected + weighted_total(losses, criterion, f"aux/{i}/")
        # Each layer is matched on its own: same terms as that layer given alone as the last one.
        alone = criterion(outputs["aux_outputs"][i], targets)
        for k in ("loss_ce", "loss_bbox", "loss_giou"):
            torch.testing.assert_close(losses[f"aux/{i}/{k}"], alone[k])
    torch.testing.assert_close(losses["loss"], expected)
    last_only = criterion({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets)
    assert losses["loss"] > last_only["loss"]


def test_enc_outputs_matched_class_agnostically():
    criterion = make_criterion(focal=True)
    outputs, targets = make_batch([2, 3], focal=True, num_queries=6)
    enc, _ = make_batch([2, 3], focal=True, num_queries=20, seed=1)
    outputs["enc_outputs"] = enc
    losses = criterion(outputs, targets)
    agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    alone = criterion(enc, agnostic)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[f"enc/{k}"], alone[k])
    torch.testing.assert_close(
        losses["loss"], weighted_total(losses, criterion) + weighted_total(losses, criterion, "enc/")
    )


def test_degenerate_predicted_boxes_give_finite_loss_and_gradients():
    outputs, targets = make_batch([3, 2], num_aux=1)
    with torch.no_grad():
        outputs["pred_boxes"][0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
        outputs["pred_boxes"][1, :4] = torch.tensor([0.5, 0.5, -0.3, 0.2])
    losses = make_criterion()(outputs, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and torch.isfinite(outputs["pred_boxes"].grad).all()


def test_eos_weighting_hand_computed():
    # One image, two queries, K=2: query 1 sits on the target box, so it is matched (box costs only).
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]])
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2]])}]
    matcher = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0)
    criterion = SetCriterion(num_classes=2, matcher=matcher, eos_coef=0.1)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)

    def nll(row: list[float], cls: int) -> float:
        return -(row[cls] - math.log(sum(math.exp(x) for x in row)))

    # Query 0 -> no-object (index 2, weight 0.1), query 1 -> class 0 (weight 1); weighted mean.
    expected = (0.1 * nll([1.0, 2.0, 0.5], 2) + 1.0 * nll([0.3, -1.0, 2.0], 0)) / (0.1 + 1.0)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)
    # Query 1 predicts no-object (2.0 is its largest logit), query 0 predicts class 1: 1 predicted object, 1
    # target.
    assert losses["class_error"].item() == 100 and losses["cardinality_error"].item() == 0


def test_focal_loss_follows_official_formula():
    outputs, targets = make_batch([3, 1], focal=True)
    criterion = make_criterion(focal=True)
    indices = criterion.match(outputs, targets)
    losses = criterion(outputs, targets, indices=indices)
    logits = outputs["pred_logits"]
    onehot = torch.zeros_like(logits)
    batch_idx, query_idx = matched_query_index(indices)
    onehot[batch_idx, query_idx, torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])] = 1
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    loss = (0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2
    num_boxes = 4
    # Deformable DETR: sigmoid_focal_loss(...) = loss.mean(1).sum() / num_boxes, times Q.
    torch.testing.assert_close(losses["loss_ce"], loss.mean(1).sum() / num_boxes * logits.shape[1])
    torch.testing.assert_close(sigmoid_focal_loss(logits, onehot, num_boxes), losses["loss_ce"])


def test_reused_indices_give_the_same_losses():
    outputs, targets = make_batch([2, 4], num_aux=1)
    criterion = make_criterion()
    indices = criterion.match(outputs, targets)
    assert len(indices) == 2 and [len(p) for p, _ in indices] == [2, 4]
    a, b = criterion(outputs, targets), criterion(outputs, targets, indices=indices)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_configuration_errors():
    with pytest.raises(ValueError, match="both be softmax or both be focal"):
        SetCriterion(num_classes=K, matcher=HungarianMatcher(focal=True))
    outputs, targets = make_batch([1], focal=True)  # K logits given to a softmax criterion expecting K+1
    with pytest.raises(ValueError, match="expects pred_logits with 5 classes"):
        make_criterion()(outputs, targets)


@pytest.mark.parametrize("focal", [False, True])
def test_same_losses_as_transformers(focal):
    loss_module = pytest.importorskip("transformers.loss.loss_deformable_detr")
    outputs, targets = make_batch([3, 0, 5], focal=focal, num_queries=10, num_aux=1)
    criterion = make_criterion(focal)
    theirs_outputs = {
        "logits": outputs["pred_logits"],
        "pred_boxes": outputs["pred_boxes"],
        "auxiliary_outputs": [
            {"logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]} for a in outputs["aux_outputs"]
        ],
    }
    theirs_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    if focal:
        matcher = loss_module.DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
        theirs = loss_module.DeformableDetrImageLoss(matcher, K, 0.25, ["labels", "boxes", "cardinality"])
    else:
        matcher = loss_module.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
        theirs = loss_module.ImageLoss(matcher, K, 0.1, ["labels", "boxes", "cardinality"])
    expected = theirs(theirs_outputs, theirs_targets)
    ours = criterion(outputs, targets)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(ours[k], expected[k])
        torch.testing.assert_close(ours[f"aux/0/{k}"], expected[f"{k}_0"])
    if not focal:  # (Deformable DETR's cardinality counts queries whose argmax is not the last real class)
        torch.testing.assert_close(ours["cardinality_error"], expected["cardinality_error"])


def test_num_boxes_averaged_over_processes(tmp_path):
    # A one-process group runs the all_reduce path; the loss must equal the one without a process group.
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    outputs, targets = make_batch([2, 3])
    criterion = make_criterion()
    expected = criterion(outputs, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        losses = criterion(outputs, targets)
    finally:
        dist.destroy_process_group()
    for k in ("loss", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[k], expected[k])
