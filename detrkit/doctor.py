"""Check a COCO dataset before training: every annotation and every image header read once, the problems found,
and the statistics that help choose a config (``detrkit doctor DATA``; ``train`` runs the same checks).

Only image *headers* are read (``PIL.Image.open`` without decoding), so a dataset of 100k images is checked in
seconds: missing, unreadable or too large files, sizes disagreeing with the JSON (and whether the EXIF rotation
explains it), EXIF-rotated and 16-bit images. A file whose pixel data is truncated passes here and fails when it
is read, naming the file.

:func:`budget_warning` says when a run is unlikely to learn in its budget (``doctor`` with a config, and
``train`` when it starts), from the measurements the README reports.

Layer: building blocks, beside ``data`` (which it builds on). Imports ``config``, ``data``, ``images``, ``labels``,
``transforms``; matplotlib for the plot.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detrkit.config import ModelConfig, TrainConfig
from detrkit.data import (
    CocoDetection,
    CocoFormatError,
    CocoIndex,
    Issue,
    Issues,
    fix_boxes,
    index_coco,
    load_coco_json,
)
from detrkit.images import ImageHeader, ImageTooLargeError, read_header
from detrkit.labels import LabelMap
from detrkit.transforms import detr_resize_size

STRIDES = (8, 16, 32)  # the backbone's feature strides (DETR uses 32 alone, multi-scale models 8-32)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MAX_CLASSES_SHOWN = 20

# Kinds of problems found in the image headers (data.py names those of the JSON).
MISSING_FILE = "missing image file"
UNREADABLE_FILE = "unreadable image file"
TOO_LARGE = "image too large"
SIZE_MISMATCH = "image size differs from the JSON"
EXIF_SWAPPED = "JSON size matches only the EXIF-rotated image"
EXIF_IGNORED = "EXIF rotation ignored"
HIGH_BIT_DEPTH = "16-bit or 32-bit image (scaled to 8 bits when read)"
TOO_MANY_OBJECTS = "more objects than num_queries"
EMPTY_CATEGORY = "category without objects"
NO_OBJECTS = "no training objects"

# -- "unlikely to learn in its budget" (issue 18): the figures it quotes, all in one place ------------------------
# Measured on the demo's data in the README ("Demo figures", table "The architectures side by side, same budget",
# and "Faster convergence"): MEASURED_STEPS optimizer steps of batch 8, backbone from scratch, one seed each.
# Update them here (and in the README's doctor section) when new measurements replace them.
MEASURED_STEPS = 750
# AP50 after MEASURED_STEPS of each architecture that stayed at the class prior there (no query selection).
SLOW_FROM_SCRATCH_AP50 = {"detr": 0.053, "conditional_detr": 0.057, "yolos": 0.007}
QUERY_SELECTION_AP50 = {"detr": 0.326, "conditional_detr": 0.377}  # the same with model.two_stage=true
DEMO_PRESET_AP50 = 0.861  # Deformable DETR with box refinement (the demo preset), the same steps
# With query selection the schedule's length decides (README, "The goals in minutes"): the shortest measured
# schedules that reached AP50 >= 0.6 from scratch, as (steps, AP50). Shorter runs get a softer warning.
QUERY_SELECTION_GOAL = {"detr": (1750, 0.638), "conditional_detr": (1250, 0.715)}
# A heuristic, not a measurement: nothing of these kinds has been measured to learn below this many times
# MEASURED_STEPS, so a run with fewer steps is warned about. No run of them has been measured above it either.
BUDGET_FACTOR = 4
ARCH_NAMES = {"detr": "DETR", "conditional_detr": "Conditional DETR", "yolos": "YOLOS"}


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found: the problems (``issues``) and the statistics.

    Attributes:
        issues: errors (the dataset is refused), fix-ups (applied and announced) and warnings.
        class_counts: category name → training objects (crowd regions and dropped boxes excluded), by label.
        boxes_per_image: (num_images,) training objects of each image.
        box_relative: (N,) each object's sqrt(box area / image area), after clipping.
        box_pixels: (N,) each object's sqrt(box area) in pixels at the model's input size (``image_size``,
            ``max_size``: the evaluation resize).
        image_sizes: (num_images, 2) [width, height] of each image (the JSON's, else the header's).
    """

    images_dir: Path
    annotations: Path
    issues: Issues
    num_queries: int | None = None
    image_size: int = 800
    max_size: int | None = 1333
    num_annotations: int = 0
    num_crowd: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    boxes_per_image: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    box_relative: np.ndarray = field(default_factory=lambda: np.zeros(0))
    box_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    image_sizes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    seconds: float = 0.0

    @property
    def errors(self) -> list[Issue]:
        return self.issues.of("error")

    @property
    def fixups(self) -> list[Issue]:
        return self.issues.of("fix-up")

    @property
    def warnings(self) -> list[Issue]:
        return self.issues.of("warning")

    @property
    def ok(self) -> bool:
        """No errors (fix-ups and warnings do not stop training)."""
        return not self.errors

    @property
    def num_images(self) -> int:
        return len(self.boxes_per_image)

    @property
    def num_objects(self) -> int:
        return int(self.boxes_per_image.sum())

    def format(self) -> str:
        """The report as text: the dataset, its statistics, then every problem with its count and examples."""
        lines = [f"dataset   {self.annotations} (images in {self.images_dir}; checked in {self.seconds:.1f} s)"]
        if self.num_images:
            lines += self._format_stats()
        lines.append("problems" if list(self.issues) else "problems  none")
        for issue in [*self.errors, *self.fixups, *self.warnings]:
            lines.append(f"  {issue.severity:<8}{issue.summary()}")
            if issue.hint:
                lines.append(f"          {issue.hint}")
        n_err, n_fix, n_warn = (sum(i.count for i in kinds) for kinds in (self.errors, self.fixups, self.warnings))
        verdict = "REFUSED: fix the errors above" if n_err else "OK"
        lines.append(f"result    {verdict} ({n_err} error(s), {n_fix} fix-up(s), {n_warn} warning(s))")
        lines += [f"suggest   {text}" for text in self.suggestions()]
        return "\n".join(lines)

    def suggestions(self) -> list[str]:
        """Settings the statistics call for (issue 18), each with the figure it comes from.

        - ``model.num_queries``: three times the 99th percentile of objects per image (and at least the most
          objects of an image): every object needs a query, and a set predictor learns faster when only a few
          queries per object compete (the demo: at most 4 objects, 10 queries).
        - the input size: single-scale DETR and Conditional DETR read stride 32 (16 with ``feature_level=3``); an
          object spanning less than about two cells there is hard for them to localise, so when the median
          object does, a larger ``image_size`` / ``data.eval_size`` (or ``feature_level=3``, or the multi-scale
          Deformable DETR, whose finest level is stride 8) is suggested.
        """
        out: list[str] = []
        per_image = self.boxes_per_image
        if len(per_image) and per_image.max() > 0:
            p99 = float(np.quantile(per_image, 0.99))
            queries = max(int(per_image.max()), int(np.ceil(3 * p99)))
            out.append(
                f"model.num_queries={queries} (99% of images have at most {p99:.0f} objects, the most is "
                f"{int(per_image.max())})"
            )
        if len(self.box_pixels):
            median = float(np.median(self.box_pixels))
            cells = median / 32
            if cells < 2:
                size = int(np.ceil(self.image_size * 64 / max(median, 1e-6) / 32) * 32)
                out.append(
                    f"the median object spans {cells:.1f} stride-32 cells at image_size {self.image_size}: for DETR "
                    f"and Conditional DETR use model.feature_level=3 or image_size/data.eval_size ≈ {size} "
                    "(two cells); Deformable DETR (strides 8-64) handles it as is"
                )
        return out

    def _format_stats(self) -> list[str]:
        w, h = self.image_sizes[:, 0], self.image_sizes[:, 1]
        pixels = w * h
        order = np.argsort(pixels, kind="stable")
        smallest, median, largest = (self.image_sizes[order[i]] for i in (0, len(order) // 2, -1))
        distinct = len({(int(a), int(b)) for a, b in self.image_sizes})
        per_image = self.boxes_per_image
        lines = [
            f"images    {self.num_images}; w x h smallest {smallest[0]}x{smallest[1]}, median {median[0]}x"
            f"{median[1]}, largest {largest[0]}x{largest[1]} ({distinct} distinct size(s)); "
            f"{int((per_image == 0).sum())} without objects",
            f"objects   {self.num_objects} ({self.num_annotations} annotations in the file; crowd regions, "
            f"which training ignores: {self.num_crowd}); per image mean {per_image.mean():.1f}, "
            f"max {int(per_image.max()) if len(per_image) else 0}"
            + (f" (num_queries {self.num_queries})" if self.num_queries else ""),
        ]
        shown = sorted(self.class_counts.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{name} {count}" for name, count in shown[:MAX_CLASSES_SHOWN])
        if len(shown) > MAX_CLASSES_SHOWN:
            text += f", ... ({len(shown) - MAX_CLASSES_SHOWN} more)"
        lines.append(f"classes   {len(shown)}: {text}")
        if len(self.box_relative):
            lines.append(f"box size  sqrt(box area / image area) quantiles {_quantiles(self.box_relative, '.3f')}")
            resize = f"shorter side {self.image_size}" + (f", longer at most {self.max_size}" if self.max_size else "")
            lines.append(f"          at the model's input ({resize}), sqrt(box area) in feature cells:")
            for stride in STRIDES:
                cells = self.box_pixels / stride
                under = 100 * (cells < 1).mean()
                lines.append(f"          stride {stride:>2}: {_quantiles(cells, '.1f')}; under one cell {under:.1f}%")
        return lines

    def plot(self, path: str | Path) -> Path:
        """A small PNG: the class histogram and the histogram of box sizes relative to the image."""
        # The object-oriented API with its own canvas: no pyplot, no global figure state, any backend.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(10, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax_cls, ax_box = fig.subplots(1, 2)
        shown = sorted(self.class_counts.items(), key=lambda kv: -kv[1])[:30]
        ax_cls.bar(range(len(shown)), [c for _, c in shown], color="#4363d8")
        ax_cls.set_xticks(range(len(shown)), [n for n, _ in shown], rotation=60, ha="right", fontsize=7)
        ax_cls.set_title(f"objects per class ({len(self.class_counts)} classes)", fontsize=9)
        if len(self.box_relative):
            ax_box.hist(self.box_relative, bins=40, range=(0.0, 1.0), color="#3cb44b")
        ax_box.set_xlabel("sqrt(box area / image area)", fontsize=8)
        ax_box.set_title(f"box sizes ({len(self.box_relative)} objects)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        return path


def _quantiles(values: np.ndarray, fmt: str) -> str:
    q = np.quantile(values, QUANTILES)
    return " ".join(f"{int(p * 100)}%:{v:{fmt}}" for p, v in zip(QUANTILES, q, strict=True))


def check_dataset(
    images_dir: str | Path,
    annotations: str | Path,
    *,
    num_queries: int | None = None,
    image_size: int = 800,
    max_size: int | None = 1333,
) -> DatasetReport:
    """Check a COCO dataset (every annotation, every image header) and gather its statistics; never raises for a
    problem of the data: every one is in the report (``report.ok`` is False when there are errors).

    Args:
        images_dir: the folder ``file_name`` entries are relative to.
        annotations: the COCO instances JSON.
        num_queries: the model's number of queries; images with more objects are reported.
        image_size, max_size: the model's input resize (shorter side, longer-side cap), for box sizes in pixels.
    """
    start = time.perf_counter()
    images_dir, annotations = Path(images_dir), Path(annotations)
    try:
        data = load_coco_json(annotations)
    except (FileNotFoundError, CocoFormatError) as e:
        issues = Issues(annotations)
        issues.add("error", "annotation file", str(e))
        return DatasetReport(images_dir, annotations, issues, num_queries, image_size, max_size)
    index = index_coco(data, annotations, images_dir)
    if not images_dir.is_dir():
        index.issues.add("error", "image folder", f"no such folder {images_dir}")
        headers: dict[int, ImageHeader] = {}
    else:
        headers = _read_headers(index)
    sizes = _sizes(index, headers)
    fix_boxes(index, sizes)
    return _report(index, headers, sizes, num_queries, image_size, max_size, start)


def check_loaded_dataset(
    dataset: CocoDetection, *, num_queries: int | None = None, image_size: int = 800, max_size: int | None = 1333
) -> DatasetReport:
    """:func:`check_dataset` for a dataset already built (its JSON checked, its boxes fixed up and announced):
    reads the image headers and adds what they show. The dataset itself is left as it is."""
    start = time.perf_counter()
    index = dataclasses.replace(dataset.index, issues=dataset.index.issues.copy())  # the dataset's stays as it is
    headers = _read_headers(index)
    return _report(index, headers, _sizes(index, headers), num_queries, image_size, max_size, start)


def _sizes(index: CocoIndex, headers: dict[int, ImageHeader]) -> dict[int, tuple[int, int]]:
    """``(height, width)`` of each image the boxes are checked against: the JSON's (as the dataset uses it), else
    the header's."""
    sizes = {i: (h.height, h.width) for i, h in headers.items()}
    sizes.update({i: size for i in index.images if (size := index.json_size(i)) is not None})
    return sizes


def _read_headers(index: CocoIndex) -> dict[int, ImageHeader]:
    """Every readable image's header; what is wrong with the files goes into ``index.issues``."""
    headers: dict[int, ImageHeader] = {}
    add = index.issues.add
    for image_id in sorted(index.images):
        if image_id in index.unreadable:
            continue
        info = index.images[image_id]
        path = index.image_dir / info["file_name"]
        where = f"image {image_id} ({info['file_name']!r})"
        try:
            header = read_header(path)
        except FileNotFoundError:
            add("error", MISSING_FILE, f"{where}: {path} not found", "Check the image folder and the file names")
            continue
        except ImageTooLargeError:
            add(
                "error",
                TOO_LARGE,
                f"{where}: over Pillow's decompression-bomb limit",
                "Downscale these files, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust them",
            )
            continue
        except OSError as e:
            add("error", UNREADABLE_FILE, f"{where}: {e}", "Replace or remove these files")
            continue
        headers[image_id] = header
        stored = (header.width, header.height)
        json_size = index.json_size(image_id)  # (height, width)
        if json_size is not None and stored != (json_size[1], json_size[0]):
            said = f"{json_size[1]}x{json_size[0]}"
            if stored == json_size and header.swaps_sides:  # the JSON has width and height of the turned picture
                add(
                    "error",
                    EXIF_SWAPPED,
                    f"{where}: stored {stored[0]}x{stored[1]}, EXIF orientation {header.orientation}, JSON {said}",
                    "detrkit never applies EXIF rotations (COCO boxes are in the stored pixel grid). If the boxes "
                    "were drawn on the rotated picture, save the images rotated (PIL.ImageOps.exif_transpose); "
                    "otherwise correct width/height in the JSON",
                )
            else:
                add(
                    "error",
                    SIZE_MISMATCH,
                    f"{where}: the file is {stored[0]}x{stored[1]} (w x h), the JSON says {said}",
                    "The boxes would not line up: correct width/height, or use the file that was annotated",
                )
        elif header.orientation != 1:
            add(
                "warning",
                EXIF_IGNORED,
                f"{where}: EXIF orientation {header.orientation}",
                "detrkit reads the stored pixel grid, as COCO boxes are (viewers show these images turned); "
                "nothing to do if the boxes were drawn on the stored pixels",
            )
        if header.sixteen_bit or header.mode in ("I", "F"):
            add("warning", HIGH_BIT_DEPTH, f"{where}: mode {header.mode}", "Scaled to 8 bits (16-bit: ÷257)")
    return headers


def _report(
    index: CocoIndex,
    headers: dict[int, ImageHeader],
    sizes: dict[int, tuple[int, int]],
    num_queries: int | None,
    image_size: int,
    max_size: int | None,
    start: float,
) -> DatasetReport:
    label_map = LabelMap.from_coco_categories(index.categories)
    counts = [0] * label_map.num_classes
    per_image, relative, pixels, image_sizes = [], [], [], []
    num_crowd = 0
    for image_id in sorted(index.images):
        objects = 0
        size = sizes.get(image_id)
        if size is not None:
            image_sizes.append((size[1], size[0]))
            height, width = size
            new_h, _ = detr_resize_size(height, width, image_size, max_size)
            scale = new_h / height
        for ann in index.annotations[image_id]:
            if ann.get("iscrowd", 0):
                num_crowd += 1
                continue
            objects += 1
            counts[label_map.to_label(ann["category_id"])] += 1
            if size is not None:
                x, y, w, h = ann["bbox"]
                area = max(min(x + w, width) - max(x, 0), 0) * max(min(y + h, height) - max(y, 0), 0)
                relative.append(np.sqrt(area / (width * height)))
                pixels.append(np.sqrt(area) * scale)
        per_image.append(objects)
    report = DatasetReport(
        images_dir=index.image_dir,
        annotations=index.ann_file,
        issues=index.issues,
        num_queries=num_queries,
        image_size=image_size,
        max_size=max_size,
        num_annotations=index.num_annotations,
        num_crowd=num_crowd,
        class_counts=dict(zip(label_map.names, counts, strict=True)),
        boxes_per_image=np.asarray(per_image, dtype=np.int64),
        box_relative=np.asarray(relative, dtype=np.float64),
        box_pixels=np.asarray(pixels, dtype=np.float64),
        image_sizes=np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2),
    )
    if num_queries is not None:
        crowded = [(n, i) for n, i in zip(per_image, sorted(index.images), strict=True) if n > num_queries]
        for n, image_id in crowded:
            index.issues.add(
                "warning",
                TOO_MANY_OBJECTS,
                f"image {image_id} ({index.images[image_id].get('file_name')!r}) has {n} objects",
                f"{len(crowded)} image(s) with up to {max(n for n, _ in crowded)} objects, but the model has "
                f"num_queries={num_queries}: the extra objects can never be matched; raise model.num_queries",
            )
    if report.num_objects == 0 and index.num_annotations == 0:
        index.issues.add(
            "warning", NO_OBJECTS, "the file has no annotations", "Nothing to train on (fine for a test set)"
        )
    elif report.num_objects > 0:
        for (cat_id, name), n in zip(zip(label_map.category_ids, label_map.names, strict=True), counts, strict=True):
            if n == 0:
                index.issues.add(
                    "warning",
                    EMPTY_CATEGORY,
                    f"category {cat_id} ({name!r})",
                    "No example of these classes: a model trained on this split learns nothing about them",
                )
    report.seconds = time.perf_counter() - start
    return report


def planned_steps(train: TrainConfig, num_images: int, world_size: int = 1) -> int:
    """Optimizer steps a run of ``train`` makes on ``num_images`` training images, counted as the engine does
    (``engine.sampling.batches_per_epoch``: whole batches only, whole accumulation groups only, at most
    ``max_steps_per_epoch`` updates per epoch)."""
    batches = num_images // max(world_size, 1) // train.batch_size
    if train.max_steps_per_epoch:
        batches = min(batches, train.max_steps_per_epoch * train.grad_accum_steps)
    return batches // train.grad_accum_steps * train.epochs


def _short_schedule_warning(model: ModelConfig, steps: int) -> str | None:
    """DETR / Conditional DETR with query selection from scratch, on a schedule shorter than the shortest one
    measured to reach AP50 0.6 (``QUERY_SELECTION_GOAL``): they learn, but the cosine schedule decays before the
    decoder has caught up (750 steps gave about half the AP50 of the longer runs)."""
    if model.arch not in QUERY_SELECTION_GOAL:
        return None
    goal_steps, goal_ap50 = QUERY_SELECTION_GOAL[model.arch]
    if steps >= goal_steps:
        return None
    return (
        f"short schedule for {ARCH_NAMES[model.arch]} from scratch with query selection: {steps} optimizer steps. "
        f"On the demo's data it reached AP50 {QUERY_SELECTION_AP50[model.arch]:.3f} with a {MEASURED_STEPS}-step "
        f"schedule and {goal_ap50:.3f} with a {goal_steps}-step one (batch 8; README, Faster convergence): the "
        "schedule decays over train.epochs, so choose the epochs for at least that many steps rather than "
        "stopping early, or start from pretrained weights"
    )


def budget_warning(model: ModelConfig, train: TrainConfig, steps: int) -> str | None:
    """Why a run of ``steps`` optimizer steps is unlikely to learn, or None.

    The rule (README, "Check your data"): DETR, Conditional DETR without query selection (``model.two_stage``)
    and YOLOS, with neither ``model.backbone_weights`` nor ``train.init_weights``, for fewer than
    ``BUDGET_FACTOR`` × ``MEASURED_STEPS`` steps: at ``MEASURED_STEPS`` they reached AP50 0.05 or less on the
    demo's data (``SLOW_FROM_SCRATCH_AP50``). With query selection, a softer warning below the shortest schedule
    measured to reach AP50 0.6 (``QUERY_SELECTION_GOAL``). Every figure in a message is one the README reports.
    """
    ap50 = SLOW_FROM_SCRATCH_AP50.get(model.arch)
    if ap50 is None or model.backbone_weights or train.init_weights:
        return None
    if model.two_stage:
        return _short_schedule_warning(model, steps)
    needed = BUDGET_FACTOR * MEASURED_STEPS
    if steps >= needed:
        return None
    name = ARCH_NAMES[model.arch]
    fixes = []
    if model.arch in QUERY_SELECTION_AP50:
        goal_steps, goal_ap50 = QUERY_SELECTION_GOAL[model.arch]
        fixes.append(
            f"model.two_stage=true (query selection: AP50 {QUERY_SELECTION_AP50[model.arch]:.3f} there, "
            f"{goal_ap50:.3f} with a {goal_steps}-step schedule)"
        )
        fixes.append(f"Deformable DETR with box refinement (the demo preset: AP50 {DEMO_PRESET_AP50:.3f})")
        fixes.append("pretrained weights (model.backbone_weights=IMAGENET1K_V1, or train.init_weights=...)")
    else:
        fixes.append("a pretrained DeiT backbone (model.backbone_weights: see the yolos presets)")
        fixes.append(f"Deformable DETR with box refinement (the demo preset: AP50 {DEMO_PRESET_AP50:.3f} there)")
    fixes.append(
        f"at least {needed} steps ({BUDGET_FACTOR}x the measured {MEASURED_STEPS}, {needed / max(steps, 1):.1f}x "
        "this run's: a rule of thumb, not a measurement)"
    )
    return (
        f"unlikely to learn in {steps} optimizer steps: {name} from scratch (no model.backbone_weights, no "
        f"train.init_weights{'' if model.arch == 'yolos' else ', no model.two_stage'}) reached AP50 {ap50:.3f} "
        f"after {MEASURED_STEPS} steps of batch 8 on the demo's data (README, Demo figures). Consider: "
        + "; ".join(fixes)
    )
