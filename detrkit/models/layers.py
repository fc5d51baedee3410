"""Building blocks shared by the DETR variants: attention with separate q/k/v projections, the feed-forward
block, the post-norm encoder layer, the box MLP and the focal-loss prior of class heads.

Layer: building blocks. Imports torch only; every architecture may import it, it imports no architecture.

Legend: B batch, T query tokens, S key tokens, D width, nh heads, hd = D / nh.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention on ``scaled_dot_product_attention`` (fused kernels where PyTorch has them).

    Separate ``q_proj``/``k_proj``/``v_proj`` keep published checkpoints (packed ``in_proj`` or separate) a plain
    re-slicing away.
    """

    def __init__(self, dim: int, num_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Args: ``query (B,T,D)``, ``key (B,S,D)``, ``value (B,S,D)``, ``key_padding_mask (B,S)`` True on padding,
        ``attn_mask (B,1,T,S)`` True where a query may attend to a key (the training-only queries' mask,
        ``models/denoising.py``; not with ``key_padding_mask``).

        Returns ``(B,T,D)``.
        """
        b, t, d = query.shape
        s = key.shape[1]
        nh = self.num_heads
        q = self.q_proj(query).view(b, t, nh, d // nh).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(key).view(b, s, nh, d // nh).transpose(1, 2)  # (B, nh, S, hd)
        v = self.v_proj(value).view(b, s, nh, d // nh).transpose(1, 2)  # (B, nh, S, hd)
        if key_padding_mask is not None:
            if attn_mask is not None:
                raise ValueError("Attention takes key_padding_mask or attn_mask, not both")
            attn_mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S) True = attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), clamped so that box coordinates at 0 or 1 stay finite."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the DETR box head is MLP(D, D, 4, 3))."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


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
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
    ):
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout=attention_dropout)
        self.ffn = FFN(dim, ffn_dim, activation_dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``src (B,S,D)``, ``pos (B,S,D)``, ``padding_mask (B,S)`` → ``(B,S,D)``."""
        qk = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src, padding_mask)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


def init_focal_bias(class_embed: nn.Linear, prior: float = 0.01) -> None:
    """Start every sigmoid at probability ``prior`` (RetinaNet's, as Deformable and Conditional DETR): the focal
    loss would otherwise be swamped by the many easy negatives at the start."""
    nn.init.constant_(class_embed.bias, -math.log((1 - prior) / prior))
