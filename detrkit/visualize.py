"""Pictures for people: detections drawn on images, and the training curves.

Layer: evaluation and pictures, above the models. May import the layers below it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.utils import draw_segmentation_masks

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


def _font(size: int):
    """DejaVu Sans (matplotlib, a dependency, ships it) at ``size`` pixels; Pillow's own font if it is missing."""
    return _FONTS.get(size) or _FONTS.setdefault(size, _load_font(size))


def _load_font(size: int):
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except OSError:
        return ImageFont.load_default(size)


_FONTS: dict[int, Any] = {}


def label_style(height: int, width: int) -> tuple[int, int]:
    """``(font size, line width)`` in pixels for drawings on an image of ``height`` × ``width``: labels stay
    about 3 % of the shorter side (at least 10 px, readable in a 96 px image and in a 1333 px one alike)."""
    side = min(height, width)
    return max(10, round(0.03 * side)), max(1, round(side / 250))


def _rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones (relative luminance, ITU-R BT.709)."""
    return (0, 0, 0) if 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2] > 150 else (255, 255, 255)


def draw_boxes(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: list[str],
    colors: list[str],
    *,
    width: int | None = None,
    font_size: int | None = None,
    dashed: bool = False,
) -> torch.Tensor:
    """Boxes ``(n,4)`` absolute (x1, y1, x2, y2) on ``image (3,H,W)`` uint8, each with its label on a filled
    background of its colour above the box (inside it when the box touches the top). Returns ``(3,H,W)`` uint8."""
    from PIL import Image, ImageDraw

    _, h, w = image.shape
    size, line = label_style(h, w)
    size, line = font_size or size, width or line
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    draw = ImageDraw.Draw(pil)
    font = _font(size)
    pad = max(1, size // 6)
    for box, text, color in zip(boxes.tolist(), labels, colors, strict=True):
        rgb = _rgb(color)
        x1, y1, x2, y2 = box
        if dashed:
            _dashed_rectangle(draw, (x1, y1, x2, y2), rgb, line, dash=max(3, 2 * size // 3))
        else:
            draw.rectangle((x1, y1, x2, y2), outline=rgb, width=line)
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(max(x1, 0), max(w - tw, 0))
        ty = y1 - th if y1 - th >= 0 else max(y1, 0)
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=rgb)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_color(rgb), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def _dashed_rectangle(draw, box: tuple[float, float, float, float], rgb, width: int, dash: int) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // dash))
        for i in range(0, steps, 2):
            t0, t1 = i / steps, min(1.0, (i + 1) / steps)
            draw.line(
                (ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
                fill=rgb,
                width=width,
            )


def _upscaled(img: torch.Tensor, min_side: int | None) -> tuple[torch.Tensor, float]:
    """``img (3,H,W)`` uint8 enlarged (bilinear) so that its shorter side is at least ``min_side``, and the
    factor: labels on small images need the room."""
    side = min(img.shape[1:])
    if not min_side or side >= min_side:
        return img, 1.0
    factor = min_side / side
    size = (round(img.shape[1] * factor), round(img.shape[2] * factor))
    big = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)
    return big[0].round().clamp(0, 255).to(torch.uint8), factor


def to_uint8(image) -> torch.Tensor:
    """Anything ``predict`` accepts → ``(3,H,W)`` uint8."""
    return (load_image_tensor(image) * 255).round().to(torch.uint8)


def draw_detections(
    image,
    detections: Detections,
    *,
    width: int | None = None,
    mask_alpha: float = 0.45,
    min_side: int | None = None,
) -> torch.Tensor:
    """Draw ``detections`` on ``image`` (anything ``predict`` accepts): masks (when the model predicts them) under
    boxes labelled "name score" on a filled background in the class colour (``class_color``), in a font that
    scales with the image (``label_style``). ``min_side`` first enlarges a smaller image (and the boxes) to that
    shorter side. Returns a ``(3,H,W)`` uint8 tensor."""
    img = to_uint8(image)
    masks = getattr(detections, "masks", None)
    colors = [class_color(c) for c in detections.labels.tolist()]
    if masks is not None and len(masks):
        img = draw_segmentation_masks(img, masks.bool().cpu(), alpha=mask_alpha, colors=colors)
    img, factor = _upscaled(img, min_side)
    if len(detections) == 0:
        return img
    labels = [f"{n} {s:.2f}" for n, s in zip(detections.names, detections.scores.tolist(), strict=True)]
    order = detections.scores.argsort().tolist()  # the best drawn last: on top where labels overlap
    boxes = detections.boxes.float()[order] * factor
    return draw_boxes(img, boxes, [labels[i] for i in order], [colors[i] for i in order], width=width)


def draw_ground_truth(
    image, boxes: torch.Tensor, category_ids: list[int], names: list[str], *, min_side: int | None = None
) -> torch.Tensor:
    """The annotated boxes ``(n,4)`` absolute (x1, y1, x2, y2) of ``image``, dashed, labelled by class name in the
    class colours of ``draw_detections``. Returns a ``(3,H,W)`` uint8 tensor."""
    img, factor = _upscaled(to_uint8(image), min_side)
    if len(boxes) == 0:
        return img
    colors = [class_color(c) for c in category_ids]
    return draw_boxes(img, torch.as_tensor(boxes, dtype=torch.float32) * factor, list(names), colors, dashed=True)


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


def read_log(log_path: str | Path) -> tuple[list[dict], list[dict]]:
    """A run's ``log.jsonl`` as (step records, epoch records); lines that are not JSON records (a write cut short)
    are skipped."""
    steps, epochs = [], []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec and "epoch" in rec:
            (steps if rec.get("type") == "step" else epochs).append(rec)
    return steps, epochs


# What the validation panel shows, by the first key present: box AP, or PQ for panoptic runs.
VALIDATION_KEYS = (("AP", "AP50", "AP75", "segm_AP"), ("PQ", "SQ", "RQ"))


def curves_figure(steps: list[dict], epochs: list[dict]):
    """Three panels: the loss terms per step (smoothed, log scale), the learning rate per step, and the
    validation metrics per epoch as points with their values (a short run has one or two evaluations)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax_lr, ax2 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [5, 3, 4]})
    x = [r["step"] for r in steps]
    plotted = False
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        values = [_number(r.get(key)) for r in steps]
        if any(v > 0 for v in values):  # a log scale shows positive values only
            (line,) = ax1.plot(x, _smooth(values), label=key)
            if len(x) < 400:  # the raw values, faint, where they do not turn into a solid band
                ax1.plot(x, values, color=line.get_color(), alpha=0.25, linewidth=0.8)
            plotted = True
    ax1.set_xlabel("step")
    ax1.set_title("training losses (smoothed)")
    if plotted:
        ax1.set_yscale("log")
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no finite loss was logged", ha="center", va="center", transform=ax1.transAxes)
    lrs = [(r["step"], r["lr"]) for r in steps if math.isfinite(_number(r.get("lr")))]
    if lrs:
        ax_lr.plot([s for s, _ in lrs], [v for _, v in lrs], color="#444444")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        ax_lr.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=ax_lr.transAxes)
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    keys = next((k for k in VALIDATION_KEYS if any(k[0] in r for r in epochs)), ())
    evals = [r for r in epochs if keys and keys[0] in r]
    for key in keys:
        points = [(r["epoch"], _number(r.get(key))) for r in evals]
        points = [(e, v) for e, v in points if math.isfinite(v) and v >= 0]  # -1: no such objects in the data
        if not points:
            continue
        (line,) = ax2.plot([e for e, _ in points], [v for _, v in points], marker="o", label=key)
        if len(points) <= 12:
            for e, v in points:
                ax2.annotate(
                    f"{v:.3f}", (e, v), textcoords="offset points", xytext=(6, 4), fontsize=8, color=line.get_color()
                )
    if evals:
        last = max(r["epoch"] for r in evals)
        ax2.set_xlim(0.5, max(last, 1) + 0.5 + 0.15 * max(last, 1))
        ax2.xaxis.get_major_locator().set_params(integer=True)
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=8, loc="upper left")
    else:
        ax2.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("epoch")
    ax2.set_title("validation")
    fig.tight_layout()
    return fig


