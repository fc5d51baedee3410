"""YOLOS: You Only Look at One Sequence (Fang et al., NeurIPS 2021).

A plain ViT (DeiT) reads one sequence, [CLS] + the image's patch tokens + Q learned detection tokens, and the
detection tokens' final states go through DETR's class and box heads; training is DETR's set prediction (the
shared matcher and criterion). There is no decoder, no CNN and no auxiliary output.

Legend: B batch, H×W padded input, p patch size, h×w the patch grid (H//p × W//p), G = h·w patch tokens, Q detection
tokens, S = 1 + G + Q sequence length, K classes (the class head has K+1 outputs, the last is no-object), D width,
L blocks, n a stack of position-embedding tables (1, or L-1 mid-layer ones), g_h×g_w the pre-training grid.

Position embeddings are learned for the pre-training grid (``pretrain_image_size // p``) and resized (bicubic)
to the grid of each input, as the paper (Sec. 2.1) and transformers do; the [CLS] and detection-token entries are
never resized.

Padding (``vit_padding``):
    ``"ignore"``: transformers' and the official code's behaviour. Padded patches are image content: the grid is
    the padded input's and every token attends to them, so an image's detections depend on how much padding its
    batch adds.
    ``"mask"`` (default): a patch is padding when all its pixels are. Padded patches are masked out of attention
    as keys, and the patch position embeddings are resized to each image's own (unpadded) grid and placed at its
    top-left corner (images sit top-left in a padded batch, as ``collate`` puts them). Every token an image's
    detection tokens see is then what it would be for the image alone, so outputs do not depend on the batch
    (when padded sizes are multiples of the patch size, as ``collate``'s multiples of 32 are for 16-pixel
    patches: otherwise the patch convolution's truncation depends on the batch). Without padding the two modes
    compute the same thing.

Boxes: in both modes ``pred_boxes`` are normalised to the unpadded image, the frame detrkit's targets use.
Under ``"mask"`` the model sees that frame (to the last, partly padded, patch); under ``"ignore"`` it learns it
from the training targets, as the official YOLOS (and so transformers' checkpoints) did.

Layer: models (one architecture). May import config, the building blocks and ``models`` base modules (``base``,
``layers``, ``registry``), never a sibling architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import exporting
from ..config import ModelConfig
from .base import Detector
from .layers import MLP, Attention
from .registry import Architecture

# transformers' YolosConfig.layer_norm_eps; the official code (timm) uses 1e-6, a relative difference of ~5e-7
# for unit-variance activations. 1e-12 makes converted checkpoints match transformers exactly.
LAYER_NORM_EPS = 1e-12


class ViTMLP(nn.Module):
    """ViT's MLP block: linear → GELU → dropout → linear (keys ``fc1``/``fc2``, timm's; DETR's ReLU block is
    ``layers.FFN``)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block of ViT/DeiT: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, dropout=attention_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = ViTMLP(dim, ffn_dim, activation_dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``x (B,S,D)``, ``key_padding_mask (B,S)`` True on tokens nobody may attend to → ``(B,S,D)``."""
        h = self.norm1(x)
        x = x + self.dropout1(self.attn(h, h, h, key_padding_mask))
        return x + self.dropout2(self.mlp(self.norm2(x)))


def resize_patch_embeddings(patch_pos: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Resize the patch part of position-embedding tables from ``grid`` to ``size`` (bicubic, as transformers'
    ``InterpolateInitialPositionEmbeddings``: ``align_corners=False``, no antialiasing).

    Args: ``patch_pos (n, g_h·g_w, D)`` row-major over the grid. Returns ``(n, size_h·size_w, D)``.
    """
    if not exporting() and tuple(size) == tuple(grid):
        return patch_pos  # bicubic at scale 1 is the identity (a graph must resize whatever size comes)
    n, _, d = patch_pos.shape
    x = patch_pos.transpose(1, 2).reshape(n, d, *grid)  # (n, D, g_h, g_w)
    x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)  # (n, D, h, w)
    return x.flatten(2).transpose(1, 2)  # (n, h·w, D)


