"""Textured synthetic detection data, unlike the demo's flat shapes: classes told apart by outline only (up to ten
shapes), each object filled with a procedural texture and palette of its own, turned, of log-uniform sizes, several
per image with partial occlusion, on textured backgrounds with clutter that is no object (issue 18: options measured
on data they were not tuned on). ``TexturedSpec`` holds every knob: its default is what ``detrkit demo --dataset
textured`` trains on, ``HARD`` a harder variant.

Everything is drawn with numpy and Pillow from one seed: no file outside the package, the same bytes on every
machine with the same library versions. Colour never gives the class away (every object draws its own palette and
texture); only the outline does.

Layer: building blocks (numpy and Pillow only; imports nothing from detrkit).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Told apart by outline only. A category's id is its place here (stable whichever classes a spec draws).
SHAPE_IDS = {
    "circle": 1,
    "ellipse": 2,
    "square": 3,
    "triangle": 4,
    "pentagon": 5,
    "hexagon": 6,
    "star": 7,
    "cross": 8,
    "ring": 9,
    "crescent": 10,
}
TEXTURED_VERSION = 1  # bump when the drawing changes: the params stamp then regenerates old datasets
# An object stays annotated while at least this fraction of its pixels is visible; a mostly hidden one keeps its
# pixels (as a real occluded object does) but loses its annotation: what is left of it is not a learnable example.
MIN_VISIBLE = 0.5
PLACEMENT_TRIES = 20
PALETTE_TRIES = 10
SUPERSAMPLE = 4  # shapes are rasterised at 4x and averaged: anti-aliased edges, sub-pixel positions
MIN_BOX_SIDE = 2  # px: a visible part narrower than this is not annotated
TEXTURES = ("noise", "stripes", "checks", "marble", "wood", "gradient", "dots")


@dataclass(frozen=True)
class TexturedSpec:
    """How hard the textured dataset is. ``TexturedSpec()`` is ``detrkit demo --dataset textured``'s, calibrated so
    that the demo preset learns it in minutes (README, "A second dataset"); ``HARD`` is the first, harder version.

    Attributes:
        classes: the shapes drawn, names of ``SHAPE_IDS``.
        max_objects: objects per image are uniform in 1..max_objects (before occlusion drops any).
        min_size: px, the smallest unrotated shape's shorter side; sizes are log-uniform from it ...
        max_fraction: ... to this fraction of the image's shorter side.
        max_rotation: degrees, shapes turn uniformly by up to this either way (180: any angle). Most objects in
            photographs stand upright; a detector trained from scratch learns each orientation of a shape anew.
        max_blobs, max_strokes: clutter per image, uniform from 0: textured blobs (2-4 overlapping discs with a
            noisy edge, no class's outline) and curves of 1-3 px.
        background_contrast: per channel, the most the background's two texture colours differ by.
        texture_contrast: the same for an object's (and a blob's) two colours; 255: two independent colours.
        min_contrast: sum over RGB between an object's mean colour and the background's under it: a camouflaged
            outline cannot be learned from a few thousand images.
        free_placement: the share of objects placed without protecting the objects beneath (others are placed so
            that each keeps ``MIN_VISIBLE``): some objects do end up mostly hidden, and unannotated.
    """

    classes: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
    max_objects: int = 4
    min_size: float = 16.0
    max_fraction: float = 0.5
    max_rotation: float = 20.0
    max_blobs: int = 1
    max_strokes: int = 2
    background_contrast: float = 15.0
    texture_contrast: float = 30.0
    min_contrast: float = 150.0
    free_placement: float = 0.1

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in SHAPE_IDS]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names of {', '.join(SHAPE_IDS)}, got {list(self.classes)}")
        if self.max_objects < 1 or self.max_blobs < 0 or self.max_strokes < 0:
            raise ValueError("max_objects must be ≥ 1, max_blobs and max_strokes ≥ 0")
        if not (self.min_size >= 2 and 0 < self.max_fraction <= 1 and 0 <= self.max_rotation <= 180):
            raise ValueError(
                f"need min_size ≥ 2 px, 0 < max_fraction ≤ 1 and 0 ≤ max_rotation ≤ 180, got {self.min_size}, "
                f"{self.max_fraction}, {self.max_rotation}"
            )
        contrasts = (self.background_contrast, self.texture_contrast, self.min_contrast)
        if not 0 <= self.free_placement <= 1 or min(contrasts) < 0:
            raise ValueError("free_placement must be in [0, 1], the contrasts ≥ 0")

    @property
    def categories(self) -> dict[int, str]:
        """Category id → name of the classes drawn."""
        return {SHAPE_IDS[name]: name for name in self.classes}


# The first version: ten classes (pentagon and hexagon too), up to ten objects from 7 px to 60% of the image,
# more clutter, busier backgrounds, less contrast. The demo preset reached AP50 0.005 on it in its budget.
HARD = TexturedSpec(
    classes=tuple(SHAPE_IDS),
    max_objects=10,
    min_size=7.0,
    max_fraction=0.6,
    max_rotation=180.0,
    max_blobs=3,
    max_strokes=4,
    background_contrast=60.0,
    texture_contrast=255.0,
    min_contrast=60.0,
    free_placement=0.15,
)


@dataclass
class DrawnObject:
    """One object as drawn: ``category_id``, ``alpha`` (h, w) float32 coverage of the full image (0..1, before
    occlusion), ``visible`` (h, w) its coverage left after the objects drawn above it, ``visible_fraction``,
    ``bbox`` [x, y, w, h] of the pixels it still covers at least half of (None when too small), and ``annotated``."""

    category_id: int
    alpha: np.ndarray
    visible: np.ndarray
    visible_fraction: float = 1.0
    bbox: list[float] | None = None
    annotated: bool = False


# -- shapes ---------------------------------------------------------------------------------------------------------
def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    """(n, 2) vertices of a regular n-gon of circumradius ``radius`` around the origin, first vertex up."""
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def unit_shape(kind: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The outline of ``kind`` around the origin at circumradius about 1 (y down): ``(filled polygons, holes)``,
    each an (n, 2) array. Only the ellipse's axis ratio is random."""
    if kind == "circle":
        return [_regular(64)], []
    if kind == "ellipse":  # axes 2:1 to 5:3, clearly not a circle
        return [_regular(64) * np.array([1.0, rng.uniform(0.5, 0.6)])], []
    if kind == "square":
        return [_regular(4, phase=math.pi / 4)], []
    if kind in ("triangle", "pentagon", "hexagon"):
        return [_regular({"triangle": 3, "pentagon": 5, "hexagon": 6}[kind])], []
    if kind == "star":  # five points, inner radius 0.45 of the outer
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        angles = -math.pi / 2 + math.pi * np.arange(10) / 5
        return [radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)], []
    if kind == "cross":  # a plus sign, arms 0.6 of its span wide
        a = 0.3
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a)]
        return [np.array([*pts, (-a, -a)], dtype=np.float64)], []
    if kind == "ring":
        return [_regular(64)], [_regular(64, radius=0.55)]
    if kind == "crescent":  # a disc minus a smaller disc shifted right: horns pointing right
        return [_regular(64)], [_regular(64, radius=0.85) + np.array([0.45, 0.0])]
    raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPE_IDS)}")


