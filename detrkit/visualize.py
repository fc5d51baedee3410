"""Pictures for people: detections drawn on images, and the training curves.

Layer: evaluation and pictures, above the models. May import the layers below it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .images import load_image_tensor
from .models.base import Detections

# A fixed palette so a class keeps its colour from image to image.
_PALETTE = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#469990", "#9a6324", "#800000", "#808000", "#000075", "#fabed4", "#ffd8b1", "#dcbeff",
]  # fmt: skip


def class_color(category_id: int) -> str:
    """The colour of a class: the same in every image, drawing and report."""
    return _PALETTE[int(category_id) % len(_PALETTE)]


def draw_detections(image, detections: Detections, *, width: int = 2, mask_alpha: float = 0.45) -> torch.Tensor:
    """Draw ``detections`` on ``image`` (anything ``predict`` accepts): their masks (when the model predicts
    masks) under their boxes and labels. Returns a ``(3,H,W)`` uint8 tensor."""
    img = (load_image_tensor(image) * 255).round().to(torch.uint8)
    if len(detections) == 0:
        return img
    labels = [f"{n} {s:.2f}" for n, s in zip(detections.names, detections.scores.tolist(), strict=True)]
    colors = [class_color(c) for c in detections.labels.tolist()]
    masks = getattr(detections, "masks", None)
    if masks is not None and len(masks):
        img = draw_segmentation_masks(img, masks.bool().cpu(), alpha=mask_alpha, colors=colors)
    return draw_bounding_boxes(img, detections.boxes.float(), labels=labels, colors=colors, width=width)


def draw_panoptic(image, segments: torch.Tensor, segments_info: list[dict], *, alpha: float = 0.55) -> torch.Tensor:
    """Draw a panoptic segmentation on ``image``: each segment in its class colour (things of one class in shades
    that tell them apart), VOID (id 0) left as it is. ``segments (H,W)`` segment ids at the image's size; each
    ``segments_info`` entry has ``id`` and ``category_id``. Returns a ``(3,H,W)`` uint8 tensor."""
    img = (load_image_tensor(image) * 255).round().to(torch.uint8)
    if not segments_info:
        return img
    masks = torch.stack([segments == int(s["id"]) for s in segments_info])  # (n, H, W)
    colors = []
    seen: dict[int, int] = {}
    for s in segments_info:
        k = seen[int(s["category_id"])] = seen.get(int(s["category_id"]), -1) + 1
        base = class_color(s["category_id"]).lstrip("#")
        rgb = [int(base[i : i + 2], 16) for i in (0, 2, 4)]
        shade = 1.0 - 0.18 * (k % 4)  # instances of one class: darker shades of its colour
        colors.append(tuple(int(v * shade) for v in rgb))
    return draw_segmentation_masks(img, masks.cpu(), alpha=alpha, colors=colors)


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)
    return path


def plot_curves(log_path: str | Path, out_path: str | Path) -> Path | None:
    """Loss terms per step and AP/AP50 per epoch from a run's ``log.jsonl``, as a PNG.

    Steps whose update was skipped (a non-finite loss: only ``loss``, NaN, is logged) leave gaps; lines that are
    not JSON records (a write cut short) are skipped.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    log_path = Path(log_path)
    if not log_path.is_file():
        return None
    steps, epochs = [], []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec and "epoch" in rec:
            (steps if rec.get("type") == "step" else epochs).append(rec)
    if not steps:
        return None
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    x = [r["step"] for r in steps]
    plotted = False
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou"):
        values = [_number(r.get(key)) for r in steps]
        if any(v > 0 for v in values):  # a log scale shows positive values only
            ax1.plot(x, _smooth(values), label=key)
            plotted = True
    ax1.set_xlabel("step")
    ax1.set_title("training losses (smoothed)")
    if plotted:
        ax1.set_yscale("log")
        ax1.legend()
    else:
        ax1.text(0.5, 0.5, "no finite loss was logged", ha="center", va="center", transform=ax1.transAxes)
    evals = [r for r in epochs if "AP" in r]
    if evals:
        for key in ("AP", "AP50", "AP75"):
            ax2.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", label=key)
        ax2.set_ylim(0, 1)
        ax2.legend()
    ax2.set_xlabel("epoch")
    ax2.set_title("validation")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    return out_path


def _number(value) -> float:
    """A logged value as a float: NaN for a missing or non-numeric one."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average; a non-finite value is a gap (NaN) that does not poison the average."""
    out, avg = [], None
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        avg = v if avg is None else (1 - alpha) * avg + alpha * v
        out.append(avg)
    return out
