"""Conditional DETR: Conditional DETR for Fast Training Convergence (Meng et al., ICCV 2021).

What differs from DETR is the decoder's cross-attention: each query carries a 2-D reference point (predicted from
its learned position), and each attention head compares content with content and position with position, by
concatenating a content part and a spatial part of queries and keys instead of adding them. The spatial query is the
sine embedding of the reference point, scaled element-wise by a vector predicted from the decoder embedding, so the
decoder learns where to look (the extremities of an object) rather than finding it through content alone. Boxes
are predicted relative to the reference point. Everything else (backbone, encoder, heads, focal loss, matcher,
criterion) is DETR's or shared.

Legend: B batch, S = h·w encoder tokens, Q queries, K classes, D model width, nh heads, hd = D / nh,
L decoder layers.

Layer: models (one architecture). May import config, the building blocks and ``models`` base modules (``base``,
``layers``, ``single_scale``, ``registry``), never a sibling architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..position_encoding import sine_embed_points
from .denoising import (
    QUERY_TRAINING_FIELDS,
    ExtraQueries,
    extra_queries,
    query_attention_mask,
    split_outputs,
)
from .layers import FFN, MLP, EncoderLayer, inverse_sigmoid
from .registry import Architecture
from .single_scale import (
    REFINE_FIELDS,
    REFINE_SHAPE_FIELDS,
    SINGLE_SCALE_FIELDS,
    SINGLE_SCALE_SHAPE_FIELDS,
    BoxRefinement,
    EncodedImage,
    SingleScaleDetector,
    check_single_scale_config,
)


class ConditionalSelfAttention(nn.Module):
    """Self-attention among queries with separate content and position projections, summed (paper, section 3.3)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_content = nn.Linear(dim, dim)
        self.q_pos = nn.Linear(dim, dim)
        self.k_content = nn.Linear(dim, dim)
        self.k_pos = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, tgt: Tensor, query_pos: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``tgt (B,Q,D)``, ``query_pos (B,Q,D)``, ``attn_mask (B,1,Q,Q)`` True where a query may attend (the
        training-only queries', ``denoising.py``) → ``(B,Q,D)``."""
        b, q, d = tgt.shape
        heads = (b, q, self.num_heads, d // self.num_heads)
        qs = (self.q_content(tgt) + self.q_pos(query_pos)).view(heads).transpose(1, 2)  # (B, nh, Q, hd)
        ks = (self.k_content(tgt) + self.k_pos(query_pos)).view(heads).transpose(1, 2)
        vs = self.v(tgt).view(heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, q, d))


class ConditionalCrossAttention(nn.Module):
    """Cross-attention whose per-head queries and keys are [content, spatial] concatenations (2·hd channels).

    The first decoder layer also adds the learned query position to the content query and the key position to the
    content key (the paper keeps DETR's addition there; later layers rely on the spatial part alone), so only that
    layer has ``q_pos``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, *, first: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_content = nn.Linear(dim, dim)
        self.q_pos = nn.Linear(dim, dim) if first else None
        self.q_pos_sine = nn.Linear(dim, dim)
        self.k_content = nn.Linear(dim, dim)
        self.k_pos = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """Args: ``tgt (B,Q,D)`` content queries, ``query_pos (B,Q,D)`` learned query positions, ``query_sine (B,Q,D)``
        spatial queries, ``memory (B,S,D)``, ``pos (B,S,D)``, ``padding_mask (B,S)`` True on padding.

        Returns ``(B,Q,D)``.
        """
        b, q, d = tgt.shape
        s = memory.shape[1]
        nh, hd = self.num_heads, d // self.num_heads
        q_content = self.q_content(tgt)
        k_content = self.k_content(memory)
        k_pos = self.k_pos(pos)
        if self.q_pos is not None:
            q_content = q_content + self.q_pos(query_pos)
            k_content = k_content + k_pos
        q_spatial = self.q_pos_sine(query_sine)
        # per head: [content (hd), spatial (hd)], so content meets content and position meets position
        qs = torch.cat([q_content.view(b, q, nh, hd), q_spatial.view(b, q, nh, hd)], dim=-1).transpose(1, 2)
        ks = torch.cat([k_content.view(b, s, nh, hd), k_pos.view(b, s, nh, hd)], dim=-1).transpose(1, 2)
        vs = self.v(memory).view(b, s, nh, hd).transpose(1, 2)  # (B, nh, S, hd)
        attn_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        # scale 1/sqrt(2·hd), the concatenated width, as the paper's implementation
        out = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, Q, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, q, d))


class ConditionalDecoderLayer(nn.Module):
    """Post-norm decoder layer: conditional self-attention, conditional cross-attention, FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        *,
        first: bool,
    ) -> None:
        super().__init__()
        self.self_attn = ConditionalSelfAttention(dim, num_heads, attention_dropout)
        self.cross_attn = ConditionalCrossAttention(dim, num_heads, attention_dropout, first=first)
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
        query_sine: Tensor,
        memory: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, query_pos, self_attn_mask)))
        attended = self.cross_attn(tgt, query_pos, query_sine, memory, pos, padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class ConditionalTransformer(nn.Module):
    """DETR's encoder and the conditional decoder.

    The decoder predicts one reference point per query from its learned position (``ref_point_head``, an MLP +
    sigmoid), embeds it with the feature map's sine frequencies, and scales that embedding by ``query_scale``
    (an MLP of the decoder state; identity in the first layer) to form each layer's spatial query.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        enc_layers: int,
        dec_layers: int,
        ffn_dim: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        temperature: float,
        reference_head: bool = True,
    ) -> None:
        super().__init__()
        args = (dim, num_heads, ffn_dim, dropout, attention_dropout, activation_dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(ConditionalDecoderLayer(*args, first=i == 0) for i in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_scale = MLP(dim, dim, dim, 2)
        # without it (query selection, box refinement) every reference point is given: an unused head would stall DDP
        self.ref_point_head = MLP(dim, dim, 2, 2) if reference_head else None
        self.temperature = temperature
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: Tensor, pos: Tensor, padding_mask: Tensor | None, query_embed: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Args: ``src (B,S,D)``, ``pos (B,S,D)``, ``padding_mask (B,S)`` or None, ``query_embed (Q,D)``.

        Returns: every decoder layer's normalised output ``(L,B,Q,D)`` and the reference points ``(B,Q,2)``
        (normalised x, y).
        """
        return self.decode(self.encode(src, pos, padding_mask), pos, padding_mask, query_embed)

    def encode(self, src: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        """The encoder: ``src (B,S,D)``, ``pos (B,S,D)``, ``padding_mask (B,S)`` or None → memory ``(B,S,D)``."""
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos, padding_mask)
        return memory

    def decode(
        self,
        memory: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
        query_embed: Tensor,
        *,
        content: Tensor | None = None,
        reference: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        refine: BoxRefinement | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The decoder: ``memory (B,S,D)``, ``pos``, ``padding_mask``, ``query_embed`` as ``forward`` (or
        ``(B,Q,D)`` per image); optional ``content (B,Q,D)`` queries (zeros by default), ``reference (B,Q,2)``
        points (predicted from the positions by default), ``self_attn_mask (B,1,Q,Q)`` and ``refine`` (box
        refinement: each layer's query positions and reference points from its anchors, the first layer's
        positions being ``query_embed``) → every layer's normalised output ``(L,B,Q,D)`` and the first layer's
        reference points ``(B,Q,2)``."""
        b, d = memory.shape[0], memory.shape[2]
        query_pos = query_embed[None].expand(b, -1, -1) if query_embed.dim() == 2 else query_embed  # (B, Q, D)
        if refine is not None:
            reference = refine.anchor[..., :2]
        elif reference is None:
            if self.ref_point_head is None:
                raise ValueError("this decoder has no reference-point head: pass reference= or refine=")
            reference = self.ref_point_head(query_pos).sigmoid()  # (B, Q, 2)
        first_reference = reference
        sine = sine_embed_points(reference, d // 2, temperature=self.temperature)  # (B, Q, D)
        tgt = torch.zeros_like(query_pos) if content is None else content
        hs = []
        for i, layer in enumerate(self.decoder):
            if refine is not None and i > 0:
                # the refined box's centre is this layer's reference point (DAB-DETR's conditional decoder)
                query_pos = refine.position(i)  # (B, Q, D)
                sine = sine_embed_points(refine.anchor[..., :2], d // 2, temperature=self.temperature)
            query_sine = sine if i == 0 else sine * self.query_scale(tgt)
            tgt = layer(tgt, query_pos, query_sine, memory, pos, padding_mask, self_attn_mask)
            hs.append(self.decoder_norm(tgt))
            if refine is not None:
                refine.update(i, hs[-1])
        return torch.stack(hs), first_reference


class ConditionalDETR(SingleScaleDetector):
    """Conditional DETR: DETR's backbone and encoder, the conditional decoder, 300 queries and a sigmoid class head.

    Forward: ``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` True on padding (or None) → dict with
    ``pred_logits (B,Q,K)`` (``(B,Q,K+1)`` with ``class_loss="softmax"``), ``pred_boxes (B,Q,4)`` (normalised cx, cy,
    w, h of the unpadded image), ``aux_outputs`` (one dict per earlier decoder layer, when ``config.aux_loss``) and,
    with ``config.masks``, ``pred_masks (B,Q,ceil(H/4),ceil(W/4))`` (DETR's mask head, ``segmentation.py``).

    transformers' ``ConditionalDetrForSegmentation`` predicts its boxes without the reference points (its forward
    is DETR's); this model predicts them from the reference points with or without masks, as its detection model
    and the paper do.

    Options: ``two_stage`` (query selection: anchor boxes from the encoder's proposals, their centres the
    reference points) and ``box_refine`` (each layer refines the previous layer's box, whose centre is the next
    layer's reference point and whose embedding its query position; learned anchors without ``two_stage``), in
    ``single_scale.py``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        if not c.two_stage and not c.box_refine:  # otherwise positions come from the queries' anchor boxes
            self.query_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        self.transformer = ConditionalTransformer(
            dim=c.hidden_dim,
            num_heads=c.num_heads,
            enc_layers=c.enc_layers,
            dec_layers=c.dec_layers,
            ffn_dim=c.ffn_dim,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            activation_dropout=c.activation_dropout,
            temperature=c.position_temperature,
            reference_head=not (c.box_refine or c.two_stage),
        )
        self.add_heads()
        # boxes start at the reference point with the size sigmoid(0) = half the image, as the paper's code
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.add_mask_head()
        self.add_query_selection()
        self.add_training_queries()
        self.add_box_refinement()

    def forward(
        self, pixel_values: Tensor, padding_mask: Tensor | None = None, targets: list[dict] | None = None
    ) -> dict:
        enc = self.encode_image(pixel_values, padding_mask)
        memory = self.transformer.encode(enc.src, enc.pos, enc.flat_mask)  # (B, S, D)
        b, q = memory.shape[0], self.config.num_queries
        # training-only queries (denoising.py): never at inference, so evaluation and export see Q queries
        extra = extra_queries(self.denoising, self.config, targets, b, memory.device) if self.training else None
        if self.config.box_refine:
            return self._forward_refined(memory, enc, extra)
        if self.config.two_stage:
            return self._forward_selected(memory, enc, extra)
        if extra is None:
            hs, reference = self.transformer.decode(memory, enc.pos, enc.flat_mask, self.query_embed.weight)
        else:
            position, content = self.training_queries(extra, self.query_embed.weight[None].expand(b, -1, -1))
            # the denoising queries' reference points are their noised boxes' centres; the others' are predicted
            reference = self.transformer.ref_point_head(position).sigmoid()  # (B, Qt, 2)
            qd = extra.num_denoising
            reference = torch.cat([reference[:, :q], extra.boxes[..., :2], reference[:, q + qd :]], 1)
            hs, reference = self.transformer.decode(
                memory,
                enc.pos,
                enc.flat_mask,
                position,
                content=content,
                reference=reference,
                self_attn_mask=query_attention_mask(q, extra),
            )  # (L, B, Qt, D), (B, Qt, 2)
        logits = self.class_embed(hs)  # (L, B, Qt, K)
        offsets = self.bbox_embed(hs)  # (L, B, Qt, 4)
        centre = offsets[..., :2] + inverse_sigmoid(reference)  # offsets from the reference point, logit space
        boxes = torch.cat([centre, offsets[..., 2:]], dim=-1).sigmoid()
        logits, boxes, extras = split_outputs(logits, boxes, q, extra, aux=self.config.aux_loss)
        out = self._pack_outputs(logits, boxes)
        out.update(extras)
        if self.config.masks:
            out["pred_masks"] = self.masks_output(hs[-1, :, :q], memory, enc)  # (B, Q, H/4, W/4)
        return out

    def _forward_selected(self, memory: Tensor, enc: EncodedImage, extra: ExtraQueries | None) -> dict:
        """``forward`` with query selection (``two_stage``): each query's anchor box (``select_queries``) gives its
        reference point (the centre), and boxes are predicted relative to the whole anchor."""
        c, q = self.config, self.config.num_queries
        sel = self.selected_queries(memory, enc, extra)
        hs, _ = self.transformer.decode(
            memory,
            enc.pos,
            enc.flat_mask,
            sel.position,
            content=sel.content,
            reference=sel.anchors[..., :2],
            self_attn_mask=sel.self_attn_mask,
        )  # (L, B, Qt, D)
        logits = self.class_embed(hs)  # (L, B, Qt, K)
        boxes = (self.bbox_embed(hs) + inverse_sigmoid(sel.anchors)).sigmoid()  # (L, B, Qt, 4)
        logits, boxes, extras = split_outputs(logits, boxes, q, extra, aux=c.aux_loss)
        out = self._pack_outputs(logits, boxes)
        out.update(extras)
        out["enc_outputs"] = sel.enc_outputs
        if c.masks:
            out["pred_masks"] = self.masks_output(hs[-1, :, :q], memory, enc)  # (B, Q, H/4, W/4)
        return out

    def _forward_refined(self, memory: Tensor, enc: EncodedImage, extra: ExtraQueries | None) -> dict:
        """``forward`` with box refinement (``box_refine``): each layer's reference points are its anchors'
        centres and its query positions their embeddings, the anchors being the previous layer's boxes
        (``BoxRefinement``)."""
        sel = self.anchored_queries(memory, enc, extra)
        refine = self.box_refinement(sel)
        hs, _ = self.transformer.decode(
            memory,
            enc.pos,
            enc.flat_mask,
            sel.position,
            content=sel.content,
            self_attn_mask=sel.self_attn_mask,
            refine=refine,
        )  # (L, B, Qt, D)
        return self.decoder_outputs(hs, refine.boxes(), extra, memory, enc, sel.enc_outputs)


ARCHITECTURE = Architecture(
    name="conditional_detr",
    model=ConditionalDETR,
    fields=(*SINGLE_SCALE_FIELDS, "two_stage", *REFINE_FIELDS, *QUERY_TRAINING_FIELDS),
    shape_fields=(*SINGLE_SCALE_SHAPE_FIELDS, "two_stage", *REFINE_SHAPE_FIELDS),
    check=check_single_scale_config,
)
