"""One self-contained page about a training run: ``report.html`` (``detrkit report RUN_DIR``).

Everything is in the file (pictures as base64 PNGs, a few lines of inline JavaScript to sort tables), so it opens
from the file system with no server and no network. Sections, each present when the run has what it needs:

- the run: architecture, data, the metrics' headline, the resolved config;
- training curves (``visualize.curves_figure``: losses, learning rate, validation per epoch);
- the 12 COCO metrics (or PQ/SQ/RQ) of ``metrics.json`` and ``metrics_segm.json``;
- per-class results (``metrics.json``'s ``per_class``, sortable) and any further analysis there (error breakdowns),
  with the run folder's other PNGs (precision-recall curves, error pictures) when evaluation wrote them;
- a gallery of the validation images the model does worst and best on (F1 of its detections at IoU 0.5 against
  the annotations), predictions beside the ground truth;
- attention or sampling maps (``explain``) of a few of them;
- how the queries learn: the DETR paper's picture of query specialisation (each query slot's predicted box
  centres over the validation images, coloured by box shape) and, from ``query_stats.json`` (written during
  training by ``engine.listeners.QueryStats``), which query each probe object is matched to and how often that
  changes.

Layer: report, above evaluation and pictures (it reads a run's files and draws with ``visualize``), below the
engine, which writes a report when a run completes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, load_run_config
from .files import atomic_write_text
from .models.base import Detections, Detector
from .visualize import (
    class_color,
    curves_figure,
    draw_attention,
    draw_detections,
    draw_ground_truth,
    draw_sampling,
    read_log,
    tile,
)

log = logging.getLogger("detrkit")

# Folders of a run whose PNGs are not analysis pictures (drawn predictions, weights, logs).
_NOT_FIGURES = {"checkpoints", "best", "model", "predictions", "tensorboard"}
GALLERY_MIN_SIDE = 256  # small images are enlarged for the gallery, so that labels fit


def write_report(
    run_dir: str | Path,
    *,
    model: Detector | None = None,
    out: str | Path | None = None,
    device: torch.device | str = "cpu",
    max_images: int = 100,
    gallery: int = 4,
    explained: int = 2,
    threshold: float = 0.3,
    batch_size: int = 4,
) -> Path:
    """Write ``report.html`` for the run in ``run_dir`` (by default into it). Returns its path.

    Args:
        model: the trained model; by default the run's ``model/`` (or ``best/``) is loaded onto ``device``.
        max_images: validation images the model runs on for the gallery and the query pictures (the first, by id).
        gallery: worst and best images shown (each).
        explained: images whose attention or sampling maps are shown.
        threshold: detections drawn, and counted in the gallery's F1, from this score.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder: it has no config.yaml")
    config = load_run_config(run_dir / "config.yaml")
    if model is None:
        model = _load_model(run_dir, device)
    sections = [_run_section(run_dir, config, model)]
    sections.append(_curves_section(run_dir))
    sections += _metrics_sections(run_dir)
    sections.append(_figures_section(run_dir))
    val = None
    if model is not None and config.data.val_annotations and max_images > 0:
        val = _validation_pass(model, config, max_images, threshold, batch_size)
    if val is not None:
        sections.append(_gallery_section(val, gallery, model))
        sections.append(_explain_section(model, val, explained, gallery))
        sections.append(_specialisation_section(val, model))
    sections.append(_query_stats_section(run_dir, model))
    path = Path(out) if out is not None else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    title = f"detrkit report: {run_dir.name}"
    page = _PAGE.format(title=html.escape(title), body="\n".join(s for s in sections if s), script=_SCRIPT)
    atomic_write_text(path, page)
    return path


def _load_model(run_dir: Path, device: torch.device | str) -> Detector | None:
    from .checkpoint import load

    for name in ("model", "best"):
        if (run_dir / name / "config.json").is_file():
            return load(run_dir / name, map_location=device)
    log.warning("report: %s has no model/ or best/ yet: no gallery, maps or query pictures", run_dir)
    return None


