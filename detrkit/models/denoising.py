"""Training-only decoder queries shared by DETR, Conditional DETR and Deformable DETR: (contrastive) denoising and
the one-to-many branch, and the self-attention mask that keeps them from the queries that are matched.

- **Denoising** (Li et al. 2022, "DN-DETR", Sec. 3; Zhang et al. 2023, "DINO", Sec. 3.3): each ground-truth box is
  copied into ``dn_groups`` groups, its box jittered and its label sometimes replaced by a random class; the copies
  enter the decoder as extra queries (content: an embedding of the noised label; position: the noised box) and
  must reconstruct the true box and class. No matching: query ``s`` of a group answers for target ``s``. With
  ``dn_contrastive`` (DINO's CDN) every group also holds one *negative* copy per target, jittered further (between
  one and two times the noise scale instead of below it), which must predict "no object": the decoder learns to
  reject a query that sits near an object but not on it, which is what duplicate predictions are.
- **One-to-many** (Jia et al. 2023, "H-DETR", Sec. 3.2, the hybrid branch): ``one_to_many_queries`` extra queries
  matched to the ground truth repeated ``one_to_many_repeat`` times, so that each object trains several queries
  per step; the one-to-one queries alone are used at inference.

Both exist only in training mode, after the matching queries: the decoder runs on ``[matching | denoising |
one-to-many]`` and the outputs are split back (``split_outputs``), so inference, export and the matching queries'
outputs are unchanged by them. The mask (``query_attention_mask``) hides denoising queries from the matching ones
(they would otherwise read the answer), each denoising group from the others, padding slots from everyone, and the
one-to-many branch from the rest in both directions (H-DETR: the two branches only share parameters).

The layout of the denoising queries is ``(G, P, S)`` flattened: G groups, P parts (1, or 2 with the contrastive
negatives second), S slots = the most targets of an image in the batch (at least 1); slot ``s`` of image ``b`` is
a real query when ``s < N_b``. The criterion (``criterion.py``) reads the same layout from ``groups`` and ``parts``.

Legend: B batch, Q matching queries, G groups, P parts, S slots, Qd = G·P·S denoising queries, Qo one-to-many
queries, Qt = Q + Qd + Qo, D model width, K classes, L decoder layers, N_b targets of image b.

Layer: models (a base module, not an architecture). Imports torch, ``box_ops``, ``position_encoding`` and
``models.layers``; every architecture may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..config import ModelConfig
from ..position_encoding import sine_embed_points
from .layers import MLP

__all__ = [
    "QUERY_TRAINING_FIELDS",
    "TRAINING_ONLY_PREFIXES",
    "BoxPosition",
    "DenoisingQueries",
    "ExtraQueries",
    "check_query_training_config",
    "extra_queries",
    "query_attention_mask",
    "split_outputs",
]

#: ModelConfig fields of the training-only queries (declared by every architecture that has them).
QUERY_TRAINING_FIELDS = (
    "dn_groups",
    "dn_label_noise",
    "dn_box_noise",
    "dn_contrastive",
    "one_to_many_queries",
    "one_to_many_repeat",
)
#: State-dict prefixes of parameters used in training only: fine-tuning may start without them (they start from
#: scratch) or drop them (a run that turns the options off).
TRAINING_ONLY_PREFIXES = ("denoising.", "one_to_many_")


def check_query_training_config(config: ModelConfig) -> None:
    """Value checks of the training-only query options (ranges are checked by ``ModelConfig`` itself)."""
    if (config.dn_groups or config.one_to_many_queries) and config.freeze_detector:
        raise ValueError(
            "dn_groups and one_to_many_queries train the detector's decoder: they do nothing with freeze_detector "
            "(which trains the mask head alone); turn them off"
        )
    if config.one_to_many_queries and config.masks:
        raise ValueError(
            "one_to_many_queries is not supported with masks=true (the mask losses are one-to-one): "
            "set model.one_to_many_queries=0"
        )


@dataclass
class ExtraQueries:
    """The training-only queries of one batch, as the decoder takes them.

    Attributes:
        boxes: ``(B, Qd, 4)`` the denoising queries' noised boxes, normalised cxcywh (their reference boxes).
        labels: ``(B, Qd)`` the noised labels.
        valid: ``(B, G, P·S)`` True where a denoising slot holds a target's copy.
        groups, parts: the layout (see the module docstring); ``groups == 0`` without denoising.
        num_one_to_many: Qo.
        one_to_many_repeat: how many times the one-to-many queries see each target.
    """

    boxes: Tensor
    labels: Tensor
    valid: Tensor
    groups: int
    parts: int
    num_one_to_many: int
    one_to_many_repeat: int = 1

    @property
    def num_denoising(self) -> int:
        return self.boxes.shape[1]


class DenoisingQueries(nn.Module):
    """Samples noised copies of the targets and embeds their labels (the queries' content).

    Args:
        num_classes: K.
        dim: D.
        groups: G, copies of every target per step.
        label_noise: probability that a copy's label is replaced by a uniformly drawn class.
        box_noise: λ, the box jitter as a fraction of the half-size: each corner of a positive copy moves by less
            than λ·w/2 horizontally and λ·h/2 vertically, a negative copy's by between λ and 2λ times that.
        contrastive: add a negative copy per target (DINO's contrastive denoising).
        box_position: the architecture's box → query-position map (``BoxPosition`` for DETR and Conditional DETR),
            kept here so that its parameters are training-only too; None where the architecture embeds boxes with
            modules it has anyway (Deformable DETR's proposal embedding).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        groups: int,
        label_noise: float,
        box_noise: float,
        contrastive: bool,
        box_position: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.groups = groups
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.parts = 2 if contrastive else 1
        self.label_embed = nn.Embedding(num_classes, dim)
        self.box_position = box_position

    def sample(self, targets: list[dict[str, Tensor]], device: torch.device) -> ExtraQueries:
        """Noised copies of ``targets`` (B dicts with ``labels (N_b,)`` and ``boxes (N_b,4)`` normalised cxcywh).

        Randomness comes from the default generator, like dropout's: a run's random stream (seeded, saved in its
        checkpoints) decides it, so a resumed run draws the same noise.
        """
        b, g, p = len(targets), self.groups, self.parts
        sizes = [len(t["labels"]) for t in targets]
        s = max(max(sizes, default=0), 1)
        labels = torch.zeros(b, s, dtype=torch.int64, device=device)
        boxes = torch.zeros(b, s, 4, device=device)
        boxes[..., :2] = 0.5  # padding slots: a valid box, never supervised nor seen
        boxes[..., 2:] = 0.1
        valid = torch.zeros(b, s, dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            n = sizes[i]
            labels[i, :n] = t["labels"].to(device)
            boxes[i, :n] = t["boxes"].to(device, torch.float32)
            valid[i, :n] = True
        labels = labels[:, None, None].expand(b, g, p, s)  # (B, G, P, S)
        boxes = boxes[:, None, None].expand(b, g, p, s, 4)  # (B, G, P, S, 4)
        if self.label_noise > 0:
            flip = torch.rand(labels.shape, device=device) < self.label_noise
            random = torch.randint(0, self.num_classes, labels.shape, device=device)
            labels = torch.where(flip, random, labels)
        if self.box_noise > 0:
            # DINO's jitter: corners move by a fraction of the half-size, [0, 1) for positives and [1, 2) for
            # negatives (times λ), in a random direction.
            xyxy = box_cxcywh_to_xyxy(boxes)
            half = torch.cat([boxes[..., 2:], boxes[..., 2:]], -1) / 2  # (B, G, P, S, 4)
            magnitude = torch.rand(xyxy.shape, device=device)
            if p == 2:
                magnitude = magnitude + torch.tensor([0.0, 1.0], device=device).view(1, 1, 2, 1, 1)
            sign = torch.randint(0, 2, xyxy.shape, device=device) * 2.0 - 1.0
            xyxy = (xyxy + sign * magnitude * half * self.box_noise).clamp(0, 1)
            # corners that crossed make an empty box; a tiny positive size keeps its embedding and logit finite
            boxes = box_xyxy_to_cxcywh(xyxy)
            boxes = torch.cat([boxes[..., :2], boxes[..., 2:].clamp(min=1e-3)], -1)
        valid = valid[:, None, None].expand(b, g, p, s).reshape(b, g, p * s)  # (B, G, P·S)
        return ExtraQueries(
            boxes=boxes.reshape(b, g * p * s, 4),  # (B, Qd, 4)
            labels=labels.reshape(b, g * p * s),  # (B, Qd)
            valid=valid,
            groups=g,
            parts=p,
            num_one_to_many=0,
        )

    def content(self, labels: Tensor) -> Tensor:
        """``labels (B,Qd)`` → the content queries ``(B,Qd,D)``."""
        return self.label_embed(labels)


class BoxPosition(nn.Module):
    """A box → a query position, for decoders whose matching queries have learned positions rather than boxes
    (DETR, Conditional DETR): the sine encoding of (cx, cy) and of (w, h) with the feature map's frequencies, then a
    2-layer MLP (DAB-DETR's anchor → query-position map). ``boxes (...,4)`` → ``(...,D)``."""

    def __init__(self, dim: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.mlp = MLP(dim, dim, dim, 2)

    def forward(self, boxes: Tensor) -> Tensor:
        d = self.mlp.layers[0].in_features
        centre = sine_embed_points(boxes[..., :2], d // 4, temperature=self.temperature)  # (..., D/2)
        size = sine_embed_points(boxes[..., 2:], d // 4, temperature=self.temperature)  # (..., D/2)
        return self.mlp(torch.cat([centre, size], -1))  # (..., D)


def extra_queries(
    denoising: DenoisingQueries | None,
    config: ModelConfig,
    targets: list[dict[str, Tensor]] | None,
    batch: int,
    device: torch.device,
) -> ExtraQueries | None:
    """The training-only queries of one training batch: denoising copies of ``targets`` (with ``denoising``) and
    ``config.one_to_many_queries`` one-to-many queries; None when there are neither."""
    num_one_to_many = config.one_to_many_queries
    if denoising is None and not num_one_to_many:
        return None
    if denoising is not None:
        if targets is None:
            raise ValueError(
                "this model trains with denoising queries (model.dn_groups > 0): call it in training mode as "
                "model(pixel_values, padding_mask, targets=targets)"
            )
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        extra = denoising.sample(targets, device)
    else:
        extra = ExtraQueries(
            boxes=torch.zeros(batch, 0, 4, device=device),
            labels=torch.zeros(batch, 0, dtype=torch.int64, device=device),
            valid=torch.zeros(batch, 0, 0, dtype=torch.bool, device=device),
            groups=0,
            parts=1,
            num_one_to_many=0,
        )
    extra.num_one_to_many = num_one_to_many
    extra.one_to_many_repeat = config.one_to_many_repeat
    return extra


def query_attention_mask(num_matching: int, extra: ExtraQueries) -> Tensor:
    """Who may attend to whom in the decoder's self-attention over ``[matching | denoising | one-to-many]``.

    Returns ``(B, 1, Qt, Qt)`` bool, True where row query may attend to column query:
    matching queries see the matching queries only; a denoising query sees the matching queries and the real
    slots of its own group; one-to-many queries see each other only. Every row sees something, so the softmax is
    never empty.
    """
    b, g = extra.valid.shape[0], extra.groups
    q, qd, qo = num_matching, extra.num_denoising, extra.num_one_to_many
    qt = q + qd + qo
    device = extra.valid.device
    allowed = torch.zeros(b, qt, qt, dtype=torch.bool, device=device)
    allowed[:, :q, :q] = True
    if qd:
        per_group = qd // g
        allowed[:, q : q + qd, :q] = True
        group = torch.arange(qd, device=device) // per_group  # (Qd,)
        same_group = group[:, None] == group[None, :]  # (Qd, Qd)
        real = extra.valid.reshape(b, qd)  # (B, Qd)
        allowed[:, q : q + qd, q : q + qd] = same_group[None] & real[:, None, :]
    if qo:
        allowed[:, q + qd :, q + qd :] = True
    return allowed[:, None]  # (B, 1, Qt, Qt)


def split_outputs(
    logits: Tensor, boxes: Tensor, num_matching: int, extra: ExtraQueries | None, *, aux: bool = True
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Per-layer ``logits (L,B,Qt,C)`` and ``boxes (L,B,Qt,4)`` → the matching queries' ``(L,B,Q,·)`` and the extra
    outputs: ``denoising`` (``pred_logits (B,Qd,C)``, ``pred_boxes``, ``aux_outputs``, ``groups``, ``parts``) and
    ``one_to_many`` (``pred_logits (B,Qo,C)``, ``pred_boxes``, ``aux_outputs``, ``repeat``), each present when it
    has queries;
    ``aux_outputs`` only with ``aux`` (the model's ``aux_loss``)."""
    extras: dict[str, Any] = {}
    if extra is None:
        return logits, boxes, extras
    q, qd = num_matching, extra.num_denoising
    if qd:
        extras["denoising"] = _layers(logits[:, :, q : q + qd], boxes[:, :, q : q + qd], aux)
        extras["denoising"].update(groups=extra.groups, parts=extra.parts)
    if extra.num_one_to_many:
        extras["one_to_many"] = _layers(logits[:, :, q + qd :], boxes[:, :, q + qd :], aux)
        extras["one_to_many"]["repeat"] = extra.one_to_many_repeat
    return logits[:, :, :q], boxes[:, :, :q], extras


def _layers(logits: Tensor, boxes: Tensor, aux: bool) -> dict[str, Any]:
    """``(L,B,n,·)`` → the last layer's and an ``aux_outputs`` list of the others (the criterion's layout)."""
    out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1], strict=True)]
    return out
