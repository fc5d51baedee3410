"""The DETR paper's mask head (Carion et al., 2020, section 4.4 and figure 8), shared by the architectures that
offer ``masks=True``.

Each query's final decoder embedding attends to the encoder memory of one feature map: multi-head attention
weights only, no values, so every query gets ``nh`` heat maps at that map's stride (32 for DETR). A small FPN-style
convolutional head concatenates them with the projected feature map, then upsamples three times, each time adding
a backbone stage (layer3, layer2, layer1: strides 16, 8, 4) through a 1×1 adapter, down to one mask-logit map per
query at stride 4 (a map attended at stride 16, Deformable DETR's ``mask_feature_level=3``, meets layer3 at its own
size: the first step adds it without upsampling). Layout, widths, GroupNorm groups and initialisation are
facebookresearch/detr's ``MHAttentionMap`` and ``MaskHeadSmallConv`` (transformers' ``DetrForSegmentation`` computes
the same), so that published weights convert and give the same masks.

Padding: with ``exact`` (a model built with ``mask_backbone_padding=True``, detrkit's default) padded cells are
zeroed before every 3×3 convolution and GroupNorm statistics are taken over image cells only, so an image's masks
do not depend on the padding of its batch. Without it the computation is the reference's (GroupNorm over the whole
padded map), as published weights need.

Legend: B batch, Q queries, D model width, nh heads, hd = D / nh, h×w the attended feature map, S = h·w,
h_l×w_l and C_l a backbone stage's map and channels.

Layer: models (a part shared by architectures, not an architecture). Imports torch and ``config`` only; the
architectures import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import exporting
from ..config import ModelConfig

# The ModelConfig fields of an architecture with the mask head, and those of them that decide its weights.
MASK_FIELDS = ("masks", "freeze_detector", "mask_attention_scale")
MASK_SHAPE_FIELDS = ("masks",)
# ... and of an architecture with several encoder levels (Deformable DETR): which of them the head attends to.
MULTI_SCALE_MASK_FIELDS = ("mask_feature_level",)
# Every parameter of the mask head lives under these names (what ``freeze_detector`` leaves trainable).
MASK_HEAD_PREFIXES = ("bbox_attention.", "mask_head.")
# The backbone stages whose features the head upsamples with, coarsest first.
FPN_LEVELS = (3, 2, 1)


def group_norm_groups(channels: int) -> int:
    """GroupNorm groups of a mask-head layer: 8 as the reference, fewer where ``channels`` is not a multiple of 8
    (the largest divisor ≤ 8: all of them below 8, as transformers does; e.g. 6 for 36 channels)."""
    return max(g for g in range(1, 9) if channels % g == 0)


def mask_head_widths(dim: int, num_heads: int) -> tuple[int, ...]:
    """Channels of the head's five 3×3 blocks: D + nh (features and attention maps), then D/2, D/4, D/8, D/16."""
    return (dim + num_heads, dim // 2, dim // 4, dim // 8, dim // 16)


def check_mask_config(config: ModelConfig) -> None:
    """Refuse a ``masks=True`` config whose width leaves a mask-head layer without channels."""
    if config.masks and config.hidden_dim < 16:
        raise ValueError(
            f"masks=True needs hidden_dim ≥ 16 (the last mask-head block has D/16 channels), got {config.hidden_dim}"
        )


def check_mask_feature_level(config: ModelConfig, levels: tuple[int, ...]) -> None:
    """Refuse a ``mask_feature_level`` that is not among the backbone ``levels`` whose encoder memory the model
    computes (e.g. stride 16 for a single-level Deformable DETR)."""
    if config.masks and config.mask_feature_level not in levels:
        raise ValueError(
            f"mask_feature_level={config.mask_feature_level}: the encoder memory holds backbone levels {list(levels)} "
            f"only (num_feature_levels={config.num_feature_levels}); use one of them"
        )


def freeze_all_but_mask_head(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter outside the mask head (the paper's second stage trains the mask
    head on a frozen detector); the mask head's parameters keep theirs."""
    for name, p in model.named_parameters():
        if not name.startswith(MASK_HEAD_PREFIXES):
            p.requires_grad_(False)


class AttentionMaps(nn.Module):
    """Multi-head attention weights of queries over a feature map, without values (the reference's
    ``MHAttentionMap``). The softmax runs over the heads and positions of a query jointly, as the reference's."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        for proj in (self.q_proj, self.k_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, queries: Tensor, memory: Tensor, size: tuple[int, int], padding_mask: Tensor | None) -> Tensor:
        """Args: ``queries (B,Q,D)``, ``memory (B,S,D)`` of a map of ``size`` (h, w), ``padding_mask (B,h,w)`` True on
        padding (or None).

        Returns ``(B,Q,nh,h,w)``: each query's attention weights, summing to 1 over heads and positions together.
        """
        b, q, d = queries.shape
        h, w = size
        nh = self.num_heads
        hd = d // nh
        qh = self.q_proj(queries).view(b, q, nh, hd)  # (B, Q, nh, hd)
        kh = self.k_proj(memory).view(b, h, w, nh, hd)  # (B, h, w, nh, hd)
        weights = torch.einsum("bqnc,bhwnc->bqnhw", qh * float(hd) ** -0.5, kh)  # (B, Q, nh, h, w)
        if padding_mask is not None:
            weights = weights.masked_fill(padding_mask[:, None, None], float("-inf"))
        return F.softmax(weights.flatten(2), dim=-1).view(weights.shape)


class ConvBlock(nn.Module):
    """3×3 convolution, GroupNorm, ReLU; in padding-exact mode padded cells are zeroed before the convolution and
    left out of the normalisation's statistics."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(group_norm_groups(out_channels), out_channels)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """``x (N,C_in,h,w)``, ``valid (N,1,h,w)`` 1 on image cells (None: the reference's computation) →
        ``(N,C_out,h,w)``."""
        if valid is not None:
            x = x * valid
        return F.relu(masked_group_norm(self.conv(x), self.norm, valid))


class MaskHead(nn.Module):
    """The reference's ``MaskHeadSmallConv``: two blocks at the attended map's resolution, then three upsampling
    steps that add an adapted backbone stage (nearest-neighbour upsampling, as the reference), and a 3×3
    convolution to one logit per cell.

    Args:
        dim: the model width D (the projected feature map's channels).
        num_heads: nh, the attention maps per query.
        fpn_channels: channels of the backbone stages it adds, coarsest first (layer3, layer2, layer1).
    """

    def __init__(self, dim: int, num_heads: int, fpn_channels: tuple[int, int, int]) -> None:
        super().__init__()
        widths = mask_head_widths(dim, num_heads)
        self.blocks = nn.ModuleList(
            [ConvBlock(widths[0], widths[0])] + [ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        # the adapters bring each stage to the width of the map it is added to
        self.adapters = nn.ModuleList(
            nn.Conv2d(c, width, kernel_size=1) for c, width in zip(fpn_channels, widths[1:4], strict=True)
        )
        self.out_conv = nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(
        self, features: Tensor, attention: Tensor, fpn: list[Tensor], valid: list[Tensor] | None = None
    ) -> Tensor:
        """Args: ``features (B,D,h,w)`` the projected feature map, ``attention (B,Q,nh,h,w)``, ``fpn``: the three
        backbone stages ``(B,C_l,h_l,w_l)``, coarsest first; ``valid``: None, or four ``(B,1,·,·)`` maps 1 on image
        cells (the attended map, then the three stages) for the padding-exact computation.

        Returns ``(B,Q,h_1,w_1)`` mask logits at the finest stage's resolution.
        """
        b, q = attention.shape[:2]
        per_query = None if valid is None else [_per_query(v, q) for v in valid]  # (B·Q, 1, ·, ·) each
        x = torch.cat([features[:, None].expand(-1, q, -1, -1, -1), attention], dim=2).flatten(
            0, 1
        )  # (B·Q, D+nh, h, w)
        x = self.blocks[0](x, None if per_query is None else per_query[0])
        x = self.blocks[1](x, None if per_query is None else per_query[0])
        for i, (adapter, block, stage) in enumerate(zip(self.adapters, self.blocks[2:], fpn, strict=True)):
            adapted = adapter(stage)  # (B, C, h_l, w_l): once per image, shared by its queries
            up = F.interpolate(x, size=adapted.shape[-2:], mode="nearest")  # (B·Q, C, h_l, w_l)
            x = (adapted[:, None] + up.view(b, q, *up.shape[1:])).flatten(0, 1)  # (B·Q, C, h_l, w_l)
            x = block(x, None if per_query is None else per_query[i + 1])
        if per_query is not None:
            x = x * per_query[-1]
        out = self.out_conv(x)  # (B·Q, 1, h_1, w_1)
        return out.view(b, q, *out.shape[-2:])


def _per_query(valid: Tensor, num_queries: int) -> Tensor:
    """``(B,1,h,w)`` → ``(B·Q,1,h,w)``, each image's map repeated for its queries."""
    return valid[:, None].expand(-1, num_queries, -1, -1, -1).flatten(0, 1)


def predict_masks(
    bbox_attention: AttentionMaps,
    mask_head: MaskHead,
    queries: Tensor,
    memory: Tensor,
    features: Tensor,
    padding_mask: Tensor | None,
    fpn: list[tuple[Tensor, Tensor | None]],
    *,
    exact: bool,
    attention_scale: str = "reference",
) -> Tensor:
    """The mask logits of every query.

    Args:
        queries: ``(B,Q,D)`` the final decoder embeddings.
        memory: ``(B,S,D)`` the encoder memory of the attended map.
        features: ``(B,D,h,w)`` the projected feature map the memory was encoded from.
        padding_mask: ``(B,h,w)`` True on padding, or None (no padding).
        fpn: ``(features (B,C_l,h_l,w_l), padding_mask (B,h_l,w_l) or None)`` of layer3, layer2, layer1.
        exact: the padding-exact computation (see the module docstring).
        attention_scale: ``"reference"`` (the maps as the softmax gives them) or ``"unit"`` (scaled by heads ×
            the image's valid cells, so their mean over the image is 1; ``ModelConfig.mask_attention_scale``).

    Returns ``(B,Q,h_1,w_1)``: stride 4 of the padded input.
    """
    attended = padding_mask if padding_mask is not None and (exporting() or bool(padding_mask.any())) else None
    attention = bbox_attention(queries, memory, features.shape[-2:], attended)  # (B, Q, nh, h, w)
    if attention_scale == "unit":
        b, _, nh, h, w = attention.shape
        cells = (~padding_mask).flatten(1).sum(1) if padding_mask is not None else attention.new_full((b,), h * w)
        attention = attention * (nh * cells.to(attention.dtype))[:, None, None, None, None]
    valid = None
    finest = fpn[-1][1]
    # padding can show at stride 4 and not at the attended map's stride: the finest map decides
    if exact and padding_mask is not None and finest is not None and (exporting() or bool(finest.any())):
        masks = [padding_mask] + [m for _, m in fpn]
        valid = [(~m)[:, None].to(features.dtype) for m in masks]  # (B, 1, ·, ·) each
    return mask_head(features, attention, [f for f, _ in fpn], valid)


def masked_group_norm(x: Tensor, norm: nn.GroupNorm, valid: Tensor | None) -> Tensor:
    """``norm(x)`` with statistics over the valid cells only, and padded cells set to zero.

    A plain GroupNorm averages over the whole padded map, so an image's features would depend on the padding its
    batch adds. Args: ``x (B,C,h,w)``, ``valid (B,1,h,w)`` 1 on image cells (None: no padding). Returns
    ``(B,C,h,w)``.
    """
    b, c, h, w = x.shape
    g = norm.num_groups
    if valid is None:
        if (c // g) * h * w > 1:
            return norm(x)
        # One value per group (C = G and a 1×1 map): F.group_norm refuses it in training; the result is the bias.
        valid = x.new_ones(b, 1, h, w)
    xg = x.view(b, g, c // g, h, w)  # (B, G, C/G, h, w)
    m = valid.reshape(b, 1, 1, h, w).to(x.dtype)
    count = m.sum(dim=(2, 3, 4), keepdim=True) * (c // g)
    mean = (xg * m).sum(dim=(2, 3, 4), keepdim=True) / count  # (B, G, 1, 1, 1)
    var = ((xg - mean) * m).pow(2).sum(dim=(2, 3, 4), keepdim=True) / count
    out = ((xg - mean) * torch.rsqrt(var + norm.eps)).view(b, c, h, w)
    if norm.affine:
        out = out * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    return out * valid.to(x.dtype)
