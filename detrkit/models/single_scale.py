"""What DETR and Conditional DETR share: one ResNet stage projected to the model width, its 2-D position
encoding, the class and box heads, (``masks=True``) the mask head over layer1-3 of the same backbone, query
selection (``two_stage``) and iterative box refinement (``box_refine``, ``BoxRefinement``).

Legend: B batch, H×W padded input, h×w the feature map, S = h·w tokens, D model width, K classes, Q queries.

Layer: models (a base class, not an architecture). Imports the building blocks, ``models.base``, ``models.layers``,
``models.denoising`` and ``models.segmentation``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backbone import RESNET_CONFIG_FIELDS, RESNET_SHAPE_FIELDS, ResNetBackbone, check_resnet_config, exporting
from ..config import ModelConfig
from ..position_encoding import build_position_encoding
from .base import Detector
from .denoising import (
    BoxPosition,
    DenoisingQueries,
    ExtraQueries,
    check_query_training_config,
    query_attention_mask,
    split_outputs,
)
from .layers import MLP, init_focal_bias, inverse_sigmoid
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
# Iterative box refinement (``BoxRefinement``): ``box_refine`` decides the weights (a box head per layer, learned
# anchors), ``look_forward_twice`` only how they train.
REFINE_FIELDS = ("box_refine", "look_forward_twice")
REFINE_SHAPE_FIELDS = ("box_refine",)
# Learned anchors start at this side (a fraction of the image) in both directions: the size of a small object
# rather than Conditional DETR's first boxes' half image, so that neighbouring anchors cover different objects.
ANCHOR_SIZE = 0.25


def check_single_scale_config(config: ModelConfig) -> None:
    """The checks of a single-scale architecture's ``ModelConfig``: a ResNet backbone, a mask head that fits,
    training-only queries that fit, look forward twice only over refined boxes, refined boxes with every layer's
    loss."""
    check_resnet_config(config)
    check_mask_config(config)
    check_query_training_config(config)
    if config.look_forward_twice and not config.box_refine:
        raise ValueError(
            "look_forward_twice changes how refined boxes are trained: it needs model.box_refine=true "
            "(each decoder layer refines the previous layer's box)"
        )
    if config.box_refine and not config.aux_loss:
        raise ValueError(
            "box_refine trains each decoder layer's box head by that layer's loss (the next layer's anchor is "
            "detached): it needs model.aux_loss=true"
        )


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


@dataclass
class SelectedQueries:
    """The decoder's inputs with anchor boxes (query selection, or box refinement's learned anchors):
    ``anchors (B,Qt,4)`` normalised cxcywh (detached, except learned anchors), ``position`` and ``content
    (B,Qt,D)``, the training-only queries' ``self_attn_mask (B,1,Qt,Qt)`` (None without them), and with query
    selection the proposals for the criterion, ``enc_outputs`` (``pred_logits (B,S,C)``, ``pred_boxes (B,S,4)``)."""

    anchors: Tensor
    position: Tensor
    content: Tensor
    self_attn_mask: Tensor | None
    enc_outputs: dict[str, Tensor] | None


class BoxRefinement:
    """Iterative box refinement through the decoder, for one forward pass (DAB-DETR, Liu et al. 2022, Sec. 4;
    Deformable DETR Sec. 4.2): layer l's query position is the embedding of its anchor box, its box is the offset
    its head predicts from that anchor in logit space, and that box, detached, is layer l+1's anchor (so each layer
    looks where the previous one placed the object). With ``look_forward_twice`` (DINO Sec. 3.5) layer l's output
    box is its offset applied to layer l-1's box *with* its gradient: the same values, but layer l's box loss also
    trains layer l-1.

    A decoder calls ``position(l)`` before layer l (the query positions ``(B,Qt,D)``; ``anchor`` is layer l's anchor
    ``(B,Qt,4)``) and ``update(l, hidden)`` after it with the layer's normalised output ``(B,Qt,D)``; ``boxes()``
    then holds every layer's ``(L,B,Qt,4)`` normalised cxcywh boxes.

    Args:
        anchors: ``(B,Qt,4)`` the first layer's anchors, normalised cxcywh.
        position: ``(B,Qt,D)`` their embedding (the first layer's query positions).
        heads: one box head per decoder layer, ``(B,Qt,D)`` → ``(B,Qt,4)`` offsets in logit space.
        embed: the box → query-position map (``BoxPosition``).
        look_forward_twice: as above.
    """

    def __init__(
        self, anchors: Tensor, position: Tensor, heads: nn.ModuleList, embed: nn.Module, *, look_forward_twice: bool
    ) -> None:
        self.anchor = anchors
        self._position = position
        self._heads = heads
        self._embed = embed
        self._look_forward_twice = look_forward_twice
        self._previous: Tensor | None = None  # the previous layer's box with its gradient
        self._boxes: list[Tensor] = []

    def position(self, layer: int) -> Tensor:
        if layer > 0:
            self._position = self._embed(self.anchor)  # (B, Qt, D)
        return self._position

    def update(self, layer: int, hidden: Tensor) -> None:
        delta = self._heads[layer](hidden)  # (B, Qt, 4) logit space
        box = (delta + inverse_sigmoid(self.anchor)).sigmoid()
        if self._look_forward_twice and self._previous is not None:
            # the same value (the anchor is the previous box, detached), with the previous box's gradient path
            self._boxes.append((delta + inverse_sigmoid(self._previous)).sigmoid())
        else:
            self._boxes.append(box)
        self._previous = box
        self.anchor = box.detach()  # no gradient through the anchors (Deformable DETR Sec. A.4)

    def boxes(self) -> Tensor:
        return torch.stack(self._boxes)  # (L, B, Qt, 4)


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

    def add_training_queries(self) -> None:
        """The training-only queries' parameters (``denoising.py``), added last so that a seeded build initialises
        everything else as without them: the noised labels' embedding and the box → position map (``dn_groups``),
        the one-to-many queries' learned positions (``one_to_many_queries``)."""
        c = self.config
        anchored = c.two_stage or c.box_refine
        self.denoising: DenoisingQueries | None = None
        if c.dn_groups:
            self.denoising = DenoisingQueries(
                c.num_classes,
                c.hidden_dim,
                groups=c.dn_groups,
                label_noise=c.dn_label_noise,
                box_noise=c.dn_box_noise,
                contrastive=c.dn_contrastive,
                # with anchors (query selection, box refinement) every query's position comes from its box
                # through ``query_position``: a second map would get no gradient, and an unused parameter stalls DDP
                box_position=None if anchored else BoxPosition(c.hidden_dim, c.position_temperature),
            )
        # anchored queries: the one-to-many branch takes the next proposals (query selection) or learned anchors
        # (``add_box_refinement``)
        if c.one_to_many_queries and not anchored:
            self.one_to_many_embed = nn.Embedding(c.one_to_many_queries, c.hidden_dim)

    def add_box_refinement(self) -> None:
        """With ``box_refine`` (``BoxRefinement``), added last so that a seeded build initialises everything else
        as without it: a box head per decoder layer (copies of the one head, each starting at "no change" from its
        anchor, as Deformable DETR's clones) and, without query selection, learned anchor boxes in logit space in
        place of ``query_embed`` (DAB-DETR), with the box → position map ``query_position``; the one-to-many
        queries get learned anchors of their own (``one_to_many_anchors``, training-only)."""
        c = self.config
        if not c.box_refine:
            return
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.bbox_embed = nn.ModuleList(copy.deepcopy(self.bbox_embed) for _ in range(c.dec_layers))
        if not c.two_stage:
            self.anchor_embed = nn.Embedding(c.num_queries, 4)
            _init_anchors(self.anchor_embed)
            self.query_position = BoxPosition(c.hidden_dim, c.position_temperature)
            if c.one_to_many_queries:
                self.one_to_many_anchors = nn.Embedding(c.one_to_many_queries, 4)
                _init_anchors(self.one_to_many_anchors)
        if c.freeze_detector:  # what was added after the mask head freezes too
            freeze_all_but_mask_head(self)

    def box_refinement(self, queries: SelectedQueries) -> BoxRefinement:
        """The refinement state of one forward pass from the first layer's ``queries``."""
        assert isinstance(self.bbox_embed, nn.ModuleList)
        return BoxRefinement(
            queries.anchors,
            queries.position,
            self.bbox_embed,
            self.query_position,
            look_forward_twice=self.config.look_forward_twice,
        )

    def anchored_queries(self, memory: Tensor, enc: EncodedImage, extra: ExtraQueries | None) -> SelectedQueries:
        """The decoder's queries with box refinement over ``[matching | denoising | one-to-many]``: with query
        selection ``selected_queries``; otherwise the learned anchors (the one-to-many queries' own), the
        denoising queries' noised boxes as theirs, positions from the anchors, contents zero (noised labels for
        denoising queries). ``memory (B,S,D)``."""
        if self.config.two_stage:
            return self.selected_queries(memory, enc, extra)
        b, q = memory.shape[0], self.config.num_queries
        anchors = [self.anchor_embed.weight.sigmoid()[None].expand(b, -1, -1)]  # (B, Q, 4)
        content = [memory.new_zeros(b, q, memory.shape[-1])]
        self_attn_mask = None
        if extra is not None:
            if extra.num_denoising:
                assert self.denoising is not None
                anchors.append(extra.boxes.to(memory.dtype))  # (B, Qd, 4)
                content.append(self.denoising.content(extra.labels))  # (B, Qd, D)
            if extra.num_one_to_many:
                anchors.append(self.one_to_many_anchors.weight.sigmoid()[None].expand(b, -1, -1))  # (B, Qo, 4)
                content.append(memory.new_zeros(b, extra.num_one_to_many, memory.shape[-1]))
            self_attn_mask = query_attention_mask(q, extra)  # (B, 1, Qt, Qt)
        anchor = torch.cat(anchors, 1)  # (B, Qt, 4)
        return SelectedQueries(anchor, self.query_position(anchor), torch.cat(content, 1), self_attn_mask, None)

    def decoder_outputs(
        self,
        hs: Tensor,
        boxes: Tensor,
        extra: ExtraQueries | None,
        memory: Tensor,
        enc: EncodedImage,
        enc_outputs: dict[str, Tensor] | None = None,
    ) -> dict:
        """The output dict from every decoder layer's ``hs (L,B,Qt,D)`` and ``boxes (L,B,Qt,4)``: classes, the
        training-only queries split off (``split_outputs``), the proposals ``enc_outputs`` and the masks."""
        c, q = self.config, self.config.num_queries
        logits = self.class_embed(hs)  # (L, B, Qt, C)
        logits, boxes, extras = split_outputs(logits, boxes, q, extra, aux=c.aux_loss)
        out = self._pack_outputs(logits, boxes)
        out.update(extras)
        if enc_outputs is not None:
            out["enc_outputs"] = enc_outputs
        if c.masks:
            out["pred_masks"] = self.masks_output(hs[-1, :, :q], memory, enc)  # (B, Q, H/4, W/4)
        return out

    def add_query_selection(self) -> None:
        """With ``two_stage``, query selection (Deformable DETR's two-stage, DINO Sec. 3.4, on the one feature map):
        every encoder token scores and regresses a proposal around its cell (``enc_*``); the top Q become the
        queries' anchor boxes and, through ``query_position``, their positions (``select_queries``)."""
        c = self.config
        if not c.two_stage:
            return
        d = c.hidden_dim
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_class_embed = nn.Linear(d, c.num_classes if c.focal else c.num_classes + 1)
        if c.focal:
            init_focal_bias(self.enc_class_embed)
        self.enc_bbox_embed = MLP(d, d, 4, 3)
        nn.init.zeros_(self.enc_bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.enc_bbox_embed.layers[-1].bias)
        self.query_position = BoxPosition(d, c.position_temperature)
        # boxes start at their anchors: the box head predicts offsets in logit space
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def selected_queries(self, memory: Tensor, enc: EncodedImage, extra: ExtraQueries | None) -> SelectedQueries:
        """The decoder's queries with query selection over ``[matching | denoising | one-to-many]``: anchors from
        the selected proposals (the one-to-many branch takes the next ones in rank, as H-DETR), the denoising
        queries' noised boxes as theirs; positions from the anchors, contents zero (noised labels for denoising
        queries). ``memory (B,S,D)``."""
        q = self.config.num_queries
        num_one_to_many = extra.num_one_to_many if extra is not None else 0
        anchors, enc_outputs = self.select_queries(memory, enc, q + num_one_to_many)  # (B, Q + Qo, 4)
        position = self.query_position(anchors)  # (B, Q + Qo, D)
        content = torch.zeros_like(position)
        self_attn_mask = None
        if extra is not None:
            if extra.num_denoising:
                assert self.denoising is not None
                noised = extra.boxes.to(anchors.dtype)  # (B, Qd, 4)

                def insert(x: Tensor, y: Tensor) -> Tensor:
                    return torch.cat([x[:, :q], y, x[:, q:]], 1)

                anchors = insert(anchors, noised)
                position = insert(position, self.query_position(noised))
                content = insert(content, self.denoising.content(extra.labels))
            self_attn_mask = query_attention_mask(q, extra)  # (B, 1, Qt, Qt)
        return SelectedQueries(anchors, position, content, self_attn_mask, enc_outputs)

    def select_queries(self, memory: Tensor, enc: EncodedImage, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``k`` best proposals of the encoder tokens ``memory (B,S,D)``: ``(B,k,4)`` detached normalised cxcywh
        boxes, ranked by the first class's logit (the criterion trains ``enc_outputs`` class-agnostically, every
        target as class 0), and ``enc_outputs`` (``pred_logits (B,S,C)``, ``pred_boxes (B,S,4)``). A proposal is
        centred on its cell with a side of two cells of the image's valid region."""
        b, s, _ = memory.shape
        if s < k:
            raise ValueError(
                f"query selection keeps the top {k} of the encoder's {s} tokens: use larger images or fewer queries"
            )
        h, w = enc.projected.shape[-2:]
        if enc.mask is None:
            valid = memory.new_tensor([w, h]).expand(b, 2)  # (B, 2) valid cells (x, y)
        else:
            valid = torch.stack([(~enc.mask[:, 0, :]).sum(1), (~enc.mask[:, :, 0]).sum(1)], -1).to(memory.dtype)
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=memory.dtype, device=memory.device) + 0.5,
            torch.arange(w, dtype=memory.dtype, device=memory.device) + 0.5,
            indexing="ij",
        )
        centre = torch.stack([xs, ys], -1).view(1, s, 2) / valid[:, None]  # (B, S, 2)
        size = (2.0 / valid)[:, None].expand(b, s, 2)  # (B, S, 2)
        proposals = torch.cat([centre, size], -1).clamp(1e-3, 1 - 1e-3)  # (B, S, 4); padded cells lie past 1
        tokens = self.enc_output_norm(self.enc_output(memory))  # (B, S, D)
        enc_logits = self.enc_class_embed(tokens)  # (B, S, C)
        coords = self.enc_bbox_embed(tokens) + inverse_sigmoid(proposals)  # (B, S, 4) logit space
        scores = enc_logits[..., 0]
        if enc.flat_mask is not None:
            scores = scores.masked_fill(enc.flat_mask, float("-inf"))  # padded cells are never proposed
        top = scores.topk(k, dim=1).indices  # (B, k)
        anchors = coords.gather(1, top[..., None].expand(-1, -1, 4)).sigmoid().detach()  # (B, k, 4)
        return anchors, {"pred_logits": enc_logits, "pred_boxes": coords.sigmoid()}

    def training_queries(self, extra: ExtraQueries, matching: Tensor) -> tuple[Tensor, Tensor]:
        """Query positions and contents ``(B,Qt,D)`` over ``[matching | denoising | one-to-many]``: the matching
        queries' positions ``matching (B,Q,D)`` and zero content; the denoising queries' noised boxes as positions
        and noised labels as content; the one-to-many queries' learned positions and zero content."""
        b = matching.shape[0]
        positions, contents = [matching], [torch.zeros_like(matching)]
        if extra.num_denoising:
            assert self.denoising is not None
            positions.append(self.denoising.box_position(extra.boxes))  # (B, Qd, D)
            contents.append(self.denoising.content(extra.labels))  # (B, Qd, D)
        if extra.num_one_to_many:
            one_to_many = self.one_to_many_embed.weight[None].expand(b, -1, -1)  # (B, Qo, D)
            positions.append(one_to_many)
            contents.append(torch.zeros_like(one_to_many))
        return torch.cat(positions, 1), torch.cat(contents, 1)

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
        flat_mask = mask.flatten(1) if mask is not None and (exporting() or bool(mask.any())) else None  # (B, S)
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


def _init_anchors(anchors: nn.Embedding) -> None:
    """Anchor boxes in logit space spread over the image: centres uniform in (0.05, 0.95), sides ``ANCHOR_SIZE``
    (DAB-DETR draws its anchors' centres uniformly too)."""
    with torch.no_grad():
        anchors.weight[:, :2].uniform_(0.05, 0.95)
        anchors.weight[:, 2:] = ANCHOR_SIZE
        anchors.weight.copy_(inverse_sigmoid(anchors.weight))