def rasterize(
    polygons: list[np.ndarray], holes: list[np.ndarray], width: int, height: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Coverage of the filled ``polygons`` minus ``holes`` (vertices in image pixels, continuous coordinates: pixel
    (i, j) spans [j, j+1] x [i, i+1]), anti-aliased by ``SUPERSAMPLE``.

    Returns ``(alpha (bh, bw) float32 in 0..1, (x0, y0))``: the coverage over the polygons' integer bounding box
    clipped to the image, and that box's top-left corner."""
    pts = np.concatenate(polygons)
    x0, y0 = (max(int(math.floor(v)), 0) for v in pts.min(axis=0))
    x1 = min(int(math.ceil(pts[:, 0].max())), width)
    y1 = min(int(math.ceil(pts[:, 1].max())), height)
    bw, bh = max(x1 - x0, 1), max(y1 - y0, 1)
    canvas = Image.new("L", (bw * SUPERSAMPLE, bh * SUPERSAMPLE))
    draw = ImageDraw.Draw(canvas)
    # Pillow fills every sub-pixel a span touches, one more per row than the centres inside: shapes come out up to
    # 1/SUPERSAMPLE px wider (less than 4% of a 7-px object). Image and box come from the same alpha, so they agree.
    for fill, group in ((255, polygons), (0, holes)):
        for poly in group:
            local = (poly - np.array([x0, y0])) * SUPERSAMPLE - 0.5
            draw.polygon([tuple(p) for p in local.tolist()], fill=fill)
    alpha = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0
    return alpha, (x0, y0)


def visible_box(visible: np.ndarray) -> list[float] | None:
    """[x, y, w, h] of the pixels an object covers at least half of after occlusion (``visible`` (h, w)), or None
    when that is narrower than ``MIN_BOX_SIDE`` either way."""
    ys, xs = np.nonzero(visible >= 0.5)
    if len(xs) == 0:
        return None
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        return None
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


# -- textures -------------------------------------------------------------------------------------------------------
def _fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4) -> np.ndarray:
    """(h, w) fractal value noise in 0..1: random grids of ``cell``, ``cell``/2, ... pixels, upsampled bicubically
    and summed with halving amplitudes."""
    total = np.zeros((h, w), dtype=np.float32)
    amplitude = 1.0
    for _ in range(octaves):
        gh, gw = int(h / cell) + 3, int(w / cell) + 3
        grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32))  # mode "F"
        up = np.asarray(grid.resize((max(int(gw * cell), w + 1), max(int(gh * cell), h + 1)), Image.Resampling.BICUBIC))
        oy, ox = int(rng.integers(0, up.shape[0] - h + 1)), int(rng.integers(0, up.shape[1] - w + 1))
        total += amplitude * up[oy : oy + h, ox : ox + w]
        amplitude *= 0.5
        cell /= 2
        if cell < 1:
            break
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def _pattern(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """(h, w) float32 in 0..1: where each pixel lies between the palette's two colours."""
    ys, xs = np.ogrid[0:h, 0:w]  # (h, 1) and (1, w): broadcast, not materialised
    ys, xs = ys.astype(np.float32), xs.astype(np.float32)
    theta = rng.uniform(0, math.pi)
    u = xs * math.cos(theta) + ys * math.sin(theta)  # coordinate along a random direction
    v = -xs * math.sin(theta) + ys * math.cos(theta)
    if kind == "noise":
        return _fbm(rng, h, w, cell=rng.uniform(3, 16))
    if kind == "stripes":
        period = rng.uniform(3, 10)
        warp = rng.uniform(0, 1.5) * _fbm(rng, h, w, cell=12, octaves=2)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + 2 * math.pi * warp)
        return np.clip((t - 0.5) * rng.uniform(1, 4) + 0.5, 0, 1)  # soft to hard edges
    if kind == "checks":
        period = rng.uniform(3, 9)
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "marble":
        period = rng.uniform(6, 20)
        turbulence = rng.uniform(1, 4)
        return np.abs(np.sin(math.pi * u / period + turbulence * _fbm(rng, h, w, cell=8)))
    if kind == "wood":
        cx, cy = rng.uniform(-w, 2 * w), rng.uniform(-h, 2 * h)
        r = np.hypot(xs - cx, ys - cy)
        rings = r / rng.uniform(2.5, 7) + rng.uniform(0.5, 2) * _fbm(rng, h, w, cell=10, octaves=3)
        return (rings - np.floor(rings)) ** 1.5
    if kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        return np.clip(t + 0.25 * (_fbm(rng, h, w, cell=6, octaves=3) - 0.5), 0, 1)
    if kind == "dots":
        period = rng.uniform(4, 10)
        du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        return (np.hypot(du, dv) < rng.uniform(0.2, 0.4)).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def pattern(rng: np.random.Generator, h: int, w: int, kind: str | None = None) -> np.ndarray:
    """(h, w) float32 in 0..1: a random texture pattern (``kind``, or one of ``TEXTURES``)."""
    return np.broadcast_to(_pattern(rng, kind or str(rng.choice(TEXTURES)), h, w), (h, w))