def plot_curves(log_path: str | Path, out_path: str | Path) -> Path | None:
    """``curves_figure`` of a run's ``log.jsonl``, as a PNG; None when the log has no step yet.

    Steps whose update was skipped (a non-finite loss: only ``loss``, NaN, is logged) leave gaps.
    """
    log_path = Path(log_path)
    if not log_path.is_file():
        return None
    steps, epochs = read_log(log_path)
    if not steps:
        return None
    out_path = Path(out_path)
    curves_figure(steps, epochs).savefig(out_path)
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


# -- attention and sampling maps (``explain.Explanation``) -----------------------------------------------------
def _colormap(values: torch.Tensor, name: str = "inferno") -> torch.Tensor:
    """Values in [0, 1] ``(H,W)`` → ``(3,H,W)`` uint8 through a matplotlib colour map."""
    from matplotlib import colormaps

    lut = torch.from_numpy((colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8))  # (256, 3)
    index = (values.clamp(0, 1) * 255).round().long()
    return lut[index].permute(2, 0, 1)


def _overlay(img: torch.Tensor, heat: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """``heat (H,W)`` normalised to its maximum, coloured and blended over ``img (3,H,W)`` uint8."""
    heat = heat / heat.max().clamp(min=1e-12)
    blended = (1 - alpha) * img.float() + alpha * _colormap(heat).float()
    return blended.round().clamp(0, 255).to(torch.uint8)


def _titled(panel: torch.Tensor, title: str) -> torch.Tensor:
    """``panel (3,H,W)`` uint8 with ``title`` in a white band above it."""
    from PIL import Image, ImageDraw

    _, h, w = panel.shape
    size = max(11, min(18, round(0.06 * w)))
    band = size + size // 2
    pil = Image.new("RGB", (w, h + band), (255, 255, 255))
    pil.paste(Image.fromarray(panel.permute(1, 2, 0).numpy()), (0, band))
    ImageDraw.Draw(pil).text((3, size // 4), title, fill=(0, 0, 0), font=_font(size))
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def tile(panels: list[torch.Tensor], *, columns: int = 4, gap: int = 6) -> torch.Tensor:
    """``(3,h_i,w_i)`` uint8 panels in rows of ``columns`` on a white canvas → ``(3,H,W)`` uint8."""
    if not panels:
        raise ValueError("tile needs at least one panel")
    rows = [panels[i : i + columns] for i in range(0, len(panels), columns)]
    cell_h = max(p.shape[1] for p in panels)
    cell_w = max(p.shape[2] for p in panels)
    canvas = torch.full(
        (3, len(rows) * (cell_h + gap) - gap, min(len(panels), columns) * (cell_w + gap) - gap), 255, dtype=torch.uint8
    )
    for r, row in enumerate(rows):
        for c, p in enumerate(row):
            y, x = r * (cell_h + gap), c * (cell_w + gap)
            canvas[:, y : y + p.shape[1], x : x + p.shape[2]] = p
    return canvas


# Display size of explanation panels: small inputs are enlarged so that a map's cells and points can be seen.
PANEL_MIN_SIDE = 240


def draw_attention(explanation, *, which: str = "decoder", min_side: int = PANEL_MIN_SIDE) -> torch.Tensor | None:
    """One panel per chosen detection (``which="decoder"``: cross-attention, YOLOS: the detection tokens'
    attention) or per chosen pixel (``"encoder"``): the map averaged over heads, blended over the image, with the
    detection's box or a marker at the pixel. None when the explanation has no such map."""
    maps = explanation.decoder_attention if which == "decoder" else explanation.encoder_attention
    if maps is None or len(maps) == 0:
        return None
    base, factor = _upscaled(to_uint8(explanation.image), min_side)
    heat = explanation.to_image(maps.mean(1))  # (k, H, W) at the original size
    heat = torch.nn.functional.interpolate(heat[:, None], size=base.shape[1:], mode="bilinear")[:, 0]
    det = explanation.detections
    panels = []
    for i in range(len(maps)):
        panel = _overlay(base, heat[i])
        if which == "decoder":
            color = class_color(int(det.labels[i]))
            label = f"{det.names[i]} {float(det.scores[i]):.2f}"
            panel = draw_boxes(panel, det.boxes[i : i + 1] * factor, [label], [color])
            title = f"query {int(explanation.queries[i])}"
        else:
            x, y = (explanation.pixels[i] * factor).tolist()
            r = max(4, min(base.shape[1:]) // 40)
            panel = draw_boxes(panel, torch.tensor([[x - r, y - r, x + r, y + r]]), [""], ["#00ff00"], width=3)
            title = f"pixel ({explanation.pixels[i, 0]:.0f}, {explanation.pixels[i, 1]:.0f})"
        panels.append(_titled(panel, title))
    return tile(panels)


# Level colours of sampling points (finest level first).
LEVEL_COLORS = ["#e6194b", "#ffe119", "#3cb44b", "#42d4f4", "#f032e6", "#ffffff"]


def draw_sampling(explanation, *, min_side: int = PANEL_MIN_SIDE) -> torch.Tensor | None:
    """Deformable DETR: one panel per chosen detection with its sampling points in the explained decoder layer,
    every head and level, coloured by level (finest first: red, yellow, green, cyan), the area of each dot
    proportional to its attention weight; the detection's box on top. None for other architectures."""
    from PIL import Image, ImageDraw

    pts, weights = explanation.sampling_points, explanation.sampling_weights
    if pts is None or len(pts) == 0:
        return None
    base, factor = _upscaled(to_uint8(explanation.image), min_side)
    dimmed = (base.float() * 0.55).to(torch.uint8)  # the points stand out on a darker image
    det = explanation.detections
    _, h, w = base.shape
    r_max = max(3.0, min(h, w) / 30)
    panels = []
    for i in range(len(pts)):
        pil = Image.fromarray(dimmed.permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(pil)
        p = pts[i] * factor  # (nh, L, P, 2)
        wt = weights[i] / weights[i].max().clamp(min=1e-12)  # (nh, L, P)
        order = wt.flatten().argsort()  # heaviest drawn last, on top
        n_levels, n_points = p.shape[1], p.shape[2]
        for j in order.tolist():
            head, rest = divmod(j, n_levels * n_points)
            level, point = divmod(rest, n_points)
            x, y = p[head, level, point].tolist()
            r = r_max * math.sqrt(float(wt[head, level, point]))
            if r < 0.8 or not (-r <= x <= w + r and -r <= y <= h + r):
                continue
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_rgb(LEVEL_COLORS[level % len(LEVEL_COLORS)]))
        panel = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
        label = f"{det.names[i]} {float(det.scores[i]):.2f}"
        panel = draw_boxes(panel, det.boxes[i : i + 1] * factor, [label], [class_color(int(det.labels[i]))])
        panels.append(_titled(panel, f"query {int(explanation.queries[i])}"))
    return tile(panels)


def save_explanation(explanation, out_dir: str | Path, stem: str) -> list[Path]:
    """The pictures of an explanation as PNGs in ``out_dir``: ``{stem}_decoder.png`` (DETR, Conditional DETR:
    cross-attention per detection), ``{stem}_encoder.png`` (their encoder self-attention at the chosen pixels),
    ``{stem}_sampling.png`` (Deformable DETR) or ``{stem}_tokens.png`` (YOLOS). Returns the paths written."""
    written = []
    decoder_name = "tokens" if explanation.arch == "yolos" else "decoder"
    for name, picture in (
        (decoder_name, draw_attention(explanation, which="decoder")),
        ("encoder", draw_attention(explanation, which="encoder")),
        ("sampling", draw_sampling(explanation)),
    ):
        if picture is not None:
            written.append(save_image(picture, Path(out_dir) / f"{stem}_{name}.png"))
    return written
