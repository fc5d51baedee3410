"""Typed configuration: what a model is (``ModelConfig``, saved in ``config.json`` beside the weights) and how it
is trained (``LossConfig``, ``DataConfig``, ``TrainConfig``, together a ``RunConfig``). Dataclasses validate
themselves on creation; nothing mutates a config after that.

Layer: config, the lowest. Imports nothing from detrkit. What belongs to one architecture (which fields it reads,
its own options and checks) is declared in its model file (``detrkit.models.registry``), not here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Old names of ModelConfig fields, still read from config.json files and overrides written before the rename.
RENAMED_MODEL_FIELDS = {"nheads": "num_heads", "dim_feedforward": "ffn_dim"}
# How panoptic post-processing gives pixels to queries (``ModelConfig.panoptic_merge``, ``postprocess_panoptic``).
PANOPTIC_MERGES = ("reference", "score")


def _check_finite(config: Any, section: str) -> None:
    """Refuse NaN and ±inf in every number of ``config`` (a NaN learning rate trains a model full of NaN)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        named = value.items() if isinstance(value, dict) else [(None, value)]  # model.options: name the option
        for key, v in named:
            items = v if isinstance(v, (tuple, list)) else (v,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in items):
                raise ValueError(
                    f"{section}.{f.name}{'' if key is None else f'.{key}'} must be a finite number, got {v}"
                )