def colourize(rng: np.random.Generator, t: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(h, w, 3) float32 pixels: ``t`` (h, w) mapped between colours ``low`` and ``high`` (3,), plus grain."""
    # luminance grain, one draw per pixel: three per pixel cost a third of the whole image's time
    grain = rng.standard_normal((*t.shape, 1), dtype=np.float32) * np.float32(rng.uniform(2, 8))
    return np.clip(low + (high - low) * t[..., None] + grain, 0, 255)  # (h, w, 3)


def _object_palette(rng: np.random.Generator, spec: TexturedSpec) -> tuple[np.ndarray, np.ndarray]:
    """An object's two texture colours: a random colour and one up to ``spec.texture_contrast`` from it per
    channel; at 255, two independent colours at least 80 apart (sum over RGB)."""
    if spec.texture_contrast < 255:
        low = rng.uniform(0, 255, size=3).astype(np.float32)
        c = spec.texture_contrast
        return low, np.clip(low + rng.uniform(-c, c, size=3), 0, 255).astype(np.float32)
    while True:
        low, high = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        if np.abs(high - low).sum() >= 80:
            return low, high


def _background(rng: np.random.Generator, w: int, h: int, spec: TexturedSpec) -> np.ndarray:
    """(h, w, 3) float32: a low-contrast texture, a lighting gradient, and clutter that is no object (strokes and
    irregular textured blobs)."""
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    c = spec.background_contrast
    other = np.clip(base + rng.uniform(-c, c, size=3), 0, 255).astype(np.float32)
    pixels = colourize(rng, pattern(rng, h, w), base, other)
    ys, xs = np.ogrid[0:h, 0:w]
    light = rng.uniform(-0.25, 0.25) * (xs / w - 0.5) + rng.uniform(-0.25, 0.25) * (ys / h - 0.5)
    pixels = np.clip(pixels * (1 + light[..., None]), 0, 255)
    for _ in range(
        int(rng.integers(0, spec.max_blobs + 1))
    ):  # blobs: 2-4 overlapping discs with a noisy edge, a potato, no class
        size = int(rng.uniform(12, 0.4 * min(w, h)))
        bx, by = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        yy, xx = np.ogrid[0:size, 0:size]
        yy, xx = (yy.astype(np.float32) + 0.5) / size - 0.5, (xx.astype(np.float32) + 0.5) / size - 0.5
        field = np.full((size, size), -1.0, dtype=np.float32)  # signed distance to the union's edge, in sizes
        for cx, cy, r in rng.uniform((-0.15, -0.15, 0.1), (0.15, 0.15, 0.22), size=(int(rng.integers(2, 5)), 3)):
            field = np.maximum(field, r - np.hypot(xx - cx, yy - cy))
        field += 0.12 * (_fbm(rng, size, size, cell=size / 4, octaves=2) - 0.5)
        alpha = np.clip(field * size + 0.5, 0, 1)[..., None]  # a one-pixel soft edge
        low, high = _object_palette(rng, spec)
        region = pixels[by : by + size, bx : bx + size]
        region[:] = region * (1 - alpha) + colourize(rng, pattern(rng, size, size), low, high) * alpha
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # strokes: curves of 1-3 px, like cables, twigs, scratches
    for _ in range(int(rng.integers(0, spec.max_strokes + 1))):
        start, control, end = rng.uniform((0, 0), (w, h), size=(3, 2))
        t = np.linspace(0, 1, 24)[:, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([tuple(p) for p in curve.tolist()], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(image, dtype=np.float32)


# -- one image ------------------------------------------------------------------------------------------------------
def _place(
    rng: np.random.Generator, kind: str, w: int, h: int, spec: TexturedSpec
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``kind``'s outline at a random size (shorter side log-uniform between ``spec.min_size`` and
    ``spec.max_fraction`` of the image), angle and position inside the image, in image pixels."""
    polygons, holes = unit_shape(kind, rng)
    if spec.max_rotation >= 180:
        angle = rng.uniform(0, 2 * math.pi)
    else:
        angle = math.radians(rng.uniform(-spec.max_rotation, spec.max_rotation))
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    extent = np.ptp(np.concatenate(polygons), axis=0)  # unrotated width and height at scale 1
    largest = max(spec.max_fraction * min(w, h), spec.min_size)
    size = math.exp(rng.uniform(math.log(spec.min_size), math.log(largest)))
    scale = size / float(extent.min())
    polygons, holes = [p @ rotation for p in polygons], [p @ rotation for p in holes]
    pts = np.concatenate(polygons)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    scale = min(scale, (w - 2) / float(hi[0] - lo[0]), (h - 2) / float(hi[1] - lo[1]))  # must fit, 1 px margin
    first = 1 - lo * scale  # (2,) the lowest offset that keeps the shape 1 px inside, and the room above it
    room = np.maximum(np.array([w - 1, h - 1]) - hi * scale - first, 0)  # >= 0: a shape that just fits has none
    offset = first + rng.random(2) * room
    return [p * scale + offset for p in polygons], [p * scale + offset for p in holes]


Layer = tuple[int, int, int, np.ndarray, np.ndarray]  # category id, x0, y0, alpha (bh, bw), pixels (bh, bw, 3)


class Scene:
    """Objects painted over a background one by one, later ones on top, keeping track of what of each stays
    visible (``background`` (h, w, 3) in 0..255)."""

    def __init__(self, background: np.ndarray) -> None:
        self.canvas = background.astype(np.float32)  # (h, w, 3), a copy
        self.objects: list[DrawnObject] = []
        self._full: list[float] = []  # each object's total coverage

    def hidden_by(self, x0: int, y0: int, alpha: np.ndarray) -> list[float]:
        """How much of each object's visible coverage an object of coverage ``alpha`` (bh, bw) at (x0, y0) would
        hide."""
        window = np.s_[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]]
        return [float((obj.visible[window] * alpha).sum()) for obj in self.objects]

    def would_hide(self, x0: int, y0: int, alpha: np.ndarray) -> bool:
        """Whether that object would leave an object beneath with less than ``MIN_VISIBLE`` of its coverage
        (objects already below it are not counted: there is nothing left of them to protect)."""
        for obj, full, hidden in zip(self.objects, self._full, self.hidden_by(x0, y0, alpha), strict=True):
            left = obj.visible_fraction * full
            if left >= MIN_VISIBLE * full and left - hidden < MIN_VISIBLE * full:
                return True
        return False

    def add(self, category_id: int, x0: int, y0: int, alpha: np.ndarray, pixels: np.ndarray) -> None:
        """Paint ``pixels`` (bh, bw, 3) with coverage ``alpha`` (bh, bw) at (x0, y0), over everything so far."""
        window = np.s_[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]]
        self.canvas[window] = self.canvas[window] * (1 - alpha[..., None]) + pixels * alpha[..., None]
        for obj, full in zip(self.objects, self._full, strict=True):
            obj.visible[window] *= 1 - alpha
            obj.visible_fraction = float(obj.visible.sum()) / full
        h, w = self.canvas.shape[:2]
        full_alpha = np.zeros((h, w), dtype=np.float32)
        full_alpha[window] = alpha
        self.objects.append(DrawnObject(category_id, full_alpha, full_alpha.copy()))
        self._full.append(max(float(alpha.sum()), 1e-6))

    def finish(self) -> tuple[np.ndarray, list[DrawnObject]]:
        """``(image (h, w, 3) uint8, [DrawnObject])``, each object's ``bbox`` and ``annotated`` set: at least
        ``MIN_VISIBLE`` of its coverage visible and a visible part at least ``MIN_BOX_SIDE`` px both ways."""
        for obj in self.objects:
            obj.bbox = visible_box(obj.visible)
            obj.annotated = obj.visible_fraction >= MIN_VISIBLE and obj.bbox is not None
        return np.clip(np.rint(self.canvas), 0, 255).astype(np.uint8), self.objects