# -- pieces of HTML -------------------------------------------------------------------------------------------
def _png(data: bytes | torch.Tensor, alt: str, width: str | None = None) -> str:
    """An ``<img>`` with the PNG inline: bytes, or a ``(3,H,W)`` uint8 image."""
    if isinstance(data, torch.Tensor):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(data.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
        data = buffer.getvalue()
    style = f' style="max-width:{width}"' if width else ""
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"{style}>'


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "–"
    return "–" if value == -1.0 else f"{value:.3f}"  # COCO's -1: no such objects in the data


def _table(rows: list[dict[str, Any]], *, sortable: bool = False, caption: str = "") -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td data-v="{_sort_key(r.get(c))}">{_fmt(r.get(c, ""))}</td>' for c in columns) + "</tr>"
        for r in rows
    )
    cls = ' class="sortable"' if sortable else ""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table{cls}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sort_key(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return repr(float(value))
    return html.escape(str(value if value is not None else ""))


# -- sections -------------------------------------------------------------------------------------------------
def _run_section(run_dir: Path, config: RunConfig, model: Detector | None) -> str:
    m, d, t = config.model, config.data, config.train
    facts = [
        ("architecture", f"{m.arch} ({m.backbone}, {m.num_queries} queries, {m.num_classes} classes)"),
        ("classes", ", ".join(m.class_names or ()) or "–"),
        ("data", f"train {d.train_annotations}; val {d.val_annotations or '–'}"),
        ("training", f"{t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g} ({t.schedule})"),
        ("run folder", str(run_dir.resolve())),
    ]
    if model is not None:
        facts.insert(1, ("parameters", f"{model.num_parameters() / 1e6:.1f}M"))
    import yaml

    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    config_text = html.escape(yaml.safe_dump(config.to_dict(), sort_keys=False))
    details = f"<details><summary>resolved config</summary><pre>{config_text}</pre></details>"
    body = f'<table class="facts">{rows}</table>{details}'
    return _section("Run", body, "run")


def _curves_section(run_dir: Path) -> str:
    if not (run_dir / "log.jsonl").is_file():
        return ""
    steps, epochs = read_log(run_dir / "log.jsonl")
    if not steps:
        return ""
    return _section("Training curves", _png(_figure_png(curves_figure(steps, epochs)), "training curves"), "curves")


def _metrics_sections(run_dir: Path) -> list[str]:
    sections = []
    overall, analysis = [], []
    for name, label in (("metrics.json", "boxes"), ("metrics_segm.json", "masks"), ("metrics_bbox.json", "boxes")):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            metrics = json.loads(path.read_text())
        except ValueError:
            log.warning("report: %s is not JSON; left out", path)
            continue
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            label = "panoptic" if "PQ" in scalars else label
            overall.append(_table([scalars], caption=f"{name} ({label})"))
        for key, value in metrics.items():
            if key not in scalars:
                analysis.append(_analysis_table(f"{name}: {key}", value))
    if overall:
        sections.append(_section("Metrics", "\n".join(overall), "metrics"))
    analysis = [a for a in analysis if a]
    if analysis:
        note = "<p>Click a column's header to sort by it.</p>"
        sections.append(_section("Per-class results and error analysis", note + "\n".join(analysis), "per-class"))
    return sections


def _analysis_table(title: str, value: Any) -> str:
    """A nested entry of ``metrics.json`` as sortable tables: a mapping of names to records (``per_class``:
    the name becomes the first column; a record's own mappings, such as ``dAP50``, become ``dAP50 Cls``, ...
    columns), a list of records, a confusion matrix (``labels`` + ``matrix``), or a mapping of such entries (one
    table each, ``errors``). Anything else is left out."""
    if isinstance(value, dict) and "matrix" in value and "labels" in value:
        return _confusion_table(title, value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _table([_flat(r) for r in value], sortable=True, caption=title)
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        if all(_is_record(v) for v in value.values()):
            return _table([{"name": k, **_flat(v)} for k, v in value.items()], sortable=True, caption=title)
        return "\n".join(_analysis_table(f"{title} / {k}", v) for k, v in value.items())
    if isinstance(value, dict) and value and _is_record(value):
        return _table([_flat(value)], caption=title)
    return ""


def _is_record(value: dict) -> bool:
    """Scalars, or mappings of scalars (one level)."""
    return all(_scalar(v) or (isinstance(v, dict) and all(_scalar(x) for x in v.values())) for v in value.values())


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str)) or value is None


