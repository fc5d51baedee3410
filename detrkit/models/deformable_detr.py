"""Deformable DETR: Deformable Transformers for End-to-End Object Detection (Zhu et al., ICLR 2021).

What differs from DETR: the transformer reads several feature levels (strides 8-64) at once, and every attention
over image features is multi-scale deformable attention (section 4.1): a query samples a few points per head and
level around a reference point instead of attending to every cell, which makes the encoder linear in the number of
cells and lets training converge in 50 epochs instead of 500. Queries are split into a position and a content part;
the position predicts the query's reference point, and boxes are predicted relative to it. Two options (section
4.2): iterative bounding-box refinement (each decoder layer refines the previous layer's box, which becomes the next
layer's reference) and two-stage (encoder cells propose boxes; the best proposals become the decoder's reference
boxes and query positions). Classification is sigmoid/focal (``class_loss="focal"``).

Legend: B batch, H×W padded input, L feature levels, h_l×w_l the map of level l, S = Σ h_l·w_l encoder tokens,
Q queries, K classes, D model width, N decoder layers, P sampling points per head and level.

Layer: models (one architecture). May import config, the building blocks and ``models`` base modules (``base``,
``layers``, ``deformable_attention``, ``segmentation``, ``registry``), never a sibling architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import RESNET_CONFIG_FIELDS, RESNET_SHAPE_FIELDS, ResNetBackbone, check_resnet_config, exporting
from ..config import ModelConfig
from ..position_encoding import build_position_encoding
from .base import Detector
from .deformable_attention import MultiScaleDeformableAttention
from .denoising import (
    QUERY_TRAINING_FIELDS,
    DenoisingQueries,
    ExtraQueries,
    check_query_training_config,
    extra_queries,
    query_attention_mask,
    split_outputs,
)
from .layers import FFN, MLP, Attention, init_focal_bias, inverse_sigmoid
from .registry import Architecture
from .segmentation import (
    FPN_LEVELS,
    MASK_FIELDS,
    MASK_SHAPE_FIELDS,
    MULTI_SCALE_MASK_FIELDS,
    AttentionMaps,
    MaskHead,
    check_mask_config,
    check_mask_feature_level,
    freeze_all_but_mask_head,
    masked_group_norm,
    predict_masks,
)

# The backbone stages that feed the transformer (strides 8, 16, 32); further levels are strided convolutions.
BACKBONE_LEVELS = (2, 3, 4)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: multi-scale deformable self-attention (each cell samples around itself), FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_levels: int,
        n_points: int,
        ffn_dim: int,
        dropout: float,
        activation_dropout: float,
    ) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, n_levels, num_heads, n_points)
        self.ffn = FFN(dim, ffn_dim, activation_dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor, padding_mask: Tensor | None
    ) -> Tensor:
        """``src (B,S,D)``, ``pos (B,S,D)``, ``reference_points (B,S,L,2)``, ``spatial_shapes (L,2)``,
        ``padding_mask (B,S)`` → ``(B,S,D)``."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention among queries, deformable cross-attention to the encoder memory
    around each query's reference point, FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_levels: int,
        n_points: int,
        ffn_dim: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout=attention_dropout)
        self.cross_attn = MultiScaleDeformableAttention(dim, n_levels, num_heads, n_points)
        self.ffn = FFN(dim, ffn_dim, activation_dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """``tgt (B,Q,D)``, ``query_pos (B,Q,D)``, ``reference_points (B,Q,L,2|4)``, ``memory (B,S,D)``,
        ``spatial_shapes (L,2)``, ``padding_mask (B,S)``, ``self_attn_mask (B,1,Q,Q)`` (True: may attend; the
        training-only queries', ``denoising.py``) → ``(B,Q,D)``."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, attn_mask=self_attn_mask)))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class DeformableEncoder(nn.Module):
    """A stack of ``DeformableEncoderLayer``; every cell's reference point is its own centre."""

    def __init__(self, layers: list[DeformableEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Cell centres of every level, normalised by the level's valid extent, then expressed in every level's
        padded coordinates. ``valid_ratios (B,L,2)`` → ``(B,S,L,2)`` (x, y)."""
        points = []
        for level, (h, w) in enumerate(shapes):
            ys = torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            xs = torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)  # (B, h·w)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))  # (B, h·w, 2)
        ref = torch.cat(points, 1)  # (B, S, 2)
        return ref[:, :, None] * valid_ratios[:, None]  # (B, S, L, 2)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        spatial_shapes: Tensor,
        shapes: list[tuple[int, int]],
        valid_ratios: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """``src (B,S,D)``, ``pos (B,S,D)`` (with the level embedding), ``spatial_shapes (L,2)`` (and as a list),
        ``valid_ratios (B,L,2)``, ``padding_mask (B,S)`` → memory ``(B,S,D)``."""
        reference_points = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DeformableDecoder(nn.Module):
    """A stack of ``DeformableDecoderLayer`` with the box head(s), which predict each layer's boxes relative to
    its reference.

    Args:
        layers: the decoder layers.
        bbox_embed: one box head (an ``MLP`` shared by all layers, every layer keeping the initial reference), or
            an ``nn.ModuleList`` with one head per layer: iterative box refinement (section 4.2), where each
            layer's box, detached, becomes the next layer's reference.
        look_forward_twice: with refinement, each layer's output box is its delta applied to the previous layer's
            box *with* its gradient (DINO Sec. 3.5): the values are unchanged, but a layer's box loss also trains
            the layer before it, whose box it refines.
    """

    def __init__(
        self, layers: list[DeformableDecoderLayer], bbox_embed: nn.Module, *, look_forward_twice: bool = False
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.refine = isinstance(bbox_embed, nn.ModuleList)
        self.look_forward_twice = look_forward_twice
        if look_forward_twice and not self.refine:
            raise ValueError("look_forward_twice needs box refinement (one box head per layer)")
        if self.refine and len(bbox_embed) != len(self.layers):
            raise ValueError(f"box refinement needs one box head per layer: {len(bbox_embed)} for {len(layers)}")
        self.bbox_embed = bbox_embed

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        valid_ratios: Tensor,
        padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Args: ``tgt (B,Q,D)`` content queries, ``query_pos (B,Q,D)``, ``reference (B,Q,2)`` points or
        ``(B,Q,4)`` boxes, normalised to the valid image; ``memory (B,S,D)``, ``spatial_shapes (L,2)``,
        ``valid_ratios (B,L,2)``, ``padding_mask (B,S)``, ``self_attn_mask (B,1,Q,Q)`` or None.

        Returns: ``hs (N,B,Q,D)`` every layer's output and ``boxes (N,B,Q,4)`` its normalised cxcywh boxes.
        """
        hs, boxes = [], []
        previous: Tensor | None = None  # the previous layer's box with its gradient (look forward twice)
        for i, layer in enumerate(self.layers):
            # References are relative to the valid image; the attention samples in padded-map coordinates.
            ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            reference_input = reference[:, :, None] * ratios[:, None]  # (B, Q, L, 2|4)
            tgt = layer(tgt, query_pos, reference_input, memory, spatial_shapes, padding_mask, self_attn_mask)
            head = self.bbox_embed[i] if self.refine else self.bbox_embed
            delta = head(tgt)  # (B, Q, 4) in inverse-sigmoid space
            if reference.shape[-1] == 4:
                box = (delta + inverse_sigmoid(reference)).sigmoid()
            else:  # a point reference moves the centre; the size is predicted outright
                box = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            hs.append(tgt)
            if self.look_forward_twice and previous is not None:
                # the same value (the reference is previous, detached), with previous's gradient path
                boxes.append((delta + inverse_sigmoid(previous)).sigmoid())
            else:
                boxes.append(box)
            if self.refine:
                previous = box
                reference = box.detach()  # gradients do not flow through the references (section A.4)
        return torch.stack(hs), torch.stack(boxes)  # (N, B, Q, D), (N, B, Q, 4)


class DeformableDETR(Detector):
    """Deformable DETR with a ResNet backbone (optionally with box refinement and two-stage).

    Forward: ``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` True on padding (or None) → dict with
    ``pred_logits (B,Q,K)`` (``(B,Q,K+1)`` with ``class_loss="softmax"``), ``pred_boxes (B,Q,4)`` normalised cx,
    cy, w, h of the unpadded image, ``aux_outputs`` (one dict with the same keys per earlier decoder layer, when
    ``config.aux_loss``), with ``two_stage``, ``enc_outputs``: the encoder's proposals for every token,
    ``pred_logits (B,S,K)`` and ``pred_boxes (B,S,4)``, trained class-agnostically by the criterion, and with
    ``config.masks``, ``pred_masks (B,Q,ceil(H/4),ceil(W/4))``: DETR's mask head (``segmentation.py``), each query's
    final embedding attending to the encoder memory of the coarsest backbone level (stride 32; 16 with DC5), the
    FPN over the backbone's layer3-layer1. No published model has it: there is no reference to match.

    ``mask_backbone_padding`` (detrkit's default) makes every step padding-exact: the backbone, the GroupNorm of
    the input projections (statistics over image cells only) and the two-stage proposal ranking (padded cells are
    never proposed). Off, the computation is the reference implementations'.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        d = c.hidden_dim
        if c.two_stage and not c.box_refine:
            raise ValueError(
                "two_stage needs box_refine: the proposals are refined layer by layer (paper section 4.2; "
                "transformers and the published models only have two-stage with box refinement)"
            )
        if d % 32:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm(32) in the input projections), got {d}")
        n_levels = c.num_feature_levels
        levels = BACKBONE_LEVELS[-min(n_levels, len(BACKBONE_LEVELS)) :]
        self.num_backbone_levels = len(levels)  # the backbone's last levels feed the transformer
        self.backbone = ResNetBackbone(
            c.backbone,
            dilation=c.dilation,
            trainable_stages=c.trainable_stages,
            # the mask head also upsamples with layer1-3
            return_levels=tuple(sorted({*levels, *FPN_LEVELS})) if c.masks else levels,
            weights=c.backbone_weights,
            mask_padding=c.mask_backbone_padding,
            norm=c.backbone_norm,
        )
        # Positions of cell centres (the -0.5), as the official implementation.
        self.position_encoding = build_position_encoding(
            c.position_embedding, d, temperature=c.position_temperature, offset=-0.5
        )
        channels = self.backbone.num_channels[-len(levels) :]
        proj = [nn.Sequential(nn.Conv2d(ch, d, kernel_size=1), nn.GroupNorm(32, d)) for ch in channels]
        in_ch = channels[-1]
        for _ in range(n_levels - len(levels)):  # coarser levels: 3×3 stride-2 convolutions (section 4.1)
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        # Which level of the same-sized maps a token comes from (section 4.1, "scale-level embedding").
        self.level_embed = nn.Parameter(torch.empty(n_levels, d))

        enc_args = (d, c.num_heads, n_levels, c.enc_points, c.ffn_dim, c.dropout, c.activation_dropout)
        self.encoder = DeformableEncoder([DeformableEncoderLayer(*enc_args) for _ in range(c.enc_layers)])
        dec_args = (d, c.num_heads, n_levels, c.dec_points, c.ffn_dim, c.dropout)
        dec_layers = [
            DeformableDecoderLayer(*dec_args, c.attention_dropout, c.activation_dropout) for _ in range(c.dec_layers)
        ]
        num_logits = c.num_classes if c.focal else c.num_classes + 1
        self.class_embed: nn.Module
        if c.box_refine:
            self.class_embed = nn.ModuleList(nn.Linear(d, num_logits) for _ in range(c.dec_layers))
            bbox_embed: nn.Module = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(c.dec_layers))
        else:
            self.class_embed = nn.Linear(d, num_logits)
            bbox_embed = MLP(d, d, 4, 3)
        self.decoder = DeformableDecoder(dec_layers, bbox_embed, look_forward_twice=c.look_forward_twice)

        if c.two_stage:
            # Section 4.2: every encoder token scores and regresses a proposal centred on its cell, with heads of
            # its own (the official code's extra, last, class and box heads).
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.enc_class_embed = nn.Linear(d, num_logits)
            self.enc_bbox_embed = MLP(d, d, 4, 3)
            # The top proposals' sine embeddings → query positions and contents.
            self.pos_trans = nn.Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
        else:
            # Learned queries: the first half is the position, the second the content; the position predicts
            # the reference point.
            self.query_embed = nn.Embedding(c.num_queries, 2 * d)
            self.reference_points = nn.Linear(d, 2)
        self._reset_parameters()
        if c.masks:  # built last, so that a seeded build initialises the detector as without them
            all_channels = dict(zip(self.backbone.return_levels, self.backbone.num_channels, strict=True))
            self.bbox_attention = AttentionMaps(d, c.num_heads)
            self.mask_head = MaskHead(d, c.num_heads, tuple(all_channels[lvl] for lvl in FPN_LEVELS))
        if c.freeze_detector:
            freeze_all_but_mask_head(self)
        # Added last, so that a seeded build initialises everything above as without them.
        if c.mixed_query_selection:
            # DINO Sec. 3.4: the selected proposals give positions and reference boxes; contents are learned.
            self.query_content = nn.Embedding(c.num_queries, d)
        self.denoising: DenoisingQueries | None = None
        if c.dn_groups:
            # denoising queries' positions come from their boxes through the proposal embedding (pos_trans)
            self.denoising = DenoisingQueries(
                c.num_classes,
                d,
                groups=c.dn_groups,
                label_noise=c.dn_label_noise,
                box_noise=c.dn_box_noise,
                contrastive=c.dn_contrastive,
            )
        if c.one_to_many_queries:
            # two-stage: more proposals are selected (H-DETR); learned queries otherwise
            width = d if c.two_stage else 2 * d
            if not c.two_stage or c.mixed_query_selection:
                self.one_to_many_embed = nn.Embedding(c.one_to_many_queries, width)

    def _reset_parameters(self) -> None:
        """The official initialisation."""
        c = self.config
        for m in self.input_proj:
            nn.init.xavier_uniform_(m[0].weight)
            nn.init.zeros_(m[0].bias)
        transformer = [self.encoder, self.decoder.layers]
        transformer += [self.enc_output, self.pos_trans] if c.two_stage else [self.reference_points]
        for module in transformer:
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
            elif isinstance(m, Attention):
                for proj in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                    nn.init.zeros_(proj.bias)
        if not c.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        if c.focal:
            for head in self._class_heads():
                init_focal_bias(head)
        # Box heads start at "no change" (last layer zero); the first predicts a size of sigmoid(-2) ≈ 0.12 around
        # its reference point. With box references (refinement after the first layer, two-stage proposals) the
        # size is the reference's.
        heads = self._box_heads()
        for i, head in enumerate(heads):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
            if i == 0 and not c.two_stage:
                nn.init.constant_(head.layers[-1].bias[2:], -2.0)

    def _class_heads(self) -> list[nn.Linear]:
        heads = list(self.class_embed) if isinstance(self.class_embed, nn.ModuleList) else [self.class_embed]
        return heads + ([self.enc_class_embed] if self.config.two_stage else [])

    def _box_heads(self) -> list[MLP]:
        b = self.decoder.bbox_embed
        heads = list(b) if isinstance(b, nn.ModuleList) else [b]
        return heads + ([self.enc_bbox_embed] if self.config.two_stage else [])

    def lr_scale(self, name: str) -> float:
        """The sampling offsets and the reference-point predictor train at 0.1× the learning rate (official
        recipe): large steps there move the sampling locations far off at the start."""
        if ".sampling_offsets." in name or name.startswith("reference_points."):
            return 0.1
        return 1.0

    # -- forward ----------------------------------------------------------------------------------------------
    def _level_mask(self, padding_mask: Tensor, size: tuple[int, int], stride: int) -> Tensor:
        """The pixel mask ``(B,H,W)`` at a level of ``size`` and ``stride`` → ``(B,h,w)``: the strided rule of the
        padding-exact backbone, or the reference implementations' nearest-neighbour resize."""
        if self.config.mask_backbone_padding:
            strided = padding_mask[:, ::stride, ::stride]
            if strided.shape[-2:] == size:
                return strided
        return F.interpolate(padding_mask[None].float(), size=size)[0].bool()

    def multi_scale_features(
        self, pixel_values: Tensor, padding_mask: Tensor | None
    ) -> tuple[list[Tensor], list[Tensor | None], dict[int, tuple[Tensor, Tensor | None]]]:
        """Backbone levels projected to D with GroupNorm, plus the strided-convolution levels.

        Returns L maps ``(B,D,h_l,w_l)`` and L masks ``(B,h_l,w_l)`` True on padding (all None without padding), and
        every level the backbone computed: level → ``(features (B,C,h,w), mask (B,h,w) or None)``.
        """
        if padding_mask is not None and not exporting() and not bool(padding_mask.any()):
            padding_mask = None
        exact = self.config.mask_backbone_padding and padding_mask is not None
        computed = self.backbone(pixel_values, padding_mask)  # [(B, C_l, h_l, w_l), (B, h_l, w_l)]
        backbone_levels = dict(zip(self.backbone.return_levels, computed, strict=True))
        features = computed[-self.num_backbone_levels :]  # the levels that feed the transformer
        strides = self.backbone.level_strides[-self.num_backbone_levels :]
        srcs: list[Tensor] = []
        masks: list[Tensor | None] = []
        stride = 1
        for level, (conv, norm) in enumerate(self.input_proj):
            if level < len(features):
                feat, mask = features[level]
                stride = strides[level]
                x = conv(feat)  # (B, D, h_l, w_l)
            else:  # from the last backbone stage, then from the previous level: (B, D, ceil(h/2), ceil(w/2))
                x = conv(features[-1][0] if level == len(features) else srcs[-1])
                stride *= 2
                mask = None if padding_mask is None else self._level_mask(padding_mask, x.shape[-2:], stride)
            valid = (~mask)[:, None] if exact and mask is not None else None  # (B, 1, h_l, w_l)
            srcs.append(masked_group_norm(x, norm, valid))
            masks.append(mask)
        return srcs, masks, backbone_levels

    def forward(
        self, pixel_values: Tensor, padding_mask: Tensor | None = None, targets: list[dict] | None = None
    ) -> dict:
        self._check_inputs(pixel_values, padding_mask)
        c = self.config
        srcs, masks, backbone_levels = self.multi_scale_features(pixel_values, padding_mask)
        b, d = srcs[0].shape[:2]
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]  # ints; symbolic under export (int() would fix them)
        flat, pos_flat = [], []
        for level, (src, mask) in enumerate(zip(srcs, masks, strict=True)):
            h, w = shapes[level]
            pos = self.position_encoding((b, h, w), mask, device=src.device).to(src.dtype)  # (B, D, h, w)
            flat.append(src.flatten(2).transpose(1, 2))  # (B, h·w, D)
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src = torch.cat(flat, 1)  # (B, S, D)
        pos = torch.cat(pos_flat, 1)  # (B, S, D)
        # (L, 2); under export the sizes stay symbolic as a list: a tensor made from them would be a constant
        spatial_shapes = shapes if exporting() else torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        if masks[0] is None:
            flat_mask = None
            valid_ratios = src.new_ones(b, len(shapes), 2)
        else:
            flat_mask = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
            valid_ratios = torch.stack([self._valid_ratio(m, src.dtype) for m in masks], 1)  # (B, L, 2)

        memory = self.encoder(src, pos, spatial_shapes, shapes, valid_ratios, flat_mask)  # (B, S, D)

        # training-only queries (denoising.py): never at inference, so evaluation and export see Q queries
        extra = extra_queries(self.denoising, c, targets, b, memory.device) if self.training else None
        num_one_to_many = extra.num_one_to_many if extra is not None else 0
        enc_outputs = None
        if c.two_stage:
            query_pos, tgt, reference, enc_outputs = self._two_stage_queries(memory, flat_mask, shapes, num_one_to_many)
        else:
            embed = self.query_embed.weight  # (Q, 2D)
            if num_one_to_many:
                embed = torch.cat([embed, self.one_to_many_embed.weight])  # (Q + Qo, 2D)
            query_pos, tgt = embed.split(d, dim=1)  # (Q, D) each
            query_pos = query_pos[None].expand(b, -1, -1)  # (B, Q, D)
            tgt = tgt[None].expand(b, -1, -1)  # (B, Q, D)
            reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        self_attn_mask = None
        if extra is not None:
            query_pos, tgt, reference = self._with_denoising(query_pos, tgt, reference, extra)
            self_attn_mask = query_attention_mask(c.num_queries, extra)  # (B, 1, Qt, Qt)
        hs, boxes = self.decoder(
            tgt, query_pos, reference, memory, spatial_shapes, valid_ratios, flat_mask, self_attn_mask
        )  # (N, B, Qt, D), (N, B, Qt, 4)
        if isinstance(self.class_embed, nn.ModuleList):
            logits = torch.stack([head(h) for head, h in zip(self.class_embed, hs, strict=True)])  # (N, B, Q, K)
        else:
            logits = self.class_embed(hs)  # (N, B, Q, K)
        logits, boxes, extras = split_outputs(logits, boxes, c.num_queries, extra, aux=c.aux_loss)
        out = self._pack_outputs(logits, boxes)
        out.update(extras)
        if enc_outputs is not None:
            out["enc_outputs"] = enc_outputs
        if c.masks:
            queries = hs[-1, :, : c.num_queries]  # (B, Q, D)
            out["pred_masks"] = self._masks_output(queries, memory, srcs, masks, shapes, backbone_levels)
        return out

    def _with_denoising(
        self, query_pos: Tensor, tgt: Tensor, reference: Tensor, extra: ExtraQueries
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Insert the denoising queries between the matching and the one-to-many ones: positions from their noised
        boxes through the proposals' embedding, contents from their noised labels, the boxes as references.
        ``query_pos``, ``tgt`` ``(B,Q+Qo,D)``, ``reference (B,Q+Qo,4)`` → ``(B,Qt,·)``."""
        if not extra.num_denoising:
            return query_pos, tgt, reference
        assert self.denoising is not None
        q, d = self.config.num_queries, query_pos.shape[-1]
        boxes = extra.boxes.to(reference.dtype)  # (B, Qd, 4)
        dn_pos = self.pos_trans_norm(self.pos_trans(_proposal_sine_embed(inverse_sigmoid(boxes), d // 2)))
        dn_pos = dn_pos[..., :d]  # (B, Qd, D): the position half, as for proposals
        dn_tgt = self.denoising.content(extra.labels)  # (B, Qd, D)

        def insert(x: Tensor, y: Tensor) -> Tensor:
            return torch.cat([x[:, :q], y, x[:, q:]], 1)

        return insert(query_pos, dn_pos), insert(tgt, dn_tgt), insert(reference, boxes)

    def _masks_output(
        self,
        queries: Tensor,
        memory: Tensor,
        srcs: list[Tensor],
        masks: list[Tensor | None],
        shapes: list[tuple[int, int]],
        backbone_levels: dict[int, tuple[Tensor, Tensor | None]],
    ) -> Tensor:
        """``pred_masks (B,Q,h_1,w_1)`` from ``queries (B,Q,D)`` attending to the encoder ``memory (B,S,D)`` of the
        backbone level ``mask_feature_level`` (the coarsest by default), whose projected map ``srcs[l]`` the head reads,
        as DETR's reads its one level."""
        level = BACKBONE_LEVELS[-self.num_backbone_levels :].index(self.config.mask_feature_level)
        start = sum(h * w for h, w in shapes[:level])
        h, w = shapes[level]
        level_memory = memory[:, start : start + h * w]  # (B, h·w, D)
        fpn = [backbone_levels[lvl] for lvl in FPN_LEVELS]
        exact = self.config.mask_backbone_padding
        return predict_masks(
            self.bbox_attention,
            self.mask_head,
            queries,
            level_memory,
            srcs[level],
            masks[level],
            fpn,
            exact=exact,
            attention_scale=self.config.mask_attention_scale,
        )

    @staticmethod
    def _valid_ratio(mask: Tensor, dtype: torch.dtype) -> Tensor:
        """``mask (B,h,w)`` True on padding → ``(B,2)`` (w, h) fraction of the map the image covers."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).to(dtype) / h
        valid_w = (~mask[:, 0, :]).sum(1).to(dtype) / w
        return torch.stack([valid_w, valid_h], -1)

    def _two_stage_queries(
        self, memory: Tensor, flat_mask: Tensor | None, shapes: list[tuple[int, int]], num_one_to_many: int = 0
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Section 4.2: score every encoder token as a proposal, keep the top Q (by the first class's logit, as
        the official code), and derive the decoder's queries from their boxes; with ``mixed_query_selection``
        (DINO Sec. 3.4) only the positions and reference boxes, the contents being learned embeddings. The
        one-to-many branch's ``num_one_to_many`` queries are the next proposals in rank (H-DETR).

        Returns ``query_pos (B,Q,D)``, ``tgt (B,Q,D)``, ``reference (B,Q,4)`` (detached boxes) and the
        ``enc_outputs`` dict (``pred_logits (B,S,K)``, ``pred_boxes (B,S,4)``); Q counts the one-to-many queries.
        """
        b, s, d = memory.shape
        q = self.config.num_queries + num_one_to_many
        if s < q:
            raise ValueError(
                f"two-stage Deformable DETR keeps the top num_queries={q} of the encoder's {s} tokens: "
                "use larger images or fewer queries"
            )
        object_query, proposals = self._encoder_proposals(memory, flat_mask, shapes)
        enc_logits = self.enc_class_embed(object_query)  # (B, S, K)
        enc_coords = self.enc_bbox_embed(object_query) + proposals  # (B, S, 4) inverse-sigmoid space
        scores = enc_logits[..., 0]  # (B, S)
        if flat_mask is not None and self.config.mask_backbone_padding:
            scores = scores.masked_fill(flat_mask, float("-inf"))  # padded cells do not exist for the image alone
        top = scores.topk(q, dim=1).indices  # (B, Q)
        coords = enc_coords.gather(1, top[..., None].expand(-1, -1, 4)).detach()  # (B, Q, 4)
        pos = self.pos_trans_norm(self.pos_trans(_proposal_sine_embed(coords, d // 2)))  # (B, Q, 2D)
        query_pos, tgt = pos.split(d, dim=-1)  # (B, Q, D) each
        if self.config.mixed_query_selection:
            content = self.query_content.weight  # (Q, D)
            if num_one_to_many:
                content = torch.cat([content, self.one_to_many_embed.weight])  # (Q + Qo, D)
            tgt = content[None].expand(b, -1, -1)
        enc_outputs = {"pred_logits": enc_logits, "pred_boxes": enc_coords.sigmoid()}
        return query_pos, tgt, coords.sigmoid(), enc_outputs

    def _encoder_proposals(
        self, memory: Tensor, flat_mask: Tensor | None, shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """One proposal per token: a box centred on its cell, of side 0.05·2^level of the valid image.

        Returns the projected tokens ``(B,S,D)`` (zero where padded or the proposal is out of range) and the
        proposals ``(B,S,4)`` in inverse-sigmoid space (+inf where padded or out of range).
        """
        b = memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(shapes):
            if flat_mask is None:
                valid_h = memory.new_full((b,), h)
                valid_w = memory.new_full((b,), w)
            else:
                m = flat_mask[:, start : start + h * w].view(b, h, w)
                valid_h = (~m[:, :, 0]).sum(1).to(memory.dtype)
                valid_w = (~m[:, 0, :]).sum(1).to(memory.dtype)
            ys = torch.arange(h, dtype=memory.dtype, device=memory.device)
            xs = torch.arange(w, dtype=memory.dtype, device=memory.device)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack([grid_x, grid_y], -1)  # (h, w, 2)
            scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2)
            centre = (grid[None] + 0.5) / scale  # (B, h, w, 2)
            size = torch.full_like(centre, 0.05 * 2.0**level)
            proposals.append(torch.cat([centre, size], -1).view(b, -1, 4))
            start += h * w
        boxes = torch.cat(proposals, 1)  # (B, S, 4)
        in_range = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)  # (B, S, 1)
        logits = torch.log(boxes / (1 - boxes))
        query = memory
        if flat_mask is not None:
            logits = logits.masked_fill(flat_mask[..., None], float("inf"))
            query = query.masked_fill(flat_mask[..., None], 0.0)
        logits = logits.masked_fill(~in_range, float("inf"))
        query = query.masked_fill(~in_range, 0.0)
        return self.enc_output_norm(self.enc_output(query)), logits


def _proposal_sine_embed(coords: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of proposal boxes: ``coords (B,Q,4)`` in inverse-sigmoid space → ``(B,Q,4·num_feats)``,
    (cx, cy, w, h) each with ``num_feats`` channels (official ``get_proposal_pos_embed``)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords.sigmoid().float()[..., None] * (2 * math.pi) / dim_t  # (B, Q, 4, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(2)  # (B, Q, 4·F)
    return pos.to(coords.dtype)


DEFORMABLE_FIELDS = (
    "num_feature_levels",
    "enc_points",
    "dec_points",
    "box_refine",
    "two_stage",
    "mixed_query_selection",
)


def _check_config(config: ModelConfig) -> None:
    check_resnet_config(config)
    check_mask_config(config)
    check_mask_feature_level(config, BACKBONE_LEVELS[-min(config.num_feature_levels, len(BACKBONE_LEVELS)) :])
    check_query_training_config(config)
    if config.mixed_query_selection and not config.two_stage:
        raise ValueError("mixed_query_selection selects encoder proposals: it needs two_stage=true (and box_refine)")
    if config.look_forward_twice and not config.box_refine:
        raise ValueError("look_forward_twice changes how refined boxes are trained: it needs box_refine=true")
    if config.dn_groups and not config.two_stage:
        raise ValueError(
            "denoising queries on Deformable DETR need box references for every query: set two_stage=true "
            "(with box_refine, and mixed_query_selection as DINO), or dn_groups=0"
        )


ARCHITECTURE = Architecture(
    name="deformable_detr",
    model=DeformableDETR,
    fields=(
        *RESNET_CONFIG_FIELDS,
        *DEFORMABLE_FIELDS,
        "look_forward_twice",
        *QUERY_TRAINING_FIELDS,
        *MASK_FIELDS,
        *MULTI_SCALE_MASK_FIELDS,
    ),
    shape_fields=(*RESNET_SHAPE_FIELDS, *DEFORMABLE_FIELDS, *MASK_SHAPE_FIELDS),
    check=_check_config,
)
