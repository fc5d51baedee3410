import pytest
import torch
import torchvision

from detrkit.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)


def random_xyxy(n: int, *, generator: torch.Generator) -> torch.Tensor:
    top_left = torch.rand(n, 2, generator=generator)
    return torch.cat([top_left, top_left + 0.01 + torch.rand(n, 2, generator=generator)], dim=1)


def degenerate_xyxy() -> torch.Tensor:
    return torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5],  # a point
            [0.2, 0.2, 0.2, 0.8],  # a vertical segment
            [0.8, 0.8, 0.2, 0.2],  # x2 < x1 and y2 < y1
            [0.3, 0.1, 0.1, 0.9],  # x2 < x1 only
            [0.0, 0.0, 0.0, 0.0],
            [0.1, 0.1, 0.4, 0.4],  # a normal box, for pairs with the degenerate ones
        ]
    )


def test_cxcywh_xyxy_round_trip_any_leading_shape():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(3, 5, 4, generator=g)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)


def test_conversion_hand_computed():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def test_area_and_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    torch.testing.assert_close(box_area(b), torch.tensor([4.0, 1.0]))
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 5.0]]))


def test_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    # Overlap 1, union 7, enclosing 3×3: 1/7 - 2/9. Disjoint, union 2, enclosing 3×1: 0 - 1/3.
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), torch.tensor([1 / 7 - 2 / 9, -1 / 3]))
    # Touching boxes and far-apart boxes.
    far = torch.tensor([[1000.0, 1000.0, 1001.0, 1001.0]])
    assert generalized_box_iou(a[1:], far).item() == pytest.approx(-1, abs=1e-5)


def test_giou_identical_is_one_and_matches_torchvision_on_valid_boxes():
    g = torch.Generator().manual_seed(1)
    a, b = random_xyxy(7, generator=g), random_xyxy(5, generator=g)
    torch.testing.assert_close(elementwise_generalized_box_iou(a, a), torch.ones(7))
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))
    torch.testing.assert_close(box_iou(a, b)[0], torchvision.ops.box_iou(a, b))


def test_giou_bounds_including_degenerate_boxes():
    g = torch.Generator().manual_seed(2)
    boxes = torch.cat([random_xyxy(50, generator=g), degenerate_xyxy(), torch.randn(50, 4, generator=g)])
    giou = generalized_box_iou(boxes, boxes)
    assert torch.isfinite(giou).all()
    assert giou.min() >= -1 - 1e-6 and giou.max() <= 1 + 1e-6
    iou, union = box_iou(boxes, boxes)
    assert torch.isfinite(iou).all() and (iou >= 0).all() and (iou <= 1 + 1e-6).all() and (union >= 0).all()


def test_elementwise_equals_diagonal_and_broadcasts_over_coordinate_planes():
    g = torch.Generator().manual_seed(3)
    a = torch.cat([random_xyxy(6, generator=g), degenerate_xyxy()])
    b = torch.cat([random_xyxy(6, generator=g), degenerate_xyxy().flip(0)])
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), generalized_box_iou(a, b).diagonal())
    # Coordinates first, as the matcher passes them: (4, N, 1) against (4, 1, M) is the pairwise matrix.
    planes = elementwise_generalized_box_iou(a.t()[:, :, None], b.t()[:, None, :], dim=0)
    torch.testing.assert_close(planes, generalized_box_iou(a, b))


def test_degenerate_boxes_have_finite_gradients():
    pred = degenerate_xyxy().requires_grad_()
    target = degenerate_xyxy().flip(0)
    loss = (1 - elementwise_generalized_box_iou(pred, target)).sum() + (1 - generalized_box_iou(pred, pred)).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_giou_gradient_is_correct():
    # The implementation clamps in place; gradcheck confirms autograd still sees the right function.
    g = torch.Generator().manual_seed(4)
    a = random_xyxy(4, generator=g).double().requires_grad_()
    b = random_xyxy(4, generator=g).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: elementwise_generalized_box_iou(x, y), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: generalized_box_iou(x, y), (a, b))
