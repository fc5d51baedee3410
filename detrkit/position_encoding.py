"""2-D position encodings for feature maps, computed from the padding mask.

The sine encoding (DETR, section 3.2 and appendix A.4) normalises positions by the extent of the *valid* region, so
an image's encoding does not change with the padding its batch adds.

Layer: building blocks. Imports torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinePositionEncoding(nn.Module):
    """Sine/cosine encoding of (y, x) with ``num_feats`` channels each: output has ``2 * num_feats`` channels.

    Args:
        num_feats: channels per axis (half the model width).
        temperature: the wavelength base (10000 as in "Attention is all you need").
        normalize: divide positions by the valid extent (then multiply by ``scale``).
        scale: range of normalised positions (2π).
        offset: added to the 1-based cell index before normalising: 0 (DETR) puts the last valid cell at
            ``scale``; -0.5 (Deformable DETR) encodes cell centres.
    """

    def __init__(
        self,
        num_feats: int = 128,
        *,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, shape: tuple[int, int, int], padding_mask: Tensor | None, *, device=None) -> Tensor:
        """Args: ``shape`` = (B, h, w); ``padding_mask (B,h,w)`` True on padding or None.

        Returns: ``(B, 2*num_feats, h, w)`` float32.
        """
        b, h, w = shape
        if padding_mask is None:
            not_mask = torch.ones((b, h, w), dtype=torch.float32, device=device)
        else:
            not_mask = (~padding_mask).float()
        y = not_mask.cumsum(1)  # (B, h, w)
        x = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y = (y + self.offset) / (y[:, -1:, :] + eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos_x = x[..., None] / dim_t  # (B, h, w, F)
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, h, w)


class LearnedPositionEncoding(nn.Module):
    """Learned row and column embeddings (up to ``max_size`` cells per axis), concatenated (x first, as DETR)."""

    def __init__(self, num_feats: int = 128, *, max_size: int = 50) -> None:
        super().__init__()
        self.max_size = max_size
        self.row_embed = nn.Embedding(max_size, num_feats)
        self.col_embed = nn.Embedding(max_size, num_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, shape: tuple[int, int, int], padding_mask: Tensor | None, *, device=None) -> Tensor:
        """Returns ``(B, 2*num_feats, h, w)``."""
        b, h, w = shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"learned position encoding covers at most {self.max_size}×{self.max_size} feature cells, got {h}×{w}: "
                "use smaller images or the sine encoding"
            )
        device = self.row_embed.weight.device
        x_emb = self.col_embed(torch.arange(w, device=device))  # (w, F)
        y_emb = self.row_embed(torch.arange(h, device=device))  # (h, F)
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)  # (h, w, 2F)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)


def sine_embed_points(points: Tensor, num_feats: int = 128, *, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine encoding of normalised points, the same frequencies as ``SinePositionEncoding`` on a map.

    ``points (..., 2)`` (x, y) in [0, 1] → ``(..., 2*num_feats)`` ordered (y, x) like the feature-map encoding, so
    a query at a point and the map cell there get matching position channels (Conditional DETR's spatial query).
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=points.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = points[..., None].float() * (2 * math.pi) / dim_t  # (..., 2, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # (..., 2, F)
    return torch.cat((pos[..., 1, :], pos[..., 0, :]), dim=-1).to(points.dtype)


def build_position_encoding(
    kind: str, hidden_dim: int, *, temperature: float = 10000.0, offset: float = 0.0
) -> nn.Module:
    """``offset`` (sine only): -0.5 encodes cell centres, as Deformable DETR."""
    if kind == "sine":
        return SinePositionEncoding(hidden_dim // 2, temperature=temperature, normalize=True, offset=offset)
    if kind == "learned":
        return LearnedPositionEncoding(hidden_dim // 2)
    raise ValueError(f"unknown position encoding {kind!r}: use 'sine' or 'learned'")