def _check_range(
    config: Any,
    section: str,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a field (or any item of a tuple field) outside ``[low, high]`` (open ends where asked)."""
    value = getattr(config, name)
    for v in value if isinstance(value, tuple) else (value,):
        below = low is not None and (v <= low if low_open else v < low)
        above = high is not None and (v >= high if high_open else v > high)
        if below or above:
            if high is None:
                bound = f"{'>' if low_open else '≥'} {low:g}"
            else:
                bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"{section}.{name} must be {bound}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and hyper-parameters of a detector. Defaults are the DETR paper's (R50, 100 queries).

    The first group of fields is read by every architecture; each later group belongs to the architectures that
    declare it (``ARCHITECTURE.fields`` in their model file) and must keep its default on the others.
    """

    arch: str = "detr"
    num_classes: int = 91  # K, real classes; the class head has K+1 outputs (the last is no-object)
    # Dataset category id and name of each contiguous label; None means labels are their own ids.
    category_ids: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None
    # Which classes are countable "things" (True) and which amorphous "stuff" (False), for panoptic
    # post-processing (stuff segments of one class are merged); None when the dataset does not say.
    class_isthing: tuple[bool, ...] | None = None
    backbone: str = "resnet50"
    dilation: bool = False  # DC5: stride 16 in the last stage
    # Which ResNet stage feeds the transformer: 4 (stride 32, the paper) or 3 (stride 16: finer, for small images).
    feature_level: int = 4
    trainable_stages: int = 3  # layer2-4 train, the stem and layer1 stay frozen (paper recipe)
    backbone_weights: str | None = None  # torchvision weights name, e.g. "IMAGENET1K_V1"; downloaded when set
    backbone_norm: str = "frozen"  # "frozen" BatchNorm (paper) or "batch" (trainable, for training from scratch)
    mask_backbone_padding: bool = True  # padding-exact backbone (see backbone.py); off for published weights
    position_embedding: str = "sine"  # or "learned"
    # Wavelength base of the sine encoding. 10000 (the paper) spreads 64 frequencies over wavelengths up to
    # 10000·2π, so on a feature map of a few cells most channels barely vary; a small base (e.g. 20) keeps them
    # all position-dependent.
    position_temperature: float = 10000.0
    hidden_dim: int = 256
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 2048  # hidden width of the transformer's feed-forward blocks
    dropout: float = 0.1
    attention_dropout: float = 0.1  # the official code's nn.MultiheadAttention drops attention weights too
    activation_dropout: float = 0.1  # dropout inside the FFN, between its two linear layers
    num_queries: int = 100
    # "softmax": K+1 logits with a no-object class and cross-entropy (DETR); "focal": K sigmoid logits with the
    # focal loss and matching cost of Deformable/Conditional DETR, which converges faster.
    class_loss: str = "softmax"
    aux_loss: bool = True
    # Inference defaults travel with the model so `predict` resizes the way the model was trained.
    image_size: int = 800
    max_size: int = 1333
    # Panoptic post-processing keeps the queries scoring above this (the reference's 0.85 for softmax DETR; focal
    # models trained briefly score lower): an inference default that travels with the model, like image_size.
    panoptic_threshold: float = 0.85
    # Which kept query a pixel goes to. "reference": the highest mask logit (DETR's PostProcessPanoptic).
    # "score": the highest score × mask probability (Mask2Former's merging), so that a doubtful query's mask
    # yields to a confident one's: a lower threshold then lets real objects in without their false neighbours.
    panoptic_merge: str = "reference"
    # Options of an architecture that are not fields here: validated by its ``Architecture.options`` dataclass.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # -- ResNet architectures (DETR, Conditional DETR, Deformable DETR) ---------------------------------------
    # The DETR paper's mask head (section 4.4): one mask-logit map per query at stride 4, ``pred_masks``.
    masks: bool = False
    # Train only the mask head (the paper's second stage): every other parameter gets requires_grad=False.
    freeze_detector: bool = False
    # How the mask head's attention maps enter its convolutions. "reference": as the paper's (a softmax over every
    # head and position jointly, so each value is ~1/(heads·h·w): beside unit-scale features the maps barely
    # register and the masks hardly depend on the query — published weights expect it). "unit": the same maps
    # scaled to mean 1 over the image's cells, which lets a mask head trained from scratch learn per-query masks.
    mask_attention_scale: str = "reference"
    # Deformable DETR: the backbone stage whose encoder memory the mask head attends to (DETR's is its one level).
    # 4: stride 32, as DETR; 3: stride 16, four times the cells, so each query's maps can tell apart objects a
    # stride-32 cell would hold together (small images, small objects).
    mask_feature_level: int = 4
    # -- Training-only queries (DETR, Conditional DETR, Deformable DETR; models/denoising.py) -----------------
    # Denoising (DN-DETR; DINO's CDN): noised copies of every target as extra decoder queries, hidden from the
    # matched queries, reconstructing their target without matching. 0 = off; DN-DETR uses 5 groups.
    dn_groups: int = 0
    dn_label_noise: float = 0.25  # probability that a copy's label is replaced by a random class (DINO: 0.5·0.5)
    dn_box_noise: float = 0.4  # corner jitter as a fraction of the half-size (DN-DETR 0.4; DINO 1.0)
    dn_contrastive: bool = False  # DINO: a negative copy per target (jittered 1-2× further), taught "no object"
    # One-to-many branch (H-DETR): extra queries matched to the targets repeated one_to_many_repeat times. 0 = off.
    one_to_many_queries: int = 0
    one_to_many_repeat: int = 6
    # -- Deformable DETR ---------------------------------------------------------------------------------------
    num_feature_levels: int = 4  # backbone stages at strides 8/16/32 (+ extra stride-64 levels up to this count)
    enc_points: int = 4  # sampling points per head and level in the encoder's deformable attention
    dec_points: int = 4  # ... and in the decoder's cross-attention
    # iterative bounding-box refinement (a box head per decoder layer; also DETR and Conditional DETR, where each
    # layer's query position and reference point come from the previous layer's box: models/single_scale.py)
    box_refine: bool = False
    # encoder proposals become the decoder's reference boxes and query positions (also Conditional DETR's query
    # selection: its anchors)
    two_stage: bool = False
    # DINO's mixed query selection (two-stage only): proposals give the reference boxes and positions, the content
    # queries stay learned embeddings (the encoder's features are too coarse to be content).
    mixed_query_selection: bool = False
    # DINO's look forward twice (box refinement only, all three): a layer's box loss also trains the previous
    # layer's box.
    look_forward_twice: bool = False
    # -- YOLOS (arch "yolos", backbone "vit"): hidden_dim, num_heads, enc_layers (ViT depth), ffn_dim and
    # num_queries (detection tokens) come from the fields above.
    patch_size: int = 16
    pretrain_image_size: tuple[int, int] = (800, 1333)  # (h, w) the position embeddings were learned at
    mid_position_embeddings: bool = False  # YOLOS-S/B: position embeddings added before every block
    # "mask": padded patches are masked out of attention (batch-independent results); "ignore": transformers'
    # behaviour, padding is attended to like image content.
    vit_padding: str = "mask"

    def __post_init__(self) -> None:
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a mapping, got {self.options!r}")
        _check_finite(self, "model")
        if len(self.pretrain_image_size) != 2:
            raise ValueError(f"pretrain_image_size must be (h, w), got {self.pretrain_image_size}")
        object.__setattr__(self, "pretrain_image_size", tuple(int(v) for v in self.pretrain_image_size))
        _check_range(self, "model", "pretrain_image_size", low=1)
        _check_range(self, "model", "hidden_dim", low=1)
        _check_range(self, "model", "ffn_dim", low=1)
        _check_range(self, "model", "trainable_stages", low=0, high=5)
        _check_range(self, "model", "panoptic_threshold", low=0, high=1)
        if self.panoptic_merge not in PANOPTIC_MERGES:
            raise ValueError(f"model.panoptic_merge must be one of {PANOPTIC_MERGES}, got {self.panoptic_merge!r}")
        _check_range(self, "model", "position_temperature", low=0, low_open=True)
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            _check_range(self, "model", name, low=0, high=1, high_open=True)
        _check_range(self, "model", "dn_label_noise", low=0, high=1)
        _check_range(self, "model", "dn_box_noise", low=0)
        for name in ("dn_groups", "one_to_many_queries"):
            _check_range(self, "model", name, low=0)
        _check_range(self, "model", "one_to_many_repeat", low=1)
        for name in ("num_feature_levels", "enc_points", "dec_points", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.class_loss not in ("softmax", "focal"):
            raise ValueError(f"class_loss must be 'softmax' or 'focal', got {self.class_loss!r}")
        if self.feature_level not in (3, 4):
            raise ValueError(f"feature_level must be 3 or 4, got {self.feature_level}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {self.num_classes}")
        if self.num_heads < 1 or self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by num_heads {self.num_heads}")
        if self.hidden_dim % 4:
            raise ValueError(f"hidden_dim must be a multiple of 4 for the 2-D sine encoding, got {self.hidden_dim}")
        for name in ("enc_layers", "num_queries", "image_size", "max_size"):
            if getattr(self, name) < (0 if name == "enc_layers" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dec_layers < 1:
            raise ValueError(f"dec_layers must be ≥ 1, got {self.dec_layers}")
        if self.category_ids is not None:
            object.__setattr__(self, "category_ids", tuple(int(c) for c in self.category_ids))
            if len(self.category_ids) != self.num_classes:
                raise ValueError(
                    f"category_ids has {len(self.category_ids)} entries but num_classes is {self.num_classes}"
                )
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"class_names has {len(self.class_names)} entries but num_classes is {self.num_classes}"
                )
        if self.class_isthing is not None:
            if not all(isinstance(t, (bool, int)) and t in (True, False) for t in self.class_isthing):
                raise ValueError(f"class_isthing must hold true/false flags, got {list(self.class_isthing)}")
            object.__setattr__(self, "class_isthing", tuple(bool(t) for t in self.class_isthing))
            if len(self.class_isthing) != self.num_classes:
                raise ValueError(
                    f"class_isthing has {len(self.class_isthing)} entries but num_classes is {self.num_classes}"
                )
        if self.mask_attention_scale not in ("reference", "unit"):
            raise ValueError(
                f"model.mask_attention_scale must be 'reference' or 'unit', got {self.mask_attention_scale!r}"
            )
        if self.mask_feature_level not in (3, 4):
            raise ValueError(f"model.mask_feature_level must be 3 or 4, got {self.mask_feature_level}")
        if self.freeze_detector and not self.masks:
            raise ValueError("freeze_detector trains the mask head alone: it needs masks=True")

    @property
    def focal(self) -> bool:
        """Sigmoid/focal classification: K logits, no no-object class."""
        return self.class_loss == "focal"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("category_ids", "class_names", "class_isthing", "pretrain_image_size"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = rename_model_fields(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


@dataclass(frozen=True)
class LossConfig:
    """Matching costs and loss weights (DETR section 3.1 and appendix A.2)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    weight_ce: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    eos_coef: float = 0.1  # weight of the no-object class in the cross-entropy
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    weight_mask: float = 1.0  # per-pixel sigmoid focal loss on matched masks (models with masks only)
    weight_dice: float = 1.0  # DICE loss on matched masks (models with masks only)
    # IoU-aware classification (focal models): a matched query's class target is its box's IoU with the target
    # instead of 1 (varifocal loss, as RT-DETR/DEIM), so scores rank detections by box quality.
    iou_aware: bool = False
    weight_one_to_many: float = 1.0  # the one-to-many branch's loss against the one-to-one loss (H-DETR: 1)

    def __post_init__(self) -> None:
        _check_finite(self, "loss")
        weights = ("weight_ce", "weight_bbox", "weight_giou", "weight_mask", "weight_dice", "weight_one_to_many")
        for name in ("cost_class", "cost_bbox", "cost_giou", *weights, "focal_gamma"):
            _check_range(self, "loss", name, low=0)
        _check_range(self, "loss", "eos_coef", low=0, high=1, low_open=True)
        _check_range(self, "loss", "focal_alpha", low=0, high=1)


@dataclass(frozen=True)
class DataConfig:
    """Where the COCO-format data is and how it is augmented (the DETR recipe by default)."""

    # "coco": a COCO instances JSON (boxes; masks from its segmentations when the model has masks); "coco_panoptic":
    # a COCO panoptic JSON with its PNG folder (things and stuff segments as masks).
    format: str = "coco"
    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    # coco_panoptic: the folders of segment-id PNGs; empty = the annotation JSON's path without ".json"
    train_panoptic_pngs: str = ""
    val_panoptic_pngs: str = ""
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    train_max_size: int = 1333
    crop_resize: tuple[int, ...] = (400, 500, 600)  # shorter side before the random crop
    crop_size: tuple[int, int] = (384, 600)  # min and max side of the random crop
    random_crop: bool = True  # the second branch of the DETR augmentation (resize, crop, resize)
    eval_size: int = 800
    eval_max_size: int = 1333
    num_workers: int = 2
    # training batches of landscape-only or portrait-only images (detectron2's grouping): less padding to compute on
    group_by_aspect_ratio: bool = True

    def __post_init__(self) -> None:
        _check_finite(self, "data")
        if self.format not in ("coco", "coco_panoptic"):
            raise ValueError(f"data.format must be 'coco' or 'coco_panoptic', got {self.format!r}")
        if not self.train_scales:
            raise ValueError("data.train_scales must list at least one size")
        for name in ("train_scales", "train_max_size", "crop_resize", "crop_size", "eval_size", "eval_max_size"):
            _check_range(self, "data", name, low=1)
        if len(self.crop_size) != 2 or self.crop_size[0] > self.crop_size[1]:
            raise ValueError(f"data.crop_size must be (min, max) with min ≤ max, got {self.crop_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be ≥ 0, got {self.num_workers}")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe and the run's bookkeeping. Defaults are the DETR paper's (500-epoch schedule)."""

    output_dir: str = "runs/detr"
    epochs: int = 500
    batch_size: int = 2  # per process
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # 0 disables gradient clipping
    schedule: str = "step"  # "step" (drops at lr_drop_epochs) or "cosine" (with linear warm-up)
    lr_drop_epochs: tuple[int, ...] = (400,)
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the peak learning rate
    grad_accum_steps: int = 1
    amp: str = "none"  # "none", "bf16" (CPU and GPU) or "fp16" (GPU, with loss scaling)
    ema: bool = False
    ema_decay: float = 0.9997
    seed: int = 42
    deterministic: bool = False
    eval_every: int = 1  # epochs; 0 evaluates only at the end
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_last: int = 3
    max_nonfinite_steps: int = 20  # consecutive non-finite losses before training stops
    log_every: int = 20  # steps between log lines when the output is not a terminal
    tensorboard: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    init_weights: str | None = None  # fine-tune from these weights (detrkit folder, transformers folder, .pth, Hub id)
    max_steps_per_epoch: int = 0  # 0: the whole dataset; >0 caps each epoch (smoke tests, quick looks)
    # training images (eval transforms) matched every quarter epoch to record which query takes each object
    # (query_stats.json, the report's "How the queries learn"); 0: off
    query_stats_images: int = 32
    report: bool = True  # write report.html into the run folder when training completes

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        if not self.output_dir:
            raise ValueError("train.output_dir must name the run folder, got an empty value")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"train.schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"train.amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        for name in (
            "epochs",
            "batch_size",
            "grad_accum_steps",
            "keep_last",
            "max_nonfinite_steps",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {self.ema_decay}")
        _check_range(self, "train", "lr", low=0, low_open=True)
        _check_range(self, "train", "lr_drop_factor", low=0, low_open=True)
        for name in (
            "lr_backbone",
            "weight_decay",
            "clip_max_norm",
            "lr_drop_epochs",
            "warmup_steps",
            "eval_every",
            "checkpoint_every_steps",
            "max_steps_per_epoch",
            "query_stats_images",
        ):
            _check_range(self, "train", name, low=0)
        _check_range(self, "train", "min_lr_ratio", low=0, high=1)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run directory and in checkpoints."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, d, "")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """Apply dotted ``key=value`` overrides; values are parsed as YAML.

        For example ``train.lr=2e-4`` or ``data.train_scales=[96,128]``.
        """
        import yaml

        d = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=2e-4)")
            key, raw = item.split("=", 1)
            parts = key.strip().split(".")
            if len(parts) == 2 and parts[0] == "model":
                parts[1] = RENAMED_MODEL_FIELDS.get(parts[1], parts[1])
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ValueError(f"override {item!r}: the value is not valid YAML ({_first_line(e)})") from e
            if len(parts) == 3 and parts[:2] == ["model", "options"]:  # an architecture's own option: any key
                d["model"]["options"][parts[2]] = value
                continue
            node = d
            for part in parts[:-1]:
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"unknown config key {key!r}")
                node = node[part]
            if not isinstance(node, dict) or parts[-1] not in node:
                raise ValueError(f"unknown config key {key!r}")
            node[parts[-1]] = value
        return RunConfig.from_dict(d)


def rename_model_fields(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with the fields of ``RENAMED_MODEL_FIELDS`` under their current names (old config.json files)."""
    out = dict(d)
    for old, new in RENAMED_MODEL_FIELDS.items():
        if old in out:
            if new in out:
                raise ValueError(f"model config has both {old!r} and its new name {new!r}; keep {new!r}")
            out[new] = out.pop(old)
    return out


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (missing keys take their defaults) and apply dotted overrides.

    A path that is not a file is looked up among the packaged presets (``detr_r50``, ``demo``, ...).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        preset = PRESETS_DIR / f"{p.name.removesuffix('.yaml')}.yaml"
        if not preset.is_file():
            names = ", ".join(sorted(x.stem for x in PRESETS_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"no config file {path} and no preset of that name (presets: {names})")
        p = preset
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a text file, so not a YAML run config ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {_first_line(e)}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: a run config must be a mapping with sections model, data, loss, train")
    try:
        config = RunConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from e
    return config.with_overrides(overrides or [])


PRESETS_DIR = Path(__file__).parent / "configs"


def _first_line(e: Exception) -> str:
    """A YAML error in one line: what went wrong and where (PyYAML spreads it over several, with a caret)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _from_dict(cls: type, d: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and converting values to the declared types."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    if cls is ModelConfig:
        d = rename_model_fields(d)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(where + k for k in unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_type = args[0] if args else Any
        return tuple(_coerce(item_type, v, where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:  # an empty override (`data.val_annotations=`) reads as null
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value