def _flat(record: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update({f"{k} {a}": b for a, b in v.items() if _scalar(b)})
        elif _scalar(v):
            out[k] = v
    return out


def _confusion_table(title: str, confusion: dict) -> str:
    labels = [str(x) for x in confusion["labels"]]
    matrix = confusion["matrix"]
    if len(matrix) != len(labels) or any(len(row) != len(labels) for row in matrix):
        return ""
    head = "".join(f"<th>{html.escape(x)}</th>" for x in labels)
    peak = max([max(row) for row in matrix] + [1])
    rows = []
    for name, row in zip(labels, matrix, strict=True):
        cells = "".join(f'<td style="background:rgba(67,99,216,{0.85 * v / peak:.2f})">{v}</td>' for v in row)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    cap = html.escape(
        f"{title} (rows: {confusion.get('rows', 'truth')}, columns: {confusion.get('columns', 'predicted')})"
    )
    return (
        f"<table><caption>{cap}</caption><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _figures_section(run_dir: Path) -> str:
    """PNGs the evaluation wrote into the run folder (precision-recall curves, error breakdowns, confusion)."""
    paths = [p for p in sorted(run_dir.glob("*.png")) if p.name != "curves.png"]
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name not in _NOT_FIGURES):
        paths += sorted(folder.glob("*.png"))
    if not paths:
        return ""
    figures = "".join(
        f"<figure>{_png(p.read_bytes(), p.name)}<figcaption>{html.escape(str(p.relative_to(run_dir)))}</figcaption>"
        "</figure>"
        for p in paths
    )
    return _section("Evaluation figures", figures, "figures")


# -- the validation pass --------------------------------------------------------------------------------------
@dataclass
class _ImageResult:
    path: Path
    image_id: int
    detections: Detections
    gt_boxes: torch.Tensor  # (n, 4) absolute xyxy
    gt_labels: list[int]  # category ids
    tp: int
    fp: int
    fn: int

    @property
    def f1(self) -> float:
        total = 2 * self.tp + self.fp + self.fn
        return 1.0 if total == 0 else 2 * self.tp / total


@dataclass
class _Validation:
    images: list[_ImageResult]
    boxes: torch.Tensor  # (N, Q, 4) every query's normalised cxcywh box on every image
    threshold: float


def _validation_pass(
    model: Detector, config: RunConfig, max_images: int, threshold: float, batch_size: int
) -> _Validation | None:
    ann = Path(config.data.val_annotations)
    if not ann.is_file():
        log.warning("report: the val annotations %s are missing: no gallery or query pictures", ann)
        return None
    gt = _ground_truth(json.loads(ann.read_text()))
    image_dir = Path(config.data.val_images)
    ids = sorted(gt)[:max_images]
    paths = [image_dir / gt[i][0] for i in ids]
    if not all(p.is_file() for p in paths):
        log.warning("report: val images missing in %s: no gallery or query pictures", image_dir)
        return None
    from .postprocess import postprocess_instances

    results, all_boxes = [], []
    batches = model._forward_images(paths, None, None, batch_size)
    for start, (outputs, orig_sizes, image_sizes) in zip(range(0, len(paths), batch_size), batches, strict=False):
        all_boxes.append(outputs["pred_boxes"].float().cpu())
        if "pred_masks" in outputs:
            dets = postprocess_instances(
                outputs,
                orig_sizes=orig_sizes,
                image_sizes=image_sizes,
                label_map=model.label_map,
                threshold=threshold,
                focal=model.config.focal,
            )
        else:
            dets = model.postprocess(outputs, orig_sizes, threshold=threshold)
        for j, det in enumerate(dets):
            image_id = ids[start + j]
            names = [model.label_map.names[model.label_map.to_label(int(c))] for c in det["labels"].tolist()]
            masks = det["masks"].cpu() if "masks" in det else None
            d = Detections(det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu(), names, masks)
            boxes, labels = gt[image_id][1], gt[image_id][2]
            tp, fp, fn = _match_counts(d, boxes, labels)
            results.append(_ImageResult(paths[start + j], image_id, d, boxes, labels, tp, fp, fn))
    return _Validation(results, torch.cat(all_boxes), threshold)


def _ground_truth(data: dict) -> dict[int, tuple[str, torch.Tensor, list[int]]]:
    """image id → (file name, boxes (n,4) absolute xyxy, category ids), from COCO instances or panoptic JSON
    (crowd regions left out)."""
    files = {int(im["id"]): im["file_name"] for im in data.get("images", [])}
    objects: dict[int, list[tuple[list[float], int]]] = {i: [] for i in files}
    for a in data.get("annotations", []):
        segments = a.get("segments_info")
        for s in segments if segments is not None else [a]:
            if s.get("iscrowd", 0) or "bbox" not in s:
                continue
            x, y, w, h = s["bbox"]
            objects.setdefault(int(a["image_id"]), []).append(([x, y, x + w, y + h], int(s["category_id"])))
    return {
        i: (files[i], torch.tensor([b for b, _ in objs], dtype=torch.float32).reshape(-1, 4), [c for _, c in objs])
        for i, objs in objects.items()
        if i in files
    }


def _match_counts(det: Detections, boxes: torch.Tensor, labels: list[int]) -> tuple[int, int, int]:
    """(true positives, false positives, missed objects): detections, highest score first, each take the
    unmatched annotation of their class they overlap most, if at IoU ≥ 0.5 (COCO's AP50 rule, per image)."""
    from torchvision.ops import box_iou

    if len(det) == 0 or len(boxes) == 0:
        return 0, len(det), len(boxes)
    iou = box_iou(det.boxes.float(), boxes)  # (n_det, n_gt)
    same = det.labels[:, None] == torch.tensor(labels)[None, :]
    iou = torch.where(same, iou, torch.zeros_like(iou))
    taken = torch.zeros(len(boxes), dtype=torch.bool)
    tp = 0
    for i in det.scores.argsort(descending=True).tolist():
        candidates = iou[i].masked_fill(taken, -1.0)
        j = int(candidates.argmax())
        if candidates[j] >= 0.5:
            taken[j] = True
            tp += 1
    return tp, len(det) - tp, len(boxes) - tp


def _worst_and_best(val: _Validation, count: int) -> tuple[list[_ImageResult], list[_ImageResult]]:
    # worst: lowest F1, then most errors; best: highest F1, then most objects found
    ranked = sorted(val.images, key=lambda r: (r.f1, -(r.fp + r.fn), r.image_id))
    worst = ranked[:count]
    best = [r for r in sorted(val.images, key=lambda r: (-r.f1, -r.tp, r.image_id)) if r not in worst][:count]
    return worst, best


def _gallery_section(val: _Validation, count: int, model: Detector) -> str:
    if count <= 0 or not val.images:
        return ""
    worst, best = _worst_and_best(val, count)
    mean_f1 = sum(r.f1 for r in val.images) / len(val.images)
    intro = (
        f"<p>{len(val.images)} validation images; per image, the F1 of the detections scoring ≥ {val.threshold:g} "
        f"against the annotations at IoU ≥ 0.5 (mean {mean_f1:.3f}). Left: predictions (solid); right: ground "
        "truth (dashed). Colours are per class, the same in every picture.</p>"
    )
    parts = [intro]
    for title, chosen in (("Worst", worst), ("Best", best)):
        cards = []
        for r in chosen:
            names = [_class_name(model, c) for c in r.gt_labels]
            pred = draw_detections(r.path, r.detections, min_side=GALLERY_MIN_SIDE)
            truth = draw_ground_truth(r.path, r.gt_boxes, r.gt_labels, names, min_side=GALLERY_MIN_SIDE)
            caption = f"{r.path.name}: F1 {r.f1:.2f} ({r.tp} found, {r.fp} false, {r.fn} missed)"
            cards.append(
                f"<figure>{_png(tile([pred, truth], columns=2), caption)}"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append(f"<h3>{title}</h3><div class='gallery'>{''.join(cards)}</div>")
    return _section("Validation gallery", "\n".join(parts), "gallery")


def _explain_section(model: Detector, val: _Validation, count: int, gallery: int) -> str:
    if count <= 0 or not val.images:
        return ""
    from .explain import ARCHITECTURES, explain

    if model.config.arch not in ARCHITECTURES:
        return ""
    worst, best = _worst_and_best(val, max(gallery, 1))
    chosen = (best[: (count + 1) // 2] + worst[: count // 2]) or val.images[:count]
    what = {
        "detr": "decoder cross-attention of the top detections (last layer, mean over heads), and the encoder "
        "self-attention at their centres (green squares; last encoder layer)",
        "conditional_detr": "decoder cross-attention of the top detections (last layer, mean over heads), and the "
        "encoder self-attention at their centres (green squares; last encoder layer)",
        "deformable_detr": "sampling points of the top detections in the last decoder layer: every head and level "
        "(finest first: red, yellow, green, cyan), a dot's area proportional to its attention weight",
        "yolos": "attention of the top detection tokens over the patches in the last block (mean over heads)",
    }[model.config.arch]
    parts = [f"<p>{html.escape(what)}. The maps are recomputed explicitly (<code>detrkit explain</code>).</p>"]
    for r in chosen:
        exp = explain(model, r.path, top_k=3)
        pictures = [draw_attention(exp, which="decoder"), draw_attention(exp, which="encoder"), draw_sampling(exp)]
        for picture in pictures:
            if picture is not None:
                parts.append(
                    f"<figure>{_png(picture, r.path.name)}<figcaption>{html.escape(r.path.name)}</figcaption></figure>"
                )
    return _section("Where the model looks", "\n".join(parts), "explain")


def _specialisation_section(val: _Validation, model: Detector) -> str:
    """The DETR paper's Fig. 7: every box each query slot predicts on the validation images, as its centre."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    boxes = val.boxes  # (N, Q, 4)
    q = boxes.shape[1]
    slots = list(range(min(q, 20)))
    cols = min(10, len(slots))
    rows = math.ceil(len(slots) / cols)
    fig = Figure(figsize=(1.6 * cols, 1.75 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_visible(False)
    for ax, slot in zip(axes.flat, slots, strict=False):
        b = boxes[:, slot]  # (N, 4)
        colors = [_shape_colour(float(w), float(h)) for w, h in b[:, 2:].tolist()]
        ax.set_visible(True)
        ax.scatter(b[:, 0].numpy(), b[:, 1].numpy(), s=6, c=colors, alpha=0.6, linewidths=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # image coordinates: y down
        ax.set_aspect("equal")
        ax.set_title(f"query {slot}", fontsize=8)
    fig.suptitle(
        "predicted box centres per query slot (green: small, red: large and wide, blue: large and tall)", fontsize=9
    )
    fig.tight_layout()
    text = (
        f"<p>Each panel is one query slot: the centres of the boxes it predicts on the {boxes.shape[0]} validation "
        f"images (whatever their score), in image coordinates (the first {len(slots)} of {q} slots). A trained "
        "DETR's slots specialise in regions and box sizes (DETR paper, Fig. 7).</p>"
    )
    if model.config.two_stage:
        text += (
            "<p>Two-stage: the decoder's queries are the encoder's best proposals in score order, so a slot is a "
            "rank, not a learned query.</p>"
        )
    return _section("Query specialisation", text + _png(_figure_png(fig), "query specialisation"), "queries")


def _shape_colour(w: float, h: float) -> str:
    # the DETR paper's colour code: small boxes green, large ones red when wide, blue when tall
    if w * h < 0.1:
        return "#2ca02c"
    return "#d62728" if w >= h else "#1f77b4"


def _query_stats_section(run_dir: Path, model: Detector | None) -> str:
    path = run_dir / "query_stats.json"
    if not path.is_file():
        return ""
    try:
        stats = json.loads(path.read_text())
        records = stats["records"]
        objects = stats["objects"]
    except (ValueError, KeyError, TypeError):
        log.warning("report: %s is not a query statistics file; left out", path)
        return ""
    if not records or not objects:
        return ""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    q = int(stats.get("num_queries", 1 + max(max(r["query"]) for r in records)))
    fig = Figure(figsize=(14, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [4, 5, 4]})
    epochs = [r["epoch"] for r in records]
    changed = [
        sum(a != b for a, b in zip(prev["query"], cur["query"], strict=True)) / len(objects)
        for prev, cur in zip(records, records[1:], strict=False)
    ]
    if changed:
        ax1.plot(epochs[1:], changed, marker="o", color="#d62728")
        ax1.set_ylim(0, 1)
    ax1.set_xlabel("epoch")
    ax1.set_title("objects matched to another query\nthan at the previous check", fontsize=10)
    # which query each object is matched to, over training: one row per object, sorted by its final query
    matrix = torch.tensor([r["query"] for r in records], dtype=torch.float32).T  # (objects, records)
    order = matrix[:, -1].argsort(stable=True)
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    # one distinct colour per slot where there are few; a continuous map otherwise
    cmap = ListedColormap(colormaps["tab20"].colors[:q]) if q <= 20 else "viridis"
    image = ax2.imshow(
        matrix[order].numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=q - 0.5
    )
    ax2.set_xticks(range(len(epochs)))
    ax2.set_xticklabels([f"{e:g}" for e in epochs], fontsize=7)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("probe object")
    ax2.set_title("matched query of each object (colour = query slot)", fontsize=10)
    fig.colorbar(image, ax=ax2, fraction=0.04)
    labels = [o[2] for o in objects]
    classes = sorted(set(labels))
    final = records[-1]["query"]
    bottom = torch.zeros(q)
    for c in classes:
        counts = torch.zeros(q)
        for query, label in zip(final, labels, strict=True):
            if label == c and 0 <= query < q:
                counts[query] += 1
        name = _class_name(model, c)
        ax3.bar(range(q), counts.numpy(), bottom=bottom.numpy(), color=class_color(c), label=name)
        bottom += counts
    ax3.set_xlabel("query slot")
    ax3.set_title(f"objects per query at epoch {epochs[-1]:g}, by class", fontsize=10)
    ax3.legend(fontsize=7)
    fig.tight_layout()
    used = len({x for x in final if x >= 0})
    last_change = f"{changed[-1]:.0%}" if changed else "–"
    text = (
        f"<p>During training, the engine matches a fixed probe set of {len(stats.get('image_ids', []))} training "
        f"images ({len(objects)} objects, evaluation transforms) at the start, every quarter epoch (no more often "
        "than every 20 steps) and at each epoch's end, and records the query "
        f"each object is matched to (Hungarian matching, the loss's own). At the last check {used} of {q} queries "
        f"are in use and {last_change} of the objects changed query since the check before: a matching that "
        "keeps changing is one reason DETR trains slowly (DN-DETR, Li et al. 2022).</p>"
    )
    return _section("How the queries learn", text + _png(_figure_png(fig), "query matching"), "matching")


def _class_name(model: Detector | None, category_id: int) -> str:
    if model is not None and category_id in model.label_map.category_ids:
        return model.label_map.names[model.label_map.to_label(category_id)]
    return str(category_id)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1400px;
       color: #222; padding: 0 1em; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
table.facts th, table.facts td {{ text-align: left; }}
caption {{ text-align: left; font-weight: bold; padding: .3em 0; }}
table.sortable th {{ cursor: pointer; background: #f3f3f3; }}
table.sortable th:hover {{ background: #e4e4e4; }}
img {{ max-width: 100%; }}
figure {{ display: inline-block; margin: .4em; vertical-align: top; }}
figcaption {{ font-size: .85em; color: #555; }}
pre {{ background: #f7f7f7; padding: .8em; font-size: .85em; overflow: auto; }}
nav a {{ margin-right: 1em; }}
</style></head>
<body><h1>{title}</h1>
<nav><a href="#run">run</a><a href="#curves">curves</a><a href="#metrics">metrics</a>
<a href="#per-class">per class</a><a href="#gallery">gallery</a><a href="#explain">attention</a>
<a href="#queries">queries</a><a href="#matching">matching</a></nav>
{body}
<script>{script}</script>
</body></html>
"""

# Sorting by a column: a click sorts descending, a second click ascending; numbers compare as numbers.
_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var down = th.getAttribute('data-order') !== 'desc';
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y), r;
        if (!isNaN(nx) && !isNaN(ny)) { r = nx - ny; } else { r = x.localeCompare(y); }
        return down ? -r : r;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
      th.setAttribute('data-order', down ? 'desc' : 'asc');
    });
  });
});
"""

__all__ = ["write_report"]
