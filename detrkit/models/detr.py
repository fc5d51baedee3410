"""DETR: End-to-End Object Detection with Transformers (Carion et al., 2020).

Legend: B batch, H×W padded input, h×w the backbone's last feature map, S = h·w encoder tokens, Q object queries,
K classes (the class head has K+1 outputs, the last is no-object), D model width, L decoder layers.

Layer: models (one architecture). May import config, the building blocks and ``models`` base modules (``base``,
``layers``, ``single_scale``, ``registry``), never a sibling architecture.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .denoising import (
    QUERY_TRAINING_FIELDS,
    ExtraQueries,
    extra_queries,
    query_attention_mask,
    split_outputs,
)
from .layers import FFN, Attention, EncoderLayer, inverse_sigmoid
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


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention among queries, cross-attention to the encoder memory, FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
    ):
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout=attention_dropout)
        self.cross_attn = Attention(dim, num_heads, dropout=attention_dropout)
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
        memory: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """``tgt (B,Q,D)``, ``query_pos (B,Q,D)``, ``memory (B,S,D)``, ``pos (B,S,D)``, ``self_attn_mask (B,1,Q,Q)``
        (True: may attend; the training-only queries', ``denoising.py``) → ``(B,Q,D)``."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, attn_mask=self_attn_mask)))
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(tgt + query_pos, memory + pos, memory, padding_mask)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class Transformer(nn.Module):
    """DETR's encoder-decoder. The decoder's shared final LayerNorm is applied to every layer's output for the
    auxiliary losses, while the un-normalised output feeds the next layer (as the official implementation)."""

    def __init__(
        self,
        *,
        dim: int = 256,
        num_heads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        args = (dim, num_heads, ffn_dim, dropout, attention_dropout, activation_dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*args) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, Attention):
                for proj in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                    nn.init.zeros_(proj.bias)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor | None, query_embed: Tensor) -> Tensor:
        """Args: ``src (B,S,D)``, ``pos (B,S,D)``, ``padding_mask (B,S)`` or None, ``query_embed (Q,D)``.

        Returns: ``(L, B, Q, D)`` every decoder layer's normalised output.
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
        self_attn_mask: Tensor | None = None,
        refine: BoxRefinement | None = None,
    ) -> Tensor:
        """The decoder: ``memory (B,S,D)``, ``pos (B,S,D)``, ``padding_mask (B,S)`` or None, ``query_embed (Q,D)``
        (or ``(B,Q,D)`` per image), optional ``content (B,Q,D)`` queries (zeros by default), ``self_attn_mask``
        ``(B,1,Q,Q)`` and ``refine`` (box refinement: each layer's query positions from its anchors, the first
        layer's being ``query_embed``) → ``(L, B, Q, D)`` every layer's normalised output."""
        if query_embed.dim() == 2:
            query_embed = query_embed[None].expand(memory.shape[0], -1, -1)
        query_pos = query_embed  # (B, Q, D)
        # the decoder starts from zeros; queries enter as positions (paper, A.3); denoising queries bring content
        tgt = torch.zeros_like(query_pos) if content is None else content
        hs = []
        for i, layer in enumerate(self.decoder):
            if refine is not None:
                query_pos = refine.position(i)  # (B, Q, D)
            tgt = layer(tgt, query_pos, memory, pos, padding_mask, self_attn_mask)
            hs.append(self.decoder_norm(tgt))
            if refine is not None:
                refine.update(i, hs[-1])
        return torch.stack(hs)  # (L, B, Q, D)


class DETR(SingleScaleDetector):
    """DETR with a ResNet backbone, sine (or learned) position encodings and learned object queries.

    Forward: ``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` True on padding (or None) → dict with
    ``pred_logits (B,Q,K+1)`` (``(B,Q,K)`` with ``class_loss="focal"``), ``pred_boxes (B,Q,4)`` (normalised cx,
    cy, w, h of the unpadded image) and ``aux_outputs``: one dict with the same keys per earlier decoder layer
    (when ``config.aux_loss``); with ``config.masks``, ``pred_masks (B,Q,ceil(H/4),ceil(W/4))``: mask logits of the
    padded input from the last layer's embeddings (``segmentation.py``).

    Options: ``two_stage`` (query selection: anchors from the encoder's proposals, ``enc_outputs``) and
    ``box_refine`` (each layer refines the previous layer's box, whose embedding is the next layer's query
    position; learned anchors in place of ``query_embed`` without ``two_stage``), in ``single_scale.py``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        if not c.two_stage and not c.box_refine:  # otherwise positions come from the queries' anchor boxes
            self.query_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        self.transformer = Transformer(
            dim=c.hidden_dim,
            num_heads=c.num_heads,
            enc_layers=c.enc_layers,
            dec_layers=c.dec_layers,
            ffn_dim=c.ffn_dim,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            activation_dropout=c.activation_dropout,
        )
        self.add_heads()
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
            hs = self.transformer.decode(memory, enc.pos, enc.flat_mask, self.query_embed.weight)  # (L, B, Q, D)
        else:
            position, content = self.training_queries(extra, self.query_embed.weight[None].expand(b, -1, -1))
            mask = query_attention_mask(q, extra)  # (B, 1, Qt, Qt)
            hs = self.transformer.decode(
                memory, enc.pos, enc.flat_mask, position, content=content, self_attn_mask=mask
            )  # (L, B, Qt, D)
        logits = self.class_embed(hs)  # (L, B, Qt, K+1)
        boxes = self.bbox_embed(hs).sigmoid()  # (L, B, Qt, 4)
        logits, boxes, extras = split_outputs(logits, boxes, q, extra, aux=self.config.aux_loss)
        out = self._pack_outputs(logits, boxes)
        out.update(extras)
        if self.config.masks:
            out["pred_masks"] = self.masks_output(hs[-1, :, :q], memory, enc)  # (B, Q, H/4, W/4)
        return out

    def _forward_selected(self, memory: Tensor, enc: EncodedImage, extra: ExtraQueries | None) -> dict:
        """``forward`` with query selection (``two_stage``): each query's position is the embedding of its anchor
        box (``select_queries``), and boxes are predicted relative to the anchor."""
        c, q = self.config, self.config.num_queries
        sel = self.selected_queries(memory, enc, extra)
        hs = self.transformer.decode(
            memory, enc.pos, enc.flat_mask, sel.position, content=sel.content, self_attn_mask=sel.self_attn_mask
        )  # (L, B, Qt, D)
        logits = self.class_embed(hs)  # (L, B, Qt, K+1)
        boxes = (self.bbox_embed(hs) + inverse_sigmoid(sel.anchors)).sigmoid()  # (L, B, Qt, 4)
        logits, boxes, extras = split_outputs(logits, boxes, q, extra, aux=c.aux_loss)
        out = self._pack_outputs(logits, boxes)
        out.update(extras)
        out["enc_outputs"] = sel.enc_outputs
        if c.masks:
            out["pred_masks"] = self.masks_output(hs[-1, :, :q], memory, enc)  # (B, Q, H/4, W/4)
        return out

    def _forward_refined(self, memory: Tensor, enc: EncodedImage, extra: ExtraQueries | None) -> dict:
        """``forward`` with box refinement (``box_refine``): each layer's query positions are the embeddings of
        its anchors, the previous layer's boxes (``BoxRefinement``)."""
        sel = self.anchored_queries(memory, enc, extra)
        refine = self.box_refinement(sel)
        hs = self.transformer.decode(
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
    name="detr",
    model=DETR,
    fields=(*SINGLE_SCALE_FIELDS, "two_stage", *REFINE_FIELDS, *QUERY_TRAINING_FIELDS),
    shape_fields=(*SINGLE_SCALE_SHAPE_FIELDS, "two_stage", *REFINE_SHAPE_FIELDS),
    check=check_single_scale_config,
)
