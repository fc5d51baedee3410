"""Where a detector fails: a TIDE-style error breakdown per class and overall, a class confusion matrix, and the
pictures (precision-recall curves, error bars, confusion matrix) as PNG files.

Error types (Bolya et al. 2020, "TIDE: A General Toolbox for Identifying Object Detection Errors", Sec. 2), at a
foreground IoU ``pos_thr`` (0.5) and a background IoU ``bg_thr`` (0.1). A detection that does not match is
typed by the first rule that holds, in TIDE's order:

* **bkg** (background): the image holds no object, or the detection overlaps every object by IoU ≤ ``bg_thr``
  (checked again after the three rules below, which need some overlap);
* **loc** (localisation): its best IoU with an object of its own class lies in [``bg_thr``, ``pos_thr``];
* **cls** (classification): it overlaps an object of another class by IoU ≥ ``pos_thr``;
* **dupe** (duplicate): it overlaps, by IoU ≥ ``pos_thr``, an object of its class that a higher-scored detection
  already matched;
* **both** (classification and localisation): what remains, an overlap in (``bg_thr``, ``pos_thr``) with an
  object of another class only;

and an object no detection matches is **miss**\\ ed unless a cls or loc detection would match it once fixed. What
each type costs is ΔAP50: the AP50 after fixing every error of that type alone, minus the AP50 as it is. Fixing a
cls or loc error gives the detection the right class or box, so that it matches its object if no other detection
does (the first by score takes it) and is dropped otherwise; fixing dupe, bkg and both drops the detection; fixing
a miss drops the object. The two oracles of the paper are reported too: ``FP`` drops every false positive and
``FN`` every unmatched object.

The matching itself is COCOeval's at IoU 0.5 (area "all", ``maxDets`` = 100 per image and class; crowd regions
ignored as it ignores them), so the AP50 before fixing equals the ``AP50`` of ``scoring.CocoEvaluator`` for every
class and overall; TIDE's own code matches per image across classes instead, which gives slightly different
numbers. The error typing looks at every non-crowd object of the image, whatever its class.

The confusion matrix counts, over the detections with a score ≥ ``score_threshold`` (by default the score at which
the F1 of all detections is highest: the detector's best operating point), which object each one found: a
detection takes the unmatched object of its own class with the highest IoU ≥ 0.5, else that of any class; rows
are the objects' classes and a last "background" row (detections that found nothing), columns the detections'
classes and a last "background" column (objects nothing found).

Inputs are columns (``scoring.CocoEvaluator.detection_columns`` and ``_GroundTruth.columns``): ground truth
``image_id``, ``category_id`` (G,), ``bbox`` (G, 4) COCO xywh, ``iscrowd`` (G,); detections ``image_id``,
``category_id``, ``score`` (N,) and ``bbox`` (N, 4) xywh; for segm ``segmentation`` (COCO RLE dicts) instead of
``bbox`` on both sides. Outputs are JSON-ready dicts (``metrics.json``'s ``errors``) and PNG files.

Layer: analysis (below scoring, which calls it; above io). Imports numpy; matplotlib and hotcoco (mask IoU for
segm) when used; never torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ERROR_TYPES", "analyse", "format_errors", "format_per_class", "save_plots"]

#: The six TIDE error types, in the paper's order.
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
_RECALL_POINTS = np.linspace(0.0, 1.00, 101)  # COCO's recThrs
_NO_MATCH = -1


def analyse(
    gt: Mapping[str, Any],
    detections: Mapping[str, Any],
    categories: Mapping[int, str],
    *,
    image_ids: Sequence[int] | None = None,
    pos_thr: float = 0.5,
    bg_thr: float = 0.1,
    max_dets: int = 100,
    score_threshold: float | None = None,
) -> dict[str, Any]:
    """The error breakdown and the confusion matrix of ``detections`` against ``gt``.

    Args:
        gt: ground-truth columns (see the module's docstring).
        detections: detection columns.
        categories: category id -> name, of the classes scored (detections of other ids are left out).
        image_ids: the images scored (None: every image with ground truth or detections).
        pos_thr, bg_thr: TIDE's foreground and background IoU thresholds.
        max_dets: detections kept per image and class, best first (COCO's 100).
        score_threshold: the confusion matrix's minimum score; None: the score at which the detections' F1 over
            all classes (IoU 0.5, COCO's matching) is highest, so that the matrix shows the detector at its best
            operating point whatever its score scale (a focal-loss model's scores are often all below 0.5).

    Returns:
        ``{"settings": {...}, "overall": {"AP50", "dAP50": {type: ΔAP50}, "dAP50_oracle": {"FP", "FN"},
        "counts": {"correct", type: n}}, "per_class": {name: {"category_id", the same keys}},
        "confusion": {"labels": [names..., "background"], "category_ids": [...], "matrix": [[int]],
        "iou_threshold", "score_threshold"}}``. AP values are -1 for a class without objects and are left out
        of the overall means.
    """
    if not 0 <= bg_thr <= pos_thr <= 1:
        raise ValueError(f"thresholds must satisfy 0 <= bg_thr <= pos_thr <= 1, got bg_thr={bg_thr}, pos_thr={pos_thr}")
    segm = "segmentation" in detections
    cat_ids = sorted(categories)
    cat_index = {c: k for k, c in enumerate(cat_ids)}
    gt_by_image = _group(gt["image_id"])
    dt_by_image = _group(detections["image_id"])
    if image_ids is None:
        image_ids = sorted(set(gt_by_image) | set(dt_by_image))
    table = _Table(len(cat_ids))
    confusion = np.zeros((len(cat_ids) + 1, len(cat_ids) + 1), dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    images = []  # what the confusion matrix needs of each image, once the threshold is known
    for image_id in sorted(set(image_ids)):
        g = gt_by_image.get(image_id, empty)
        d = dt_by_image.get(image_id, empty)
        g = g[np.isin(gt["category_id"][g], cat_ids)]
        d = d[np.isin(detections["category_id"][d], cat_ids)]
        gt_cls = np.array([cat_index[c] for c in gt["category_id"][g]], dtype=np.int64)
        dt_cls = np.array([cat_index[c] for c in detections["category_id"][d]], dtype=np.int64)
        crowd = gt["iscrowd"][g].astype(bool)
        scores = detections["score"][d].astype(np.float64)
        ious = _ious(detections, d, gt, g, crowd, segm)  # (n, g) COCO IoU, crowd columns over the detection's area
        _image_errors(table, ious, scores, dt_cls, gt_cls, crowd, pos_thr, bg_thr, max_dets)
        images.append((ious, scores, dt_cls, gt_cls, crowd))
    if score_threshold is None:
        score_threshold = table.best_f1_score()
    for ious, scores, dt_cls, gt_cls, crowd in images:
        _image_confusion(confusion, ious, scores, dt_cls, gt_cls, crowd, score_threshold, pos_thr, max_dets)
    return {
        "settings": {
            "iou_type": "segm" if segm else "bbox",
            "pos_thr": pos_thr,
            "bg_thr": bg_thr,
            "max_dets": max_dets,
            "images": len(set(image_ids)),
        },
        **table.summary([categories[c] for c in cat_ids], cat_ids),
        "confusion": {
            "labels": [categories[c] for c in cat_ids] + ["background"],
            "category_ids": cat_ids,
            "matrix": confusion.tolist(),
            "iou_threshold": pos_thr,
            "score_threshold": score_threshold,
        },
    }


def _group(image_ids: np.ndarray) -> dict[int, np.ndarray]:
    """Row indices per image id, each in the rows' order."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    order = np.argsort(image_ids, kind="stable")
    ids, starts = np.unique(image_ids[order], return_index=True)
    return dict(zip(ids.tolist(), np.split(order, starts[1:]), strict=True))


def _ious(
    detections: Mapping[str, Any], d: np.ndarray, gt: Mapping[str, Any], g: np.ndarray, crowd: np.ndarray, segm: bool
) -> np.ndarray:
    """(n, g) IoU as pycocotools computes it (``maskApi.c``'s ``bbIou``, the same float64 operations, so that
    matches at exactly the threshold fall the same way); a crowd region's column is intersection / detection."""
    if not len(d) or not len(g):
        return np.zeros((len(d), len(g)))
    if segm:
        from hotcoco import mask

        return np.asarray(
            mask.iou(
                [detections["segmentation"][i] for i in d],
                [gt["segmentation"][i] for i in g],
                [int(c) for c in crowd],
            ),
            dtype=np.float64,
        ).reshape(len(d), len(g))
    db = detections["bbox"][d].astype(np.float64)  # (n, 4) xywh
    gb = gt["bbox"][g].astype(np.float64)  # (g, 4) xywh
    da = (db[:, 2] * db[:, 3])[:, None]
    ga = (gb[:, 2] * gb[:, 3])[None, :]
    w = np.minimum(db[:, None, 2] + db[:, None, 0], gb[None, :, 2] + gb[None, :, 0]) - np.maximum(
        db[:, None, 0], gb[None, :, 0]
    )
    h = np.minimum(db[:, None, 3] + db[:, None, 1], gb[None, :, 3] + gb[None, :, 1]) - np.maximum(
        db[:, None, 1], gb[None, :, 1]
    )
    inter = w * h
    union = np.where(crowd[None, :], da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


class _Table:
    """Per class: the scored detections (score, whether a TP, what each fix turns it into) and object counts."""

    def __init__(self, num_classes: int) -> None:
        self.k = num_classes
        # per class, lists of per-image arrays, concatenated at the end in image order (COCOeval's order)
        self.scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.tp: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.kind: list[list[np.ndarray]] = [[] for _ in range(num_classes)]  # error type index, -1 for a TP
        self.fixed_tp: list[list[np.ndarray]] = [[] for _ in range(num_classes)]  # cls/loc: TP once fixed
        # TPs that fixing cls errors adds to the objects' classes: (class, score) per fixed detection
        self.cls_gain: list[list[float]] = [[] for _ in range(num_classes)]
        self.npos = np.zeros(num_classes, dtype=np.int64)
        self.missed = np.zeros(num_classes, dtype=np.int64)  # miss errors
        self.unmatched = np.zeros(num_classes, dtype=np.int64)  # every object without a match (the FN oracle)

    def best_f1_score(self) -> float:
        """The score threshold with the highest F1 over all classes' detections (0.5 without detections)."""
        scores = np.concatenate([np.concatenate(s) for s in self.scores if s] or [np.zeros(0)])
        tp = np.concatenate([np.concatenate(t) for t in self.tp if t] or [np.zeros(0, bool)])
        total = int(self.npos.sum())
        if not len(scores) or not total:
            return 0.5
        order = np.argsort(-scores, kind="mergesort")
        tps = np.cumsum(tp[order])
        f1 = 2 * tps / (np.arange(1, len(order) + 1) + total)  # 2PR/(P+R) = 2·TP/(detections + objects)
        return float(scores[order][int(np.argmax(f1))])

    def summary(self, names: list[str], cat_ids: list[int]) -> dict[str, Any]:
        scores = [np.concatenate(s) if s else np.zeros(0) for s in self.scores]
        tp = [np.concatenate(t) if t else np.zeros(0, bool) for t in self.tp]
        kind = [np.concatenate(t) if t else np.zeros(0, np.int64) for t in self.kind]
        fixed = [np.concatenate(t) if t else np.zeros(0, bool) for t in self.fixed_tp]
        base = np.array([_ap(scores[k], tp[k], self.npos[k]) for k in range(self.k)])
        after: dict[str, np.ndarray] = {}
        cls_i, loc_i = ERROR_TYPES.index("cls"), ERROR_TYPES.index("loc")
        for t, name in enumerate(ERROR_TYPES):
            values = np.empty(self.k)
            for k in range(self.k):
                if name == "miss":
                    values[k] = _ap_fewer_objects(scores[k], tp[k], self.npos[k], self.missed[k], base[k])
                    continue
                # a fixed loc detection keeps its place in the ranking as a TP; the others are dropped
                fixed_here = (kind[k] == t) & fixed[k] if t == loc_i else np.zeros(len(kind[k]), bool)
                keep = (kind[k] != t) | fixed_here
                s, p = scores[k][keep], (tp[k] | fixed_here)[keep]
                if t == cls_i and self.cls_gain[k]:  # detections of other classes that become this class's TPs
                    gain = np.asarray(self.cls_gain[k], dtype=np.float64)
                    s, p = np.concatenate([s, gain]), np.concatenate([p, np.ones(len(gain), bool)])
                values[k] = _ap(s, p, self.npos[k])
            after[name] = values
        fp_oracle = np.array([_ap(scores[k][tp[k]], tp[k][tp[k]], self.npos[k]) for k in range(self.k)])
        fn_oracle = np.array(
            [_ap_fewer_objects(scores[k], tp[k], self.npos[k], self.unmatched[k], base[k]) for k in range(self.k)]
        )

        def block(k: int | None) -> dict[str, Any]:
            sel = slice(None) if k is None else slice(k, k + 1)
            valid = base[sel] > -1
            ap = _mean(base[sel][valid])
            counts = {"correct": int(sum(t.sum() for t in tp[sel]))}
            for i, name in enumerate(ERROR_TYPES):
                if name == "miss":
                    counts[name] = int(self.missed[sel].sum())
                else:
                    counts[name] = int(sum((x == i).sum() for x in kind[sel]))
            return {
                "AP50": ap,
                "dAP50": {n: _delta(after[n][sel][valid], ap) for n in ERROR_TYPES},
                "dAP50_oracle": {"FP": _delta(fp_oracle[sel][valid], ap), "FN": _delta(fn_oracle[sel][valid], ap)},
                "counts": counts,
                "objects": int(self.npos[sel].sum()),
            }

        per_class = {}
        for k, (name, cat_id) in enumerate(zip(names, cat_ids, strict=True)):
            key = name if names.count(name) == 1 else f"{name} (id {cat_id})"
            per_class[key] = {"category_id": cat_id, **block(k)}
        return {"overall": block(None), "per_class": per_class}


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else -1.0


def _delta(values: np.ndarray, base: float) -> float:
    return float(np.mean(values) - base) if values.size and base > -1 else 0.0


def _ap_fewer_objects(scores: np.ndarray, tp: np.ndarray, npos: int, dropped: int, base: float) -> float:
    """AP with ``dropped`` objects fewer; a class left without objects keeps ``base`` (nothing would be scored)."""
    return _ap(scores, tp, npos - dropped) if npos - dropped > 0 else base


def _ap(scores: np.ndarray, tp: np.ndarray, npos: int) -> float:
    """COCO's 101-point interpolated AP of one class (``COCOeval.accumulate`` at one IoU threshold): detections
    in the order given (images in id order, each best first) sorted by score with a stable sort; -1 without
    objects."""
    if npos <= 0:
        return -1.0
    order = np.argsort(-scores, kind="mergesort")
    hits = tp[order]
    tps = np.cumsum(hits).astype(float)
    fps = np.cumsum(~hits).astype(float)
    recall = tps / npos
    precision = tps / (fps + tps + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    at = np.searchsorted(recall, _RECALL_POINTS, side="left")
    q = np.zeros(len(_RECALL_POINTS))
    inside = at < len(precision)
    q[inside] = precision[at[inside]]
    return float(np.mean(q))


def _coco_match(
    ious: np.ndarray, det_order: np.ndarray, gt_cols: np.ndarray, crowd: np.ndarray, thr: float
) -> np.ndarray:
    """COCOeval's greedy matching of one image and class (``evaluateImg``) at one IoU threshold.

    Args:
        ious: (n, g) of the whole image; det_order: the class's detections, best first; gt_cols: the class's
            objects, non-crowd first (each group in annotation order); crowd: (g,) of the whole image.

    Returns:
        (len(det_order),) the matched object's column in ``ious``, or -1.
    """
    matched = np.full(len(det_order), _NO_MATCH, dtype=np.int64)
    used = np.zeros(len(gt_cols), dtype=bool)
    limit = min(thr, 1 - 1e-10)
    for i, det in enumerate(det_order):
        best, m = limit, _NO_MATCH
        for j, col in enumerate(gt_cols):
            if used[j] and not crowd[col]:
                continue
            if m != _NO_MATCH and not crowd[gt_cols[m]] and crowd[col]:
                break  # a real object matched: crowd regions come after them
            if ious[det, col] < best:
                continue
            best, m = ious[det, col], j
        if m != _NO_MATCH:
            used[m] = True
            matched[i] = gt_cols[m]
    return matched


def _image_errors(
    table: _Table,
    ious: np.ndarray,
    scores: np.ndarray,
    dt_cls: np.ndarray,
    gt_cls: np.ndarray,
    crowd: np.ndarray,
    pos_thr: float,
    bg_thr: float,
    max_dets: int,
) -> None:
    """Match one image class by class as COCOeval does, type each false positive, and add them to ``table``."""
    real = ~crowd
    for k in np.unique(gt_cls[real]):
        table.npos[k] += int(np.sum(real & (gt_cls == k)))
    # COCOeval's order per class: best first (stable), the first max_dets kept; objects non-crowd first.
    kept: list[np.ndarray] = []
    matched_to = np.full(len(scores), _NO_MATCH, dtype=np.int64)
    for k in np.unique(np.concatenate([dt_cls, gt_cls])):
        dets = np.flatnonzero(dt_cls == k)
        dets = dets[np.argsort(-scores[dets], kind="mergesort")][:max_dets]
        kept.append(dets)
        cols = np.flatnonzero(gt_cls == k)
        cols = np.concatenate([cols[~crowd[cols]], cols[crowd[cols]]])
        if len(dets) and len(cols):
            matched_to[dets] = _coco_match(ious, dets, cols, crowd, pos_thr)
    if not kept:
        return
    dets = np.concatenate(kept)
    dets = dets[np.argsort(-scores[dets], kind="mergesort")]  # the image's detections best first, for the fixes
    gt_used = np.zeros(len(gt_cls), dtype=bool)
    gt_used[matched_to[matched_to != _NO_MATCH]] = True
    gt_used &= real
    claimed = np.zeros(len(gt_cls), dtype=bool)  # objects a fixed cls/loc detection would match
    same = dt_cls[:, None] == gt_cls[None, :]  # (n, g)
    real_ious = np.where(real[None, :], ious, 0.0)
    kind = np.full(len(scores), _NO_MATCH, dtype=np.int64)
    fixed_tp = np.zeros(len(scores), dtype=bool)
    index = {name: i for i, name in enumerate(ERROR_TYPES)}
    for det in dets:
        m = matched_to[det]
        if m != _NO_MATCH:
            if not crowd[m]:
                continue  # a true positive
            kind[det] = -2  # matched a crowd region: ignored, as COCOeval ignores it
            continue
        row, row_same = real_ious[det], np.where(same[det], real_ious[det], 0.0)
        row_other = np.where(same[det], 0.0, real_ious[det])
        if not real.any():
            kind[det] = index["bkg"]
            continue
        target = int(np.argmax(row_same))
        if bg_thr <= row_same[target] <= pos_thr and row_same[target] > 0:
            kind[det] = index["loc"]
            if not gt_used[target] and not claimed[target]:
                claimed[target] = fixed_tp[det] = True
            continue
        target = int(np.argmax(row_other))
        if row_other[target] >= pos_thr:
            kind[det] = index["cls"]
            if not gt_used[target] and not claimed[target]:
                claimed[target] = True
                table.cls_gain[gt_cls[target]].append(float(scores[det]))
            continue
        used_same = np.where(gt_used, row_same, 0.0)
        if used_same.max(initial=0.0) >= pos_thr:
            kind[det] = index["dupe"]
            continue
        if row.max(initial=0.0) <= bg_thr:
            kind[det] = index["bkg"]
            continue
        kind[det] = index["both"]
    for k in np.unique(dt_cls[dets]):
        mine = dets[(dt_cls[dets] == k) & (kind[dets] != -2)]
        mine = mine[np.argsort(-scores[mine], kind="mergesort")]
        table.scores[k].append(scores[mine])
        table.tp[k].append(kind[mine] == _NO_MATCH)
        table.kind[k].append(kind[mine])
        table.fixed_tp[k].append(fixed_tp[mine])
    lost = real & ~gt_used
    for k in np.unique(gt_cls[lost]):
        table.unmatched[k] += int(np.sum(lost & (gt_cls == k)))
        table.missed[k] += int(np.sum(lost & ~claimed & (gt_cls == k)))


def _image_confusion(
    confusion: np.ndarray,
    ious: np.ndarray,
    scores: np.ndarray,
    dt_cls: np.ndarray,
    gt_cls: np.ndarray,
    crowd: np.ndarray,
    score_threshold: float,
    iou_thr: float,
    max_dets: int,
) -> None:
    background = confusion.shape[0] - 1
    real = ~crowd
    dets = np.flatnonzero(scores >= score_threshold)
    dets = dets[np.argsort(-scores[dets], kind="mergesort")][:max_dets]
    taken = np.zeros(len(gt_cls), dtype=bool)
    for det in dets:
        free = real & ~taken & (ious[det] >= iou_thr)
        own = free & (gt_cls == dt_cls[det])
        candidates = own if own.any() else free
        if candidates.any():
            target = int(np.argmax(np.where(candidates, ious[det], -1.0)))
            taken[target] = True
            confusion[gt_cls[target], dt_cls[det]] += 1
        elif not (crowd & (ious[det] >= iou_thr)).any():  # inside a crowd region: neither right nor wrong
            confusion[background, dt_cls[det]] += 1
    for target in np.flatnonzero(real & ~taken):
        confusion[gt_cls[target], background] += 1


# ------------------------------------------------------------------------------------------------------------
# Text


def format_per_class(per_class: Mapping[str, Mapping[str, float]], *, limit: int | None = None) -> str:
    """The per-class table ``detrkit eval`` prints: one line per class, by AP (best first)."""
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    width = max([len("class"), *(len(n) for n in per_class)])
    rows = sorted(per_class.items(), key=lambda item: -item[1]["AP"])
    if limit is not None:
        rows = rows[:limit]
    lines = [f"{'class':<{width}} {'id':>4} {'objects':>7} " + " ".join(f"{k:>6}" for k in keys)]
    for name, row in rows:
        lines.append(
            f"{name:<{width}} {int(row['category_id']):>4} {int(row.get('instances', -1)):>7} "
            + " ".join(f"{row[k]:6.3f}" for k in keys)
        )
    return "\n".join(lines)


def format_errors(errors: Mapping[str, Any]) -> str:
    """The overall error breakdown in two lines: ΔAP50 and the count of each type."""
    overall = errors["overall"]
    head = f"errors (AP50 {overall['AP50']:.3f}; dAP50 = AP50 gained by fixing the type):"
    deltas = "  ".join(f"{t} {overall['dAP50'][t]:.3f}" for t in ERROR_TYPES)
    oracle = overall["dAP50_oracle"]
    counts = "  ".join(f"{t} {n}" for t, n in overall["counts"].items())
    return (
        f"{head}\n  dAP50   {deltas}   (every FP removed {oracle['FP']:.3f}, every FN {oracle['FN']:.3f})\n"
        f"  counts  {counts}"
    )


# ------------------------------------------------------------------------------------------------------------
# Pictures


def save_plots(metrics: Any, out_dir: str | os.PathLike, *, max_classes: int = 40) -> list[Path]:
    """Write the pictures of a ``CocoMetrics`` to ``out_dir``: ``pr_curves.png`` (overall and per class) when it
    carries the precision arrays, ``errors.png`` and ``confusion.png`` when it carries an error analysis.

    Args:
        max_classes: the most classes drawn one by one (those with the most objects; all are in the numbers).

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; leaves a backend the caller chose alone
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if getattr(metrics, "precision", None) is not None:
        written.append(_plot_pr_curves(metrics, out / "pr_curves.png", max_classes))
    errors = getattr(metrics, "errors", None)
    if errors:
        written.append(_plot_errors(errors, out / "errors.png", max_classes))
        written.append(_plot_confusion(errors["confusion"], out / "confusion.png", max_classes))
    return written


def _plot_pr_curves(metrics: Any, path: Path, max_classes: int) -> Path:
    import matplotlib.pyplot as plt

    precision = metrics.precision  # (T, R, K, A, M)
    names = metrics.category_names
    per_class = metrics.per_class
    keys = list(per_class)
    counts = np.array([per_class[k].get("instances", 0) for k in keys])
    shown = [k for k in np.argsort(-counts, kind="stable")[:max_classes] if (precision[0, :, k, 0, 2] > -1).any()]
    cols = 8
    rows = -(-len(shown) // cols)
    # One figure: the overall curves on top, a small panel per class below (the most objects first). Fixed
    # margins rather than tight_layout, which measures every label of every panel and takes seconds.
    height = 4.0 + 1.9 * rows
    fig = plt.figure(figsize=(2.1 * cols, height))
    top = fig.add_axes((0.06, 1 - 3.4 / height, 0.9, 2.9 / height))
    for t, label in ((0, "IoU 0.50"), (5, "IoU 0.75")):
        curve = _mean_curve(precision[t, :, :, 0, 2])
        if curve is not None:
            top.plot(_RECALL_POINTS, curve, label=f"{label}: AP {np.mean(curve):.3f}")
    every = precision[:, :, :, 0, 2]  # (T, R, K)
    valid = (every > -1).all(axis=(0, 1))
    if valid.any():
        curve = every[:, :, valid].mean(axis=(0, 2))
        top.plot(_RECALL_POINTS, curve, "--", label=f"mean over IoU 0.50:0.95: AP {np.mean(curve):.3f}")
    top.set(title="precision-recall, all classes (mean over classes; area all, 100 detections per image)")
    top.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    top.legend(loc="lower left")
    top.grid(alpha=0.3)
    panel_h = 1.9 / height
    for i, k in enumerate(shown):
        r, c = divmod(i, cols)
        a = fig.add_axes(
            (0.02 + c / cols, 1 - (4.0 / height) - (r + 1) * panel_h + 0.35 / height, 0.9 / cols, 0.7 * panel_h)
        )
        for t, style in ((0, "-"), (5, "--")):
            a.plot(_RECALL_POINTS, np.clip(precision[t, :, k, 0, 2], 0, None), style, linewidth=1)
        row = per_class[keys[k]]
        a.set_title(f"{names[k]} (n={row.get('instances', '?')}) AP50 {row['AP50']:.2f}", fontsize=7)
        a.set(xlim=(0, 1), ylim=(0, 1.02), xticks=[0, 0.5, 1], yticks=[0, 0.5, 1])
        a.tick_params(labelsize=6, length=2)
    if shown:
        fig.text(0.5, 0.005, "per class (most objects first): solid IoU 0.50, dashed IoU 0.75", ha="center", fontsize=8)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def _mean_curve(precision: np.ndarray) -> np.ndarray | None:
    """(R, K) precision -> (R,) mean over the classes that have objects (COCOeval marks the others -1)."""
    valid = (precision > -1).all(axis=0)
    return precision[:, valid].mean(axis=1) if valid.any() else None


def _plot_errors(errors: Mapping[str, Any], path: Path, max_classes: int) -> Path:
    import matplotlib.pyplot as plt

    colors = dict(zip(ERROR_TYPES, ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#1f77b4", "#7f7f7f"), strict=True))
    overall = errors["overall"]
    per_class = errors["per_class"]
    ranked = sorted(
        (n for n in per_class if per_class[n]["AP50"] > -1), key=lambda n: -sum(per_class[n]["dAP50"].values())
    )[:max_classes]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(14, max(4.0, 0.28 * len(ranked) + 1.5)), gridspec_kw={"width_ratios": [1, 2]}
    )
    values = [overall["dAP50"][t] for t in ERROR_TYPES]
    bars = left.bar(ERROR_TYPES, values, color=[colors[t] for t in ERROR_TYPES])
    for bar, t in zip(bars, ERROR_TYPES, strict=True):
        left.annotate(
            f"{overall['dAP50'][t]:.3f}\n({overall['counts'][t]})",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    left.set(title=f"AP50 {overall['AP50']:.3f}: ΔAP50 by fixing each error type (count)", ylabel="ΔAP50")
    left.margins(y=0.2)
    start = np.zeros(len(ranked))
    for t in ERROR_TYPES:
        widths = np.array([per_class[n]["dAP50"][t] for n in ranked])
        right.barh(ranked, widths, left=start, color=colors[t], label=t)
        start += widths
    right.invert_yaxis()
    right.set(title="ΔAP50 per class (stacked; classes losing the most first)", xlabel="ΔAP50")
    right.legend(loc="lower right", fontsize=8)
    right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _plot_confusion(confusion: Mapping[str, Any], path: Path, max_classes: int) -> Path:
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion["matrix"], dtype=np.float64)
    labels = list(confusion["labels"])
    k = len(labels) - 1
    if k > max_classes:  # the classes most involved in confusions, and background
        off = matrix.sum(axis=0) + matrix.sum(axis=1) - 2 * np.diag(matrix)
        keep = sorted(np.argsort(-off[:k], kind="stable")[:max_classes].tolist()) + [k]
        matrix, labels = matrix[np.ix_(keep, keep)], [labels[i] for i in keep]
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(5.0, 0.35 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="detected as", ylabel="object (last row: detections that found no object)")
    ax.set_title(
        f"confusion: share of each row (score ≥ {confusion['score_threshold']}, IoU ≥ {confusion['iou_threshold']})"
    )
    if len(labels) <= 25:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
