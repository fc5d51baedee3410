"""Building blocks shared by the DETR variants: attention with separate q/k/v projections and the box MLP.

Legend: B batch, T query tokens, S key tokens, D width, nh heads, hd = D / nh.
"""

from __future__ import annotations

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

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Args: ``query (B,T,D)``, ``key (B,S,D)``, ``value (B,S,D)``, ``key_padding_mask (B,S)`` True on padding.

        Returns ``(B,T,D)``.
        """
        b, t, d = query.shape
        s = key.shape[1]
        nh = self.num_heads
        q = self.q_proj(query).view(b, t, nh, d // nh).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(key).view(b, s, nh, d // nh).transpose(1, 2)  # (B, nh, S, hd)
        v = self.v_proj(value).view(b, s, nh, d // nh).transpose(1, 2)  # (B, nh, S, hd)
        attn_mask = None
        if key_padding_mask is not None:
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
