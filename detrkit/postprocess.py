"""From a DETR's raw outputs to detections in the dataset's category ids and the original image's pixels.

Softmax models (DETR): a query's score is its best real-class probability, the no-object class excluded
(official DETR ``PostProcess``). Sigmoid models (Deformable / Conditional DETR): the top ``top_k`` (query,
class) pairs over all Q·K sigmoid scores, so one query may give several detections with different classes
(official Deformable DETR ``PostProcess``).

Tensors: B batch, Q queries, K classes, n detections kept for an image.

Layer: building blocks. May import ``box_ops`` and ``labels``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detrkit.box_ops import box_cxcywh_to_xyxy
from detrkit.labels import LabelMap

__all__ = ["postprocess"]


@torch.no_grad()
def postprocess(
    outputs: dict[str, Tensor],
    orig_sizes: Tensor,
    *,
    label_map: LabelMap | None = None,
    threshold: float = 0.0,
    top_k: int = 100,
    focal: bool = False,
) -> list[dict[str, Tensor]]:
    """Turn model outputs into per-image detections.

    Args:
        outputs: ``pred_logits`` (B, Q, K+1), or (B, Q, K) with ``focal``, and ``pred_boxes`` (B, Q, 4)
            normalised cxcywh relative to the unpadded image.
        orig_sizes: (B, 2) [h, w] of the original images, in pixels.
        label_map: maps contiguous labels to dataset category ids; ``None`` returns the contiguous labels.
        threshold: keep detections with a score strictly above it.
        top_k: at most this many detections per image (softmax: the best queries; focal: the best
            (query, class) pairs).
        focal: sigmoid scores over K classes instead of a softmax over K+1.

    Returns:
        B dicts with ``scores`` (n,), ``labels`` (n,) int64 category ids and ``boxes`` (n, 4) absolute xyxy
        pixels of the original image, clamped to it; sorted by score, best first.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    batch, num_queries, num_logits = logits.shape
    if orig_sizes.shape != (batch, 2):
        raise ValueError(f"orig_sizes must be (B, 2) = ({batch}, 2) [h, w], got {tuple(orig_sizes.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")

    if focal:
        prob = logits.float().sigmoid().flatten(1)  # (B, Q·K)
        scores, flat_idx = prob.topk(min(top_k, prob.shape[1]), dim=1)  # (B, k), sorted
        query_idx, labels = flat_idx // num_logits, flat_idx % num_logits  # (B, k)
    else:
        prob = logits.float().softmax(-1)[..., :-1]  # (B, Q, K) no-object dropped
        best, best_label = prob.max(-1)  # (B, Q)
        scores, query_idx = best.topk(min(top_k, num_queries), dim=1)  # (B, k), sorted
        labels = best_label.gather(1, query_idx)  # (B, k)

    picked = boxes.float().gather(1, query_idx[..., None].expand(-1, -1, 4))  # (B, k, 4) normalised cxcywh
    height, width = orig_sizes.to(picked).unbind(1)  # (B,), (B,)
    scale = torch.stack([width, height, width, height], dim=1)[:, None, :]  # (B, 1, 4)
    xyxy = torch.minimum(box_cxcywh_to_xyxy(picked).clamp(min=0) * scale, scale)  # (B, k, 4) in the image
    if label_map is not None:
        if label_map.num_classes != (num_logits if focal else num_logits - 1):
            raise ValueError(
                f"label_map has {label_map.num_classes} classes but pred_logits has {num_logits} "
                f"({'focal: K' if focal else 'softmax: K+1'})"
            )
        # Vectorised LabelMap.to_category_id: contiguous label i -> category_ids[i].
        labels = torch.tensor(label_map.category_ids, device=labels.device)[labels]

    # Scores are sorted, so the detections above the threshold are a prefix of each row.
    counts = (scores > threshold).sum(1).tolist()
    return [{"scores": scores[i, :n], "labels": labels[i, :n], "boxes": xyxy[i, :n]} for i, n in enumerate(counts)]