def compose(background: np.ndarray, layers: list[Layer]) -> tuple[np.ndarray, list[DrawnObject]]:
    """Paint ``layers`` (``(category_id, x0, y0, alpha (bh, bw) in 0..1, pixels (bh, bw, 3))``) over
    ``background`` (h, w, 3) in order: :meth:`Scene.finish`'s image and objects."""
    scene = Scene(background)
    for layer in layers:
        scene.add(*layer)
    return scene.finish()


def render_image(
    rng: np.random.Generator, w: int, h: int, spec: TexturedSpec = TexturedSpec()
) -> tuple[np.ndarray, list[DrawnObject]]:
    """One image of the textured dataset: ``(pixels (h, w, 3) uint8, [DrawnObject])`` in drawing order.

    1..``spec.max_objects`` objects of random classes, each with its own palette and texture, at least
    ``spec.min_contrast`` from the background under it; a placement that would leave an object beneath less than
    ``MIN_VISIBLE`` visible is retried (``PLACEMENT_TRIES``, then the object is left out), except for a
    ``spec.free_placement`` share of objects, which may hide others (those then lose their annotation).
    """
    background = _background(rng, w, h, spec)
    scene = Scene(background)
    kinds = list(spec.categories.items())
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        cid, kind = kinds[int(rng.integers(len(kinds)))]
        free = rng.random() < spec.free_placement
        for _ in range(PLACEMENT_TRIES):
            alpha, (x0, y0) = rasterize(*_place(rng, kind, w, h, spec), w, h)
            if free or not scene.would_hide(x0, y0, alpha):
                break
        else:
            continue  # no room left for this object
        bh, bw = alpha.shape
        under = background[y0 : y0 + bh, x0 : x0 + bw][alpha > 0.5]  # (n, 3)
        under_mean = under.mean(axis=0) if len(under) else background[y0 : y0 + bh, x0 : x0 + bw].mean(axis=(0, 1))
        t = pattern(rng, bh, bw)
        t_mean = float(t[alpha > 0.5].mean()) if len(under) else float(t.mean())
        for _ in range(PALETTE_TRIES):  # the texture's mean colour is low + (high - low) * mean(t)
            low, high = _object_palette(rng, spec)
            if np.abs(low + (high - low) * t_mean - under_mean).sum() >= spec.min_contrast:
                break
        scene.add(cid, x0, y0, alpha, colourize(rng, t, low, high))
    return scene.finish()


