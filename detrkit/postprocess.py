"""From a DETR's raw outputs to detections in the dataset's category ids and the original image's pixels.

Softmax models (DETR): a query's score is its best real-class probability, the no-object class excluded
(official DETR ``PostProcess``). Sigmoid models (Deformable / Conditional DETR): the top ``top_k`` (query,
class) pairs over all Q·K sigmoid scores, so one query may give several detections with different classes
(official Deformable DETR ``PostProcess``).

Models with a mask head (``pred_masks``, mask logits of the padded input at stride 4) also give instance masks
(``postprocess_instances``, the official ``PostProcessSegm``), a panoptic segment map (``postprocess_panoptic``,
the official ``PostProcessPanoptic``'s rules) and a semantic map (``postprocess_semantic``, transformers'
DETR semantic post-processing). Mask logits are brought to an image the same way in all three: upsampled
bilinearly by 4 to the padded input, the image's valid (unpadded) region cropped, then resized to the original
image size.

Tensors: B batch, Q queries, K classes, n detections kept for an image; h×w the mask logits' map, (H, W) an
image's size after the transforms (the valid region of the padded input), (H0, W0) its original size.

Layer: building blocks. May import ``box_ops``, ``labels`` and ``config`` (for its list of merging rules).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from detrkit.box_ops import box_cxcywh_to_xyxy
from detrkit.config import PANOPTIC_MERGES
from detrkit.labels import LabelMap

__all__ = ["postprocess", "postprocess_instances", "postprocess_panoptic", "postprocess_semantic"]

#: ``pred_masks`` is laid out at this stride of the padded input.
MASK_STRIDE = 4
# Masks brought to full resolution this many at a time (an 800x1216 float map is 3.9 MB).
_MASK_CHUNK = 16


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
    scores, labels, xyxy, _, counts = _select(outputs, orig_sizes, label_map, threshold, top_k, focal)
    return [{"scores": scores[i, :n], "labels": labels[i, :n], "boxes": xyxy[i, :n]} for i, n in enumerate(counts)]


def _select(
    outputs: dict[str, Tensor],
    orig_sizes: Tensor,
    label_map: LabelMap | None,
    threshold: float,
    top_k: int,
    focal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """``postprocess``'s detections as padded (B, k) rows: scores, labels, xyxy boxes, the query of each, and
    how many of each row are above ``threshold``."""
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
    return scores, labels, xyxy, query_idx, counts


@torch.no_grad()
def postprocess_instances(
    outputs: dict[str, Tensor],
    *,
    orig_sizes: Tensor,
    image_sizes: Tensor,
    label_map: LabelMap | None = None,
    threshold: float = 0.0,
    top_k: int = 100,
    focal: bool = False,
    mask_threshold: float = 0.5,
    padded_size: tuple[int, int] | None = None,
) -> list[dict[str, Tensor]]:
    """``postprocess``'s detections, each with a binary mask at the original image size.

    The official ``PostProcessSegm``: a detection's mask logits are upsampled bilinearly to the padded input,
    thresholded (sigmoid > ``mask_threshold``), cropped to the image's valid region and resized to the original
    size with nearest-neighbour sampling. With ``focal`` one query may give several detections; they share its
    mask.

    Args:
        outputs: as ``postprocess``, plus ``pred_masks`` (B, Q, h, w) mask logits of the padded input.
        orig_sizes: (B, 2) [h, w] of the original images.
        image_sizes: (B, 2) [h, w] of the images as the model saw them, before padding (``target["size"]``).
        label_map, threshold, top_k, focal: as ``postprocess``.
        mask_threshold: a pixel is in the mask when its sigmoid is strictly above this.
        padded_size: [h, w] of the padded input (``pixel_values``); default 4·(h, w), which it is for inputs
            padded to a multiple of 32 (``data.collate``).

    Returns:
        B dicts with ``scores``, ``labels``, ``boxes`` as ``postprocess`` and ``masks`` (n, H0, W0) bool.
    """
    scores, labels, xyxy, query_idx, counts = _select(outputs, orig_sizes, label_map, threshold, top_k, focal)
    pred_masks = _pred_masks(outputs)
    padded = _padded_size(pred_masks, padded_size)
    sizes = _image_sizes(image_sizes, len(counts), padded)
    results = []
    for i, n in enumerate(counts):
        orig = (int(orig_sizes[i, 0]), int(orig_sizes[i, 1]))
        masks = [
            F.interpolate(
                (_to_image(pred_masks[i, q], padded, sizes[i]).sigmoid() > mask_threshold)[:, None].float(),
                size=orig,
                mode="nearest",  # as the reference
            )[:, 0].bool()  # (k, H0, W0)
            for q in query_idx[i, :n].split(_MASK_CHUNK)
            if len(q)
        ]
        masks_i = torch.cat(masks) if masks else torch.zeros(0, *orig, dtype=torch.bool, device=pred_masks.device)
        results.append({"scores": scores[i, :n], "labels": labels[i, :n], "boxes": xyxy[i, :n], "masks": masks_i})
    return results


@torch.no_grad()
def postprocess_panoptic(
    outputs: dict[str, Tensor],
    *,
    orig_sizes: Tensor,
    image_sizes: Tensor,
    label_map: LabelMap,
    threshold: float = 0.85,
    min_area: int = 5,
    focal: bool = False,
    padded_size: tuple[int, int] | None = None,
    merge: str = "reference",
) -> list[dict[str, Any]]:
    """One panoptic segmentation per image: a segment-id map and what each segment is.

    The rules of the official ``PostProcessPanoptic`` (DETR Sec. 4.4 and appendix A.5):

    1. keep the queries whose best class is not no-object and scores more than ``threshold`` (focal models:
       whose best sigmoid score does; they have no no-object class);
    2. give every pixel of the image (its valid region, at the size the model saw) to the kept query with the
       highest mask logit (the reference takes the argmax of a softmax over queries: the same query);
    3. stuff queries of one class form one segment;
    4. resize the segment map to the original size (nearest, exactly as PIL's which the reference uses), drop the
       segments of fewer than ``min_area`` pixels there, giving their pixels to the remaining queries by
       running 2-4 again, until no segment is that small.

    ``merge="score"`` changes rule 2 only: a pixel goes to the kept query with the highest score × mask
    probability (Mask2Former's merging, Cheng et al. 2022), so that a low-scoring query's mask yields to a confident
    query's where they overlap; the reference compares mask logits alone.

    The reference merges stuff (3) only in its first pass, then drops the emptied duplicates as small and
    re-runs the argmax without them; here 3 holds in every pass, so a class's stuff pixels stay one segment.

    Args:
        outputs: ``pred_logits`` (B, Q, K+1), or (B, Q, K) with ``focal``, and ``pred_masks`` (B, Q, h, w).
        orig_sizes: (B, 2) [h, w] of the original images.
        image_sizes: (B, 2) [h, w] of the images as the model saw them, before padding.
        label_map: the model's classes, with ``isthing`` flags.
        threshold: a query is kept when its score is strictly above it (the reference's 0.85).
        min_area: segments with fewer pixels at the original size are dropped; 5 is the reference's rule
            (it drops segments of 4 pixels or less).
        focal: sigmoid scores over K classes instead of a softmax over K+1.
        padded_size: [h, w] of the padded input; default 4·(h, w).
        merge: ``"reference"`` (rule 2 as above) or ``"score"`` (score-weighted mask probabilities).

    Returns:
        B dicts: ``segments`` (H0, W0) int32 segment ids, 0 where no segment is (void); ``segments_info``, one
        dict per segment in id order (1, 2, ...): ``id``, ``category_id`` (dataset id), ``isthing``, ``score``
        (the best score of its queries) and ``area`` (pixels at the original size).
    """
    logits = outputs["pred_logits"].float()
    batch, _, num_logits = logits.shape
    num_classes = num_logits if focal else num_logits - 1
    if label_map.num_classes != num_classes:
        raise ValueError(
            f"label_map has {label_map.num_classes} classes but pred_logits has {num_logits} "
            f"({'focal: K' if focal else 'softmax: K+1'})"
        )
    if label_map.isthing is None:
        raise ValueError(
            "panoptic post-processing needs to know which classes are things and which are stuff: the label map "
            "has no isthing flags (train on panoptic annotations, whose categories carry isthing)"
        )
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    if merge not in PANOPTIC_MERGES:
        raise ValueError(f"merge must be one of {PANOPTIC_MERGES}, got {merge!r}")
    pred_masks = _pred_masks(outputs)
    padded = _padded_size(pred_masks, padded_size)
    sizes = _image_sizes(image_sizes, batch, padded)
    _check_orig_sizes(orig_sizes, batch)
    device = logits.device
    isthing_of = torch.tensor(label_map.isthing, dtype=torch.bool, device=device)
    category_of = torch.tensor(label_map.category_ids, dtype=torch.int64, device=device)

    results = []
    for i in range(batch):
        if focal:
            scores, labels = logits[i].sigmoid().max(-1)  # (Q,), (Q,)
            keep = scores > threshold
        else:
            scores, labels = logits[i].softmax(-1).max(-1)  # (Q,) over K+1: no-object can win
            keep = (labels != num_classes) & (scores > threshold)
        kept = keep.nonzero()[:, 0]  # (n,) in query order
        orig = (int(orig_sizes[i, 0]), int(orig_sizes[i, 1]))
        mask_logits = _to_image_chunked(pred_masks[i, kept], padded, sizes[i])  # (n, H, W)
        if merge == "score":
            # log(score · sigmoid(logit)): the argmax of the product, in logs so that tiny probabilities stay ordered
            mask_logits = F.logsigmoid(mask_logits) + scores[kept].log()[:, None, None]
        segments, info = _panoptic_segments(
            mask_logits, scores[kept], labels[kept], isthing_of, category_of, orig, min_area
        )
        results.append({"segments": segments, "segments_info": info})
    return results


def _panoptic_segments(
    mask_logits: Tensor,
    scores: Tensor,
    labels: Tensor,
    isthing_of: Tensor,
    category_of: Tensor,
    orig: tuple[int, int],
    min_area: int,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Steps 2-4 of ``postprocess_panoptic`` for one image's n kept queries (``mask_logits`` (n, H, W))."""
    n = len(labels)
    alive = torch.ones(n, dtype=torch.bool, device=labels.device)
    while True:
        idx = alive.nonzero()[:, 0]  # (m,) the queries still in play
        if len(idx) == 0:
            return torch.zeros(orig, dtype=torch.int32, device=labels.device), []
        winner = mask_logits[idx].argmax(0)  # (H, W) in 0..m-1; ties go to the first query
        rep = _representatives(labels[idx], isthing_of[labels[idx]])  # (m,) each query's segment
        segment = rep[winner]  # (H, W)
        segment = _resize_nearest_like_pil(segment, orig)
        area = torch.bincount(segment.flatten(), minlength=len(idx))  # (m,) non-zero on representatives only
        is_rep = rep == torch.arange(len(idx), device=rep.device)
        small = is_rep & (area < min_area)
        if not small[rep].any():
            break
        alive[idx[small[rep]]] = False  # every query of a small segment
    reps = is_rep.nonzero()[:, 0]  # (s,) in query order
    ids = torch.zeros(len(idx), dtype=torch.int32, device=rep.device)
    ids[reps] = torch.arange(1, len(reps) + 1, dtype=torch.int32, device=rep.device)
    member_scores = scores[idx]
    best = torch.full((len(idx),), -1.0, device=rep.device).scatter_reduce(0, rep, member_scores, "amax")
    info = [
        {
            "id": k + 1,
            "category_id": int(category_of[labels[idx[r]]]),
            "isthing": bool(isthing_of[labels[idx[r]]]),
            "score": float(best[r]),
            "area": int(area[r]),
        }
        for k, r in enumerate(reps.tolist())
    ]
    return ids[segment], info


def _resize_nearest_like_pil(ids: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) → ``size`` by nearest neighbour, exactly as PIL's ``resize(NEAREST)`` in the reference.

    PIL (``ImagingScaleAffine``) samples source pixel ``int(x)`` where x starts at ``step / 2`` and grows by
    ``step = in / out`` per output pixel, summed in double precision; torch's ``nearest-exact`` means the same
    but rounds differently where x lands near an integer (e.g. 2 → 7 pixels), so the sum is replayed here.
    """

    def index(n_in: int, n_out: int) -> Tensor:
        step, position, rows = n_in / n_out, 0.0, []
        position += step * 0.5
        for _ in range(n_out):
            rows.append(min(int(position), n_in - 1))
            position += step
        return torch.tensor(rows, dtype=torch.int64, device=ids.device)

    return ids[index(ids.shape[0], size[0])][:, index(ids.shape[1], size[1])]


def _representatives(labels: Tensor, isthing: Tensor) -> Tensor:
    """For m queries: the index of the first query of its segment (itself, or the first stuff query of its class)."""
    m = len(labels)
    position = torch.arange(m, device=labels.device)
    same_stuff = (labels[:, None] == labels[None, :]) & ~isthing[:, None] & ~isthing[None, :]  # (m, m)
    # The first j with same_stuff[i, j] (i itself for things: the diagonal of a thing is False).
    first = torch.where(same_stuff, position[None, :], m).min(1).values
    return torch.where(isthing, position, first)


@torch.no_grad()
def postprocess_semantic(
    outputs: dict[str, Tensor],
    *,
    orig_sizes: Tensor,
    image_sizes: Tensor,
    label_map: LabelMap | None = None,
    focal: bool = False,
    padded_size: tuple[int, int] | None = None,
) -> list[Tensor]:
    """A class for every pixel: the one maximising Σ_q p_q(class) · sigmoid(mask_q) over all queries.

    transformers' DETR semantic post-processing: class probabilities (softmax without no-object, or sigmoid
    with ``focal``) weight the queries' mask probabilities; the per-class maps are upsampled bilinearly to the
    padded input, cropped to the image's valid region and resized bilinearly to the original size before the
    argmax (ties: the lower label).

    Args:
        outputs: ``pred_logits`` and ``pred_masks`` as ``postprocess_panoptic``.
        orig_sizes, image_sizes, padded_size, focal: as ``postprocess_panoptic``.
        label_map: maps labels to dataset category ids; ``None`` returns contiguous labels.

    Returns:
        B (H0, W0) int64 maps of category ids.
    """
    logits = outputs["pred_logits"].float()
    batch, _, num_logits = logits.shape
    prob = logits.sigmoid() if focal else logits.softmax(-1)[..., :-1]  # (B, Q, K)
    num_classes = prob.shape[-1]
    if label_map is not None and label_map.num_classes != num_classes:
        raise ValueError(
            f"label_map has {label_map.num_classes} classes but pred_logits has {num_logits} "
            f"({'focal: K' if focal else 'softmax: K+1'})"
        )
    pred_masks = _pred_masks(outputs)
    padded = _padded_size(pred_masks, padded_size)
    sizes = _image_sizes(image_sizes, batch, padded)
    _check_orig_sizes(orig_sizes, batch)
    results = []
    for i in range(batch):
        mask_prob = pred_masks[i].float().sigmoid()  # (Q, h, w)
        orig = (int(orig_sizes[i, 0]), int(orig_sizes[i, 1]))
        best = torch.full(orig, -1.0, device=logits.device)
        label = torch.zeros(orig, dtype=torch.int64, device=logits.device)
        # Classes a chunk at a time: the per-class maps at full size would be K·H0·W0 floats.
        for start in range(0, num_classes, _MASK_CHUNK):
            class_prob = prob[i, :, start : start + _MASK_CHUNK]  # (Q, k)
            score = torch.einsum("qk,qhw->khw", class_prob, mask_prob)  # (k, h, w)
            score = _to_image(score, padded, sizes[i])  # (k, H, W)
            score = F.interpolate(score[None], size=orig, mode="bilinear", align_corners=False)[0]  # (k, H0, W0)
            value, arg = score.max(0)
            better = value > best  # strict: an earlier class keeps a tie
            best = torch.where(better, value, best)
            label = torch.where(better, arg + start, label)
        if label_map is not None:
            label = torch.tensor(label_map.category_ids, device=label.device)[label]
        results.append(label)
    return results


def _pred_masks(outputs: dict[str, Tensor]) -> Tensor:
    masks = outputs.get("pred_masks")
    if masks is None:
        raise ValueError("outputs have no 'pred_masks': mask post-processing needs a model built with masks=True")
    if masks.dim() != 4 or masks.shape[:2] != outputs["pred_logits"].shape[:2]:
        raise ValueError(
            f"pred_masks must be (B, Q, h, w) with the B, Q of pred_logits {tuple(outputs['pred_logits'].shape[:2])}"
            f", got {tuple(masks.shape)}"
        )
    return masks


def _padded_size(pred_masks: Tensor, padded_size: Any) -> tuple[int, int]:
    if padded_size is None:
        return MASK_STRIDE * pred_masks.shape[-2], MASK_STRIDE * pred_masks.shape[-1]
    height, width = (int(v) for v in padded_size)
    if height < 1 or width < 1:
        raise ValueError(f"padded_size must be positive [h, w], got {padded_size}")
    return height, width


def _image_sizes(image_sizes: Tensor, batch: int, padded: tuple[int, int]) -> list[tuple[int, int]]:
    sizes = torch.as_tensor(image_sizes)
    if sizes.shape != (batch, 2):
        raise ValueError(f"image_sizes must be (B, 2) = ({batch}, 2) [h, w], got {tuple(sizes.shape)}")
    out = [(int(h), int(w)) for h, w in sizes.tolist()]
    for h, w in out:
        if not (0 < h <= padded[0] and 0 < w <= padded[1]):
            raise ValueError(f"image size {h}x{w} is not within the padded input {padded[0]}x{padded[1]}")
    return out


def _check_orig_sizes(orig_sizes: Tensor, batch: int) -> None:
    if orig_sizes.shape != (batch, 2):
        raise ValueError(f"orig_sizes must be (B, 2) = ({batch}, 2) [h, w], got {tuple(orig_sizes.shape)}")


def _to_image(mask_logits: Tensor, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(n, h, w) maps → (n, H, W): bilinear to the padded input, then its valid top-left region."""
    if len(mask_logits) == 0:  # interpolate refuses empty inputs
        return mask_logits.new_zeros(0, *size, dtype=torch.float32)
    up = F.interpolate(mask_logits.float()[None], size=padded, mode="bilinear", align_corners=False)[0]
    return up[:, : size[0], : size[1]]


def _to_image_chunked(mask_logits: Tensor, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``_to_image`` a few maps at a time (the padded maps are larger than the crops kept)."""
    if len(mask_logits) == 0:
        return _to_image(mask_logits, padded, size)
    return torch.cat([_to_image(chunk, padded, size) for chunk in mask_logits.split(_MASK_CHUNK)])
