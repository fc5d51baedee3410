"""What DETR and Conditional DETR share: one ResNet stage projected to the model width, its 2-D position
encoding, the class and box heads, and (``masks=True``) the mask head over layer1-3 of the same backbone.

Legend: B batch, H×W padded input, h×w the feature map, S = h·w tokens, D model width, K classes, Q queries.

Layer: models (a base class, not an architecture). Imports the building blocks, ``models.base``, ``models.layers``
and ``models.segmentation``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..backbone import RESNET_CONFIG_FIELDS, RESNET_SHAPE_FIELDS, ResNetBackbone, check_resnet_config
from ..config import ModelConfig
from ..position_encoding import build_position_encoding
from .base import Detector
from .layers import MLP, init_focal_bias
from .segmentation import (
    FPN_LEVELS,
    MASK_FIELDS,
    MASK_SHAPE_FIELDS,
    AttentionMaps,
    MaskHead,
    check_mask_config,
    freeze_all_but_mask_head,
    predict_masks,
)

# The ModelConfig fields of a single-scale architecture beyond the common ones, and those deciding its weights.
SINGLE_SCALE_FIELDS = (*RESNET_CONFIG_FIELDS, "feature_level", *MASK_FIELDS)
SINGLE_SCALE_SHAPE_FIELDS = (*RESNET_SHAPE_FIELDS, "feature_level", *MASK_SHAPE_FIELDS)


def check_single_scale_config(config: ModelConfig) -> None:
    """The checks of a single-scale architecture's ``ModelConfig``: a ResNet backbone, a mask head that fits."""
    check_resnet_config(config)
    check_mask_config(config)


@dataclass
class EncodedImage:
    """What the backbone and the input projection make of a batch.

    Attributes: the transformer's inputs ``src (B,S,D)``, ``pos (B,S,D)`` and ``flat_mask (B,S)`` True on padding
    (None when no cell is padded); the projected map ``projected (B,D,h,w)`` and its ``mask (B,h,w)`` (None without
    a ``padding_mask``); ``levels``: backbone level → ``(features (B,C_l,h_l,w_l), mask (B,h_l,w_l) or None)``.
    """

    src: Tensor
    pos: Tensor
    flat_mask: Tensor | None
    projected: Tensor
    mask: Tensor | None
    levels: dict[int, tuple[Tensor, Tensor | None]]


class SingleScaleDetector(Detector):
    """What DETR and Conditional DETR share: a ResNet whose last (or ``feature_level``) stage is projected to the
    model width, with a 2-D position encoding of the valid region. Subclasses add the transformer and heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        self.backbone = ResNetBackbone(
            c.backbone,
            dilation=c.dilation,
            trainable_stages=c.trainable_stages,
            # the mask head also upsamples with layer1-3
            return_levels=tuple(sorted({c.feature_level, *FPN_LEVELS})) if c.masks else (c.feature_level,),
            weights=c.backbone_weights,
            mask_padding=c.mask_backbone_padding,
            norm=c.backbone_norm,
        )
        self.position_encoding = build_position_encoding(
            c.position_embedding, c.hidden_dim, temperature=c.position_temperature
        )
        self.input_proj = nn.Conv2d(self.backbone.num_channels[-1], c.hidden_dim, kernel_size=1)

    def add_heads(self) -> None:
        """The class head (K+1 outputs, or K sigmoid outputs with the focal prior) and the 3-layer box MLP; called by
        subclasses after their transformer, so a seeded build initialises parameters in a fixed order."""
        c = self.config
        self.class_embed = nn.Linear(c.hidden_dim, c.num_classes if c.focal else c.num_classes + 1)
        if c.focal:
            init_focal_bias(self.class_embed)
        self.bbox_embed = MLP(c.hidden_dim, c.hidden_dim, 4, 3)

    def add_mask_head(self) -> None:
        """With ``config.masks``: the attention maps and the mask head (``segmentation.py``), added last so that a
        seeded build initialises the detector as without them; then ``freeze_detector`` applies."""
        c = self.config
        if c.masks:
            channels = dict(zip(self.backbone.return_levels, self.backbone.num_channels, strict=True))
            self.bbox_attention = AttentionMaps(c.hidden_dim, c.num_heads)
            self.mask_head = MaskHead(c.hidden_dim, c.num_heads, tuple(channels[lvl] for lvl in FPN_LEVELS))
        if c.freeze_detector:
            freeze_all_but_mask_head(self)

    def encode_image(self, pixel_values: Tensor, padding_mask: Tensor | None) -> EncodedImage:
        """``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` → the transformer's inputs and what the mask head
        reads (see ``EncodedImage``)."""
        self._check_inputs(pixel_values, padding_mask)
        features = self.backbone(pixel_values, padding_mask)  # per level: (B, C, h, w), (B, h, w)
        feat, mask = features[-1]
        b, _, h, w = feat.shape
        pos = self.position_encoding((b, h, w), mask, device=feat.device).to(feat.dtype)  # (B, D, h, w)
        projected = self.input_proj(feat)  # (B, D, h, w)
        src = projected.flatten(2).transpose(1, 2)  # (B, S, D)
        pos = pos.flatten(2).transpose(1, 2)  # (B, S, D)
        flat_mask = mask.flatten(1) if mask is not None and bool(mask.any()) else None  # (B, S)
        levels = dict(zip(self.backbone.return_levels, features, strict=True))
        return EncodedImage(src, pos, flat_mask, projected, mask, levels)

    def masks_output(self, queries: Tensor, memory: Tensor, encoded: EncodedImage) -> Tensor:
        """``pred_masks (B,Q,h_1,w_1)``: mask logits at stride 4 from ``queries (B,Q,D)``, the final decoder
        embeddings, and the encoder ``memory (B,S,D)``."""
        fpn = [encoded.levels[lvl] for lvl in FPN_LEVELS]
        exact = self.config.mask_backbone_padding
        return predict_masks(
            self.bbox_attention,
            self.mask_head,
            queries,
            memory,
            encoded.projected,
            encoded.mask,
            fpn,
            exact=exact,
            attention_scale=self.config.mask_attention_scale,
        )
