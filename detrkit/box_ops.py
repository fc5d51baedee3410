"""Pure box functions: format conversions, areas, IoU and generalised IoU.

Formats: ``cxcywh`` is (centre x, centre y, width, height), ``xyxy`` is (x1, y1, x2, y2). Inside the model
boxes are normalised cxcywh; IoU-type functions take xyxy. Every function accepts any leading dimensions
unless its docstring gives a fixed shape.

Degenerate boxes (x2 < x1 or y2 < y1, zero area) are expected from a model early in training, so nothing here
asserts on data (the official DETR ``generalized_box_iou`` asserts ``x2 >= x1``, which crashes a diverging
run) and nothing returns NaN or inf: widths and heights are clamped at 0, so a degenerate box has zero area
and no overlap, and unions and enclosing areas are clamped at ``eps`` before dividing. ``torchvision.ops``
computes areas without the clamp (negative for degenerate boxes) and divides without an eps, which is why
these are written out here.

Layer: building blocks. Imports torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Smallest union / enclosing area divided by. Far below any real box: a 1×1 pixel box in a normalised
# 1333-pixel image has area ~5.6e-7.
EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor, *, dim: int = -1) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2). ``boxes`` (..., 4) -> (..., 4), or coordinates along ``dim``."""
    center, size = boxes.split(2, dim)
    half = 0.5 * size
    return torch.cat([center - half, center + half], dim)


def box_xyxy_to_cxcywh(boxes: Tensor, *, dim: int = -1) -> Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h). ``boxes`` (..., 4) -> (..., 4), or coordinates along ``dim``."""
    top_left, bottom_right = boxes.split(2, dim)
    return torch.cat([0.5 * (top_left + bottom_right), bottom_right - top_left], dim)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes, 0 for degenerate ones. ``boxes`` (..., 4) -> (...)."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _inter_union(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of broadcastable xyxy boxes given as coordinate planes (x1, y1, x2, y2)."""
    # Per-coordinate planes: with the coordinates last, slicing [..., 2:] gives size-2 inner loops, which are
    # several times slower than the same arithmetic on whole planes (the matcher passes contiguous planes).
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    inter_w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_(min=0)
    inter_h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_(min=0)
    inter = inter_w * inter_h
    area_a = (ax2 - ax1).clamp_(min=0) * (ay2 - ay1).clamp_(min=0)
    area_b = (bx2 - bx1).clamp_(min=0) * (by2 - by1).clamp_(min=0)
    # Clamped widths make inter <= min(area_a, area_b), so union >= 0 even for degenerate boxes.
    return inter, area_a + area_b - inter


def _giou(a: Tensor, b: Tensor, eps: float, dim: int = -1) -> Tensor:
    """GIoU of broadcastable xyxy boxes with coordinates along ``dim``, behind both public versions.

    Rezatofighi et al. 2019, "Generalized Intersection over Union", Algorithm 1.
    """
    a_planes, b_planes = a.unbind(dim), b.unbind(dim)
    inter, union = _inter_union(a_planes, b_planes)
    union = union.clamp_(min=eps)
    ax1, ay1, ax2, ay2 = a_planes
    bx1, by1, bx2, by2 = b_planes
    # The smallest box enclosing both. Its sides are at least each box's clamped sides, so enclosing >= union
    # (up to the eps clamps), which keeps GIoU in [-1, 1].
    enclosing_w = (torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)).clamp_(min=0)
    enclosing_h = (torch.maximum(ay2, by2) - torch.minimum(ay1, by1)).clamp_(min=0)
    enclosing = (enclosing_w * enclosing_h).clamp_(min=eps)
    return inter / union - (enclosing - union) / enclosing


def box_iou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.
        eps: lower bound of the union used as the divisor.

    Returns:
        ``(iou (N, M), union (N, M))``; the union is unclamped (official DETR returns it too, for GIoU).
    """
    inter, union = _inter_union(boxes1[:, None, :].unbind(-1), boxes2[None, :, :].unbind(-1))  # (N, M)
    return inter / union.clamp(min=eps), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes, in [-1, 1]; 1 for identical non-degenerate boxes.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.
        eps: lower bound of unions and enclosing areas used as divisors.

    Returns:
        (N, M)
    """
    return _giou(boxes1[:, None, :], boxes2[None, :, :], eps)  # (N, M)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, *, eps: float = EPS, dim: int = -1) -> Tensor:
    """Generalised IoU of corresponding xyxy boxes: ``generalized_box_iou(a, b).diagonal()`` in O(N).

    The official DETR loss takes the diagonal of the full N×N matrix; this computes only the N pairs it uses.
    Other dimensions broadcast, and ``dim`` says which one holds the 4 coordinates: the matcher passes
    per-image blocks as coordinate planes, (4, N, Q) against (4, N, 1) with ``dim=0``.

    Args:
        boxes1: (N, 4) xyxy, or any shape with 4 coordinates along ``dim`` that broadcasts with ``boxes2``.
        boxes2: (N, 4) xyxy, or any shape with 4 coordinates along ``dim`` that broadcasts with ``boxes1``.
        eps: lower bound of unions and enclosing areas used as divisors.
        dim: the coordinate dimension.

    Returns:
        (N,): the broadcast shape without ``dim``.
    """
    return _giou(boxes1, boxes2, eps, dim)