# -- the dataset ----------------------------------------------------------------------------------------------------
def dataset_paths(root: Path) -> dict[str, Path]:
    """The COCO layout every generated dataset uses under ``root``, as the config's ``data.*`` keys."""
    return {
        "train_images": root / "train",
        "train_annotations": root / "annotations" / "train.json",
        "val_images": root / "val",
        "val_annotations": root / "annotations" / "val.json",
    }


def is_complete(stamp: Path, params: dict, paths: dict[str, Path]) -> bool:
    """Whether a dataset generated with ``params`` (recorded in ``stamp``) is already there in full."""
    return stamp.is_file() and json.loads(stamp.read_text()) == params and all(p.exists() for p in paths.values())


def generate_textured_dataset(
    root: str | Path,
    *,
    num_train: int = 2000,
    num_val: int = 200,
    min_side: int = 128,
    max_side: int = 160,
    spec: TexturedSpec = TexturedSpec(),
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``root/{train,val}/*.png`` and ``root/annotations/{train,val}.json`` (COCO instances), as
    :func:`detrkit.demo.generate_shapes_dataset` does for the demo's shapes.

    Each image (sides uniform in ``min_side``..``max_side``) holds textured objects of ``spec.classes``
    (:func:`render_image`; ``spec`` says how many, how small, how much clutter). ``bbox`` is the tight box of the
    pixels an object still covers at least half of after occlusion and ``area`` its visible coverage in pixels
    (COCO's segment area), ``iscrowd`` 0. Deterministic for a given seed; nothing is regenerated when
    ``root/params.json`` records the same parameters and every file is there.

    Returns the paths for a run config's ``data`` section: ``train_images``, ``train_annotations``,
    ``val_images``, ``val_annotations``.
    """
    if min_side < 32 or max_side < min_side:
        raise ValueError(f"image sides must satisfy 32 ≤ min_side ≤ max_side, got {min_side} and {max_side}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"the split sizes must be ≥ 0, got {num_train}, {num_val}")
    root = Path(root)
    params = {
        "kind": "textured",
        "version": TEXTURED_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "min_side": min_side,
        "max_side": max_side,
        "spec": {**asdict(spec), "classes": list(spec.classes)},
        "seed": seed,
    }
    paths = dataset_paths(root)
    stamp = root / "params.json"
    if is_complete(stamp, params, paths):
        return paths
    stamp.unlink(missing_ok=True)  # a run cut short must not leave a stamp beside half a dataset
    rng = np.random.default_rng(seed)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in sorted(spec.categories.items())]
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            pixels, objects = render_image(rng, w, h, spec)
            for obj in objects:
                if obj.annotated:
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": i + 1,
                            "category_id": obj.category_id,
                            "bbox": obj.bbox,
                            "area": round(float(obj.visible.sum()), 2),
                            "iscrowd": 0,
                        }
                    )
            name = f"{split}_{i:05d}.png"
            Image.fromarray(pixels).save(root / split / name, compress_level=1)  # fast; these files are small
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        paths[f"{split}_annotations"].parent.mkdir(parents=True, exist_ok=True)
        paths[f"{split}_annotations"].write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
    stamp.write_text(json.dumps(params))
    return paths
