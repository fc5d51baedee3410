"""DETR: End-to-End Object Detection with Transformers (Carion et al., 2020).

Legend: B batch, H×W padded input, h×w the backbone's last feature map, S = h·w encoder tokens, Q object queries,
K classes (the class head has K+1 outputs, the last is no-object), D model width, L decoder layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import ResNetBackbone
from ..config import ModelConfig
from ..position_encoding import build_position_encoding
from .base import Detector
from .layers import MLP, Attention


class FFN(nn.Module):
    """The transformer's position-wise feed-forward block: linear → ReLU → dropout → linear."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; the position embedding is added to queries and keys, not values (paper, A.3)."""

    def __init__(
        self,
        dim: int,
        nheads: int,
        ffn_dim: int,
        dropout: float,
        attention_dropout: float,
        act_dropout: float,
    ):
        super().__init__()
        self.self_attn = Attention(dim, nheads, dropout=attention_dropout)
        self.ffn = FFN(dim, ffn_dim, act_dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``src (B,S,D)``, ``pos (B,S,D)``, ``padding_mask (B,S)`` → ``(B,S,D)``."""
        qk = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src, padding_mask)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention among queries, cross-attention to the encoder memory, FFN."""

    def __init__(
        self,
        dim: int,
        nheads: int,
        ffn_dim: int,
        dropout: float,
        attention_dropout: float,
        act_dropout: float,
    ):
        super().__init__()
        self.self_attn = Attention(dim, nheads, dropout=attention_dropout)
        self.cross_attn = Attention(dim, nheads, dropout=attention_dropout)
        self.ffn = FFN(dim, ffn_dim, act_dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, padding_mask: Tensor | None
    ) -> Tensor:
        """``tgt (B,Q,D)``, ``query_pos (B,Q,D)``, ``memory (B,S,D)``, ``pos (B,S,D)`` → ``(B,Q,D)``."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt)))
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(tgt + query_pos, memory + pos, memory, padding_mask)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class Transformer(nn.Module):
    """DETR's encoder-decoder. The decoder's shared final LayerNorm is applied to every layer's output for the
    auxiliary losses, while the un-normalised output feeds the next layer (as the official implementation)."""

    def __init__(
        self,
        *,
        dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        args = (dim, nheads, ffn_dim, dropout, attention_dropout, activation_dropout)
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
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos, padding_mask)
        query_pos = query_embed[None].expand(src.shape[0], -1, -1)  # (B, Q, D)
        tgt = torch.zeros_like(query_pos)  # the decoder starts from zeros; queries enter as positions (paper, A.3)
        hs = []
        for layer in self.decoder:
            tgt = layer(tgt, query_pos, memory, pos, padding_mask)
            hs.append(self.decoder_norm(tgt))
        return torch.stack(hs)  # (L, B, Q, D)


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


class DETR(SingleScaleDetector):
    """DETR with a ResNet backbone, sine (or learned) position encodings and learned object queries.

    Forward: ``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` True on padding (or None) → dict with
    ``pred_logits (B,Q,K+1)`` (``(B,Q,K)`` with ``class_loss="focal"``), ``pred_boxes (B,Q,4)`` (normalised cx,
    cy, w, h of the unpadded image) and ``aux_outputs``: one dict with the same keys per earlier decoder layer
    (when ``config.aux_loss``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        self.query_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        self.transformer = Transformer(
            dim=c.hidden_dim,
            nheads=c.nheads,
            enc_layers=c.enc_layers,
            dec_layers=c.dec_layers,
            ffn_dim=c.dim_feedforward,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            activation_dropout=c.activation_dropout,
        )
        self.add_heads()

    def forward(self, pixel_values: Tensor, padding_mask: Tensor | None = None) -> dict:
        src, pos, flat_mask = self.encode_image(pixel_values, padding_mask)
        hs = self.transformer(src, pos, flat_mask, self.query_embed.weight)  # (L, B, Q, D)
        logits = self.class_embed(hs)  # (L, B, Q, K+1)
        boxes = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4)
        return self._pack_outputs(logits, boxes)


def init_focal_bias(class_embed: nn.Linear, prior: float = 0.01) -> None:
    """Start every sigmoid at probability ``prior`` (RetinaNet's, as Deformable and Conditional DETR): the focal
    loss would otherwise be swamped by the many easy negatives at the start."""
    nn.init.constant_(class_embed.bias, -math.log((1 - prior) / prior))