class VisionTransformer(nn.Module):
    """DeiT-style ViT with detection tokens: patch embedding, [CLS] + patches + ``num_det_tokens`` tokens, learned
    position embeddings resized to the input (and, optionally, mid-layer ones before every block but the first),
    pre-norm blocks and a final LayerNorm. Parameter names follow timm's ViT (``cls_token``, ``pos_embed``,
    ``patch_embed``, ``blocks.N.{norm1,attn,norm2,mlp}``, ``norm``), so DeiT checkpoints map one to one.

    ``forward`` returns the final states of the detection tokens.
    """

    def __init__(
        self,
        *,
        dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        ffn_dim: int = 768,
        patch_size: int = 16,
        pretrain_image_size: tuple[int, int] = (800, 1333),
        num_det_tokens: int = 100,
        mid_position_embeddings: bool = False,
        padding: str = "mask",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if padding not in ("mask", "ignore"):
            raise ValueError(f"padding must be 'mask' or 'ignore', got {padding!r}")
        self.patch_size = patch_size
        self.grid = (pretrain_image_size[0] // patch_size, pretrain_image_size[1] // patch_size)  # (g_h, g_w)
        if min(self.grid) < 1:
            raise ValueError(f"pretrain_image_size {pretrain_image_size} is smaller than one {patch_size}px patch")
        self.num_det_tokens = num_det_tokens
        self.padding = padding
        seq = 1 + self.grid[0] * self.grid[1] + num_det_tokens
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.det_token = nn.Parameter(torch.zeros(1, num_det_tokens, dim))
        # One table for [CLS], the g_h·g_w patches and the detection tokens, in sequence order (timm's and
        # transformers' layout); mid-layer tables have the same layout, one per block after the first.
        self.pos_embed = nn.Parameter(torch.zeros(1, seq, dim))
        self.mid_pos_embed = nn.Parameter(torch.zeros(depth - 1, seq, dim)) if mid_position_embeddings else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                ffn_dim,
                dropout=dropout,
                attention_dropout=attention_dropout,
                activation_dropout=activation_dropout,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # DeiT's initialisation (truncated normal, std 0.02), which YOLOS keeps for its new tokens and tables.
        for p in (self.cls_token, self.det_token, self.pos_embed, self.mid_pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, pixel_values: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Args: ``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` True on padding, or None.

        Returns ``(B,Q,D)``: the detection tokens after the final LayerNorm.
        """
        x = self.patch_embed(pixel_values)  # (B, D, h, w)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, G, D)
        sizes, key_padding = self._valid_grids(padding_mask, (h, w))
        pos = self._position_embeddings(self.pos_embed, (h, w), sizes)  # (1, 1|B, S, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x, self.det_token.expand(b, -1, -1)], dim=1)  # (B, S, D)
        x = self.dropout(x + pos[0])
        mid = None
        if self.mid_pos_embed is not None:
            mid = self._position_embeddings(self.mid_pos_embed, (h, w), sizes)  # (L-1, 1|B, S, D)
        for i, block in enumerate(self.blocks):
            if mid is not None and i > 0:
                x = x + mid[i - 1]
            x = block(x, key_padding)
        return self.norm(x[:, -self.num_det_tokens :])  # (B, Q, D); LayerNorm is per token

    def _valid_grids(self, padding_mask: Tensor | None, grid: tuple[int, int]) -> tuple[Tensor | None, Tensor | None]:
        """Each image's unpadded patch grid ``(B, 2)`` [h_i, w_i] and the attention key mask ``(B, S)``, or
        ``(None, None)`` when padding is ignored or every image fills the grid."""
        if self.padding == "ignore" or padding_mask is None:
            return None, None
        h, w = grid
        p = self.patch_size
        b = padding_mask.shape[0]
        valid = ~padding_mask[:, : h * p, : w * p]  # (B, h·p, w·p); the patch convolution drops the rest
        patch_valid = valid.reshape(b, h, p, w, p).any(dim=4).any(dim=2)  # (B, h, w) padding iff all pixels are
        sizes = torch.stack([patch_valid.any(dim=2).sum(dim=1), patch_valid.any(dim=1).sum(dim=1)], dim=1)  # (B, 2)
        if not exporting() and bool((sizes == sizes.new_tensor([h, w])).all()):
            return None, None
        device = padding_mask.device
        rows = torch.arange(h, device=device) < sizes[:, :1]  # (B, h)
        cols = torch.arange(w, device=device) < sizes[:, 1:]  # (B, w)
        patch_padding = ~(rows[:, :, None] & cols[:, None, :]).flatten(1)  # (B, G)
        tokens = patch_padding.new_zeros(b, 1), patch_padding, patch_padding.new_zeros(b, self.num_det_tokens)
        return sizes, torch.cat(tokens, dim=1)  # (B, 2), (B, S)

    def _position_embeddings(self, table: Tensor, grid: tuple[int, int], sizes: Tensor | None) -> Tensor:
        """Position embeddings for an ``h×w`` input grid: ``table (n, S0, D)`` → ``(n, 1, S, D)``, or
        ``(n, B, S, D)`` when ``sizes (B, 2)`` gives per-image unpadded grids (zeros on padded patches)."""
        g = self.grid[0] * self.grid[1]
        cls, patch, det = table[:, :1], table[:, 1 : 1 + g], table[:, 1 + g :]  # (n,1,D), (n,g,D), (n,Q,D)
        if sizes is None:
            patch = resize_patch_embeddings(patch, self.grid, grid)  # (n, G, D)
            return torch.cat([cls, patch, det], dim=1)[:, None]  # (n, 1, S, D)
        n, d = table.shape[0], table.shape[-1]
        b = sizes.shape[0]
        if exporting():
            # A graph cannot loop over the distinct sizes a batch will hold: the same resize, per image, as
            # matrix products with bicubic weights computed from its size (equal up to float rounding).
            rows = bicubic_resize_matrix(grid[0], self.grid[0], sizes[:, 0])  # (B, h, g_h)
            cols = bicubic_resize_matrix(grid[1], self.grid[1], sizes[:, 1])  # (B, w, g_w)
            patch = patch.reshape(n, self.grid[0], self.grid[1], d)  # (n, g_h, g_w, D)
            canvas = torch.einsum("bhy,nyxd,bwx->nbhwd", rows.to(table.dtype), patch, cols.to(table.dtype))
        else:
            canvas = self._resized_canvas(patch, grid, sizes)  # (n, B, h, w, D)
        patch = canvas.flatten(2, 3)  # (n, B, G, D)
        return torch.cat([cls[:, None].expand(n, b, 1, d), patch, det[:, None].expand(n, b, -1, d)], dim=2)

    def _resized_canvas(self, patch: Tensor, grid: tuple[int, int], sizes: Tensor) -> Tensor:
        """``patch (n, g_h·g_w, D)`` resized to each image's grid ``sizes (B, 2)``, at the top-left of an ``h×w``
        canvas of zeros → ``(n, B, h, w, D)``."""
        n, d = patch.shape[0], patch.shape[-1]
        b = sizes.shape[0]
        canvas = patch.new_zeros(n, b, grid[0], grid[1], d)  # (n, B, h, w, D)
        # One resize per distinct image size in the batch (usually one or two), not one per image.
        for hi, wi in torch.unique(sizes, dim=0).tolist():
            if hi == 0 or wi == 0:
                continue  # an image of padding only: nothing to place
            index = ((sizes[:, 0] == hi) & (sizes[:, 1] == wi)).nonzero().flatten()
            resized = resize_patch_embeddings(patch, self.grid, (hi, wi))  # (n, hi·wi, D)
            canvas[:, index, :hi, :wi] = resized.reshape(n, 1, hi, wi, d)
        return canvas


def bicubic_resize_matrix(out_len: int, in_len: int, sizes: Tensor) -> Tensor:
    """The matrix ``M (B, out_len, in_len)`` with ``M[b] @ x`` = ``F.interpolate(x, sizes[b], mode="bicubic",
    align_corners=False)`` along one axis, zero-padded to ``out_len`` rows: PyTorch's upsample_bicubic2d weights
    (A = -0.75, source index ``(o + 0.5)·in/size - 0.5``, taps clamped at the borders). ``sizes (B,)`` integers."""
    a = -0.75
    size = sizes.to(torch.float32)[:, None]  # (B, 1)
    o = torch.arange(out_len, device=sizes.device, dtype=torch.float32)[None]  # (1, out_len)
    real = (in_len / size.clamp(min=1)) * (o + 0.5) - 0.5  # (B, out_len)
    first = real.floor()
    t = real - first
    u = 1 - t
    coeffs = torch.stack(  # (B, out_len, 4): taps first-1 .. first+2
        [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * u - (a + 3)) * u * u + 1,
            ((a * (u + 1) - 5 * a) * (u + 1) + 8 * a) * (u + 1) - 4 * a,
        ],
        dim=-1,
    )
    taps = (first[..., None] + torch.arange(-1, 3, device=sizes.device)).clamp(0, in_len - 1)  # (B, out_len, 4)
    onehot = taps[..., None] == torch.arange(in_len, device=sizes.device)  # (B, out_len, 4, in_len)
    matrix = (coeffs[..., None] * onehot).sum(2)  # (B, out_len, in_len)
    return matrix * (o < size)[..., None]  # rows beyond an image's size are padding


class YOLOS(Detector):
    """YOLOS: a ViT over [CLS] + patch tokens + ``num_queries`` detection tokens, DETR's heads on the detection
    tokens.

    Forward: ``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` True on padding (or None) → dict with
    ``pred_logits (B,Q,K+1)`` (``(B,Q,K)`` with ``class_loss="focal"``) and ``pred_boxes (B,Q,4)`` (normalised
    cx, cy, w, h of the unpadded image). No ``aux_outputs``: YOLOS has a single prediction stage, whatever
    ``config.aux_loss`` says.

    Config: ``hidden_dim``, ``num_heads``, ``enc_layers`` (ViT depth), ``ffn_dim`` (MLP width),
    ``num_queries`` (detection tokens), ``patch_size``, ``pretrain_image_size``, ``mid_position_embeddings``,
    ``vit_padding`` (see the module docstring) and ``backbone_weights``: a DeiT/ViT ImageNet checkpoint (timm or
    transformers layout, file or folder) to initialise the ViT from, read by ``detrkit.build`` and the engine
    (``convert.yolos.init_vit_from_checkpoint``), never by the constructor.
    The ViT is ``self.backbone``, so it trains at ``train.lr_backbone`` (YOLOS uses one rate for everything).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        self.backbone = VisionTransformer(
            dim=c.hidden_dim,
            depth=c.enc_layers,
            num_heads=c.num_heads,
            ffn_dim=c.ffn_dim,
            patch_size=c.patch_size,
            pretrain_image_size=c.pretrain_image_size,
            num_det_tokens=c.num_queries,
            mid_position_embeddings=c.mid_position_embeddings,
            padding=c.vit_padding,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            activation_dropout=c.activation_dropout,
        )
        self.class_embed = MLP(c.hidden_dim, c.hidden_dim, c.num_classes if c.focal else c.num_classes + 1, 3)
        if c.focal:
            nn.init.constant_(self.class_embed.layers[-1].bias, -math.log((1 - 0.01) / 0.01))
        self.bbox_embed = MLP(c.hidden_dim, c.hidden_dim, 4, 3)

    def forward(self, pixel_values: Tensor, padding_mask: Tensor | None = None) -> dict:
        self._check_inputs(pixel_values, padding_mask)
        hs = self.backbone(pixel_values, padding_mask)  # (B, Q, D)
        return {"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid()}


def _check_yolos(config: ModelConfig) -> None:
    if config.backbone != "vit":
        raise ValueError(f"arch 'yolos' is a ViT: set backbone to 'vit' (got {config.backbone!r})")
    if config.vit_padding not in ("mask", "ignore"):
        raise ValueError(f"vit_padding must be 'mask' or 'ignore', got {config.vit_padding!r}")
    if config.enc_layers < 1:
        raise ValueError("YOLOS needs at least one ViT block (enc_layers ≥ 1)")


ARCHITECTURE = Architecture(
    name="yolos",
    model=YOLOS,
    fields=("patch_size", "pretrain_image_size", "mid_position_embeddings", "vit_padding"),
    shape_fields=("patch_size", "pretrain_image_size", "mid_position_embeddings"),
    defaults={"backbone": "vit"},
    check=_check_yolos,
)
