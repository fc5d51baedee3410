"""What DETR and Conditional DETR share: one ResNet stage projected to the model width, its 2-D position
encoding, and the class and box heads.

Legend: B batch, H×W padded input, h×w the feature map, S = h·w tokens, D model width, K classes.

Layer: models (a base class, not an architecture). Imports the building blocks and ``models.base``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import RESNET_CONFIG_FIELDS, RESNET_SHAPE_FIELDS, ResNetBackbone
from ..config import ModelConfig
from ..position_encoding import build_position_encoding
from .base import Detector
from .layers import MLP, init_focal_bias

# The ModelConfig fields of a single-scale architecture beyond the common ones, and those deciding its weights.
SINGLE_SCALE_FIELDS = (*RESNET_CONFIG_FIELDS, "feature_level")
SINGLE_SCALE_SHAPE_FIELDS = (*RESNET_SHAPE_FIELDS, "feature_level")


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
            return_levels=(c.feature_level,),
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

    def encode_image(self, pixel_values: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` → the transformer's inputs: ``src (B,S,D)``,
        ``pos (B,S,D)`` and ``flat_mask (B,S)`` True on padding (None when nothing is padded)."""
        self._check_inputs(pixel_values, padding_mask)
        ((feat, mask),) = self.backbone(pixel_values, padding_mask)  # (B, C, h, w), (B, h, w)
        b, _, h, w = feat.shape
        pos = self.position_encoding((b, h, w), mask, device=feat.device).to(feat.dtype)  # (B, D, h, w)
        src = self.input_proj(feat).flatten(2).transpose(1, 2)  # (B, S, D)
        pos = pos.flatten(2).transpose(1, 2)  # (B, S, D)
        flat_mask = mask.flatten(1) if mask is not None and bool(mask.any()) else None  # (B, S)
        return src, pos, flat_mask
