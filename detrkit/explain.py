"""Where a detector looks: attention and sampling maps recomputed explicitly, on request.

Attention runs through ``scaled_dot_product_attention`` (and deformable attention through a compiled kernel), so
the normal forward never materialises attention weights. :func:`explain` runs the model once on one image with
temporary forward hooks that record the inputs of the attention modules of interest, removes them, and recomputes
the weights from those inputs with plain matrix products; it also recomputes each module's output from its
weights and records the largest difference from what the module returned (``Explanation.max_error``), so the maps
are checked to be the ones the model used. Nothing is registered on a model outside a call: the fast path is
untouched.

What is explained, per architecture:
- DETR and Conditional DETR: the decoder cross-attention of each chosen detection over the feature map (the DETR
  paper's Fig. 6), and the encoder self-attention at chosen pixels (Fig. 3);
- Deformable DETR: each detection's sampling points in the decoder's cross-attention, on every level, with their
  attention weights;
- YOLOS: the detection tokens' attention over the patch tokens in the last block.

Legend: k chosen detections, n chosen pixels, nh heads, h×w the valid cells of the map (stride ``stride`` pixels
of the resized input), L levels, P points per head and level, Q queries, S key tokens.

Layer: evaluation and pictures (beside ``evaluation`` and ``visualize``, importing neither; ``visualize`` draws an
``Explanation`` without importing this module). Imports ``models``, ``images`` and ``transforms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .images import load_image_tensor, pad_batch
from .models.base import Detections, Detector
from .models.deformable_attention import MultiScaleDeformableAttention, ms_deform_attn_reference
from .models.layers import Attention
from .transforms import eval_transforms

ARCHITECTURES = ("detr", "conditional_detr", "deformable_detr", "yolos")


@dataclass
class Explanation:
    """Attention or sampling maps of one image.

    Attributes:
        arch: the model's architecture.
        image: ``(3,H,W)`` float in [0, 1], the original image.
        input_size: ``(h_in, w_in)`` the resized image the model saw (unpadded).
        detections: the k chosen detections (boxes in original pixels), highest score first.
        queries: ``(k,)`` the query (or detection token) index of each detection.
        decoder_attention: DETR, Conditional DETR: ``(k, nh, h, w)`` each detection's cross-attention over the
            valid cells of the feature map in the chosen decoder layer (each head's weights sum to 1 over the
            whole map); YOLOS: the detection token's attention over the valid patches (the share it gives the
            patches; [CLS] and detection tokens take the rest). None for Deformable DETR.
        stride: pixels of the resized input per cell of those maps (the backbone stride, or the patch size).
        pixels: ``(n, 2)`` the (x, y) original-image pixels whose encoder self-attention is in
            ``encoder_attention`` ``(n, nh, h, w)`` (DETR, Conditional DETR; None otherwise).
        sampling_points: Deformable DETR: ``(k, nh, L, P, 2)`` the (x, y) original-image pixels each detection's
            query samples in the chosen decoder layer, and ``sampling_weights (k, nh, L, P)`` their attention
            weights (a softmax over L·P per head).
        level_shapes: Deformable DETR: the ``(h_l, w_l)`` of each level (of the padded input).
        layer: the decoder layer (or YOLOS block) explained, counted from 0.
        max_error: the largest absolute difference between the modules' outputs and their explicit
            recomputation from these weights.
    """

    arch: str
    image: Tensor
    input_size: tuple[int, int]
    detections: Detections
    queries: Tensor
    layer: int
    decoder_attention: Tensor | None = None
    stride: int = 1
    pixels: Tensor | None = None
    encoder_attention: Tensor | None = None
    sampling_points: Tensor | None = None
    sampling_weights: Tensor | None = None
    level_shapes: list[tuple[int, int]] = field(default_factory=list)
    max_error: float = 0.0

    @property
    def orig_size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    def to_image(self, cell_map: Tensor) -> Tensor:
        """A map over cells ``(..., h, w)`` → the original image's pixels ``(..., H, W)`` (bilinear)."""
        lead = cell_map.shape[:-2]
        x = cell_map.reshape(-1, 1, *cell_map.shape[-2:]).float()
        x = F.interpolate(x, scale_factor=self.stride, mode="bilinear", align_corners=False)
        x = x[..., : self.input_size[0], : self.input_size[1]]  # the last cells may overhang the image
        x = F.interpolate(x, size=self.orig_size, mode="bilinear", align_corners=False)
        return x.reshape(*lead, *self.orig_size)


@torch.no_grad()
def explain(
    model: Detector,
    image: Any,
    *,
    top_k: int = 5,
    threshold: float = 0.0,
    pixels: Tensor | list[tuple[float, float]] | None = None,
    layer: int = -1,
    size: int | None = None,
    max_size: int | None = None,
) -> Explanation:
    """Attention or sampling maps of ``model`` on ``image`` (anything ``predict`` accepts).

    Args:
        top_k: explain the ``top_k`` highest-scoring queries (at most), ...
        threshold: ... with a score of at least ``threshold``.
        pixels: (x, y) original-image pixels whose encoder self-attention to return (DETR, Conditional DETR); by
            default the centres of the chosen detections.
        layer: which decoder layer (YOLOS: block) to explain; -1 the last, whose output makes the predictions.
        size, max_size: the resize, as ``predict`` (default: the model's).

    Returns an :class:`Explanation`; its tensors are on the CPU.
    """
    arch = model.config.arch
    if arch not in ARCHITECTURES:
        raise ValueError(f"explain knows the architectures {ARCHITECTURES}, not {arch!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    device = next(model.parameters()).device
    img = load_image_tensor(image)
    resized = eval_transforms(size=size or model.config.image_size, max_size=max_size or model.config.max_size)(img)
    resized = resized.as_subclass(Tensor)
    pixel_values, padding_mask = pad_batch([resized])  # (1, 3, H, W), (1, H, W)
    modules = _modules_to_record(model, arch, layer)
    records: dict[str, dict[str, Any]] = {}
    handles = [
        module.register_forward_hook(_recorder(records, name), with_kwargs=True) for name, module in modules.items()
    ]
    was_training = model.training
    model.eval()
    try:
        outputs = model(pixel_values.to(device), padding_mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    queries, detections = _choose(model, outputs, img.shape[-2:], top_k, threshold)
    layer_index = _layer_index(model, arch, layer)
    exp = Explanation(
        arch=arch,
        image=img,
        input_size=(int(resized.shape[1]), int(resized.shape[2])),
        detections=detections,
        queries=queries.cpu(),
        layer=layer_index,
    )
    scale = torch.tensor([img.shape[2] / resized.shape[2], img.shape[1] / resized.shape[1]])  # (x, y) orig / input
    if arch in ("detr", "conditional_detr"):
        _explain_single_scale(exp, model, records, queries, pixels, scale)
    elif arch == "deformable_detr":
        _explain_deformable(exp, model, records, queries, pixel_values.shape[-2:], scale)
    else:
        _explain_yolos(exp, model, records, queries, pixel_values.shape[-2:])
    return exp


# -- recording ------------------------------------------------------------------------------------------------
def _modules_to_record(model: nn.Module, arch: str, layer: int) -> dict[str, nn.Module]:
    if arch in ("detr", "conditional_detr"):
        t = model.transformer
        return {
            "input_proj": model.input_proj,
            "decoder": _pick(t.decoder, layer).cross_attn,
            "encoder": t.encoder[-1].self_attn,
        }
    if arch == "deformable_detr":
        return {"decoder": _pick(model.decoder.layers, layer).cross_attn}
    return {"block": _pick(model.backbone.blocks, layer).attn}


def _pick(layers: nn.ModuleList, layer: int) -> nn.Module:
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} does not exist: the model has {len(layers)} (use 0..{len(layers) - 1} or -1)")
    return layers[layer]


def _layer_index(model: nn.Module, arch: str, layer: int) -> int:
    if arch in ("detr", "conditional_detr"):
        n = len(model.transformer.decoder)
    elif arch == "deformable_detr":
        n = len(model.decoder.layers)
    else:
        n = len(model.backbone.blocks)
    return layer % n


def _recorder(records: dict[str, dict[str, Any]], name: str):
    def hook(module, args, kwargs, output):
        records[name] = {"module": module, "args": args, "kwargs": kwargs, "output": output}

    return hook


def _arg(record: dict[str, Any], index: int, name: str) -> Any:
    args, kwargs = record["args"], record["kwargs"]
    return args[index] if len(args) > index else kwargs.get(name)


# -- choosing detections --------------------------------------------------------------------------------------
def _choose(
    model: Detector, outputs: dict, orig_size: tuple[int, int], top_k: int, threshold: float
) -> tuple[Tensor, Detections]:
    """The top-k queries by score (each query once, with its best class) and their detections."""
    logits = outputs["pred_logits"][0].float()  # (Q, C)
    prob = logits.sigmoid() if model.config.focal else logits.softmax(-1)[:, :-1]
    scores, labels = prob.max(-1)  # (Q,)
    order = scores.argsort(descending=True)[:top_k]
    order = order[scores[order] >= threshold]
    h, w = orig_size
    cx, cy, bw, bh = outputs["pred_boxes"][0][order].float().unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * torch.tensor(
        [w, h, w, h], dtype=torch.float32, device=cx.device
    )
    lm = model.label_map
    category_ids = torch.tensor([lm.category_ids[i] for i in labels[order].tolist()], dtype=torch.long)
    names = [lm.names[i] for i in labels[order].tolist()]
    return order, Detections(boxes.cpu(), scores[order].cpu(), category_ids, names)


# -- explicit attention ---------------------------------------------------------------------------------------
def attention_weights(
    module: Attention,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """The weights ``(B, nh, T, S)`` that ``module`` (a ``layers.Attention``) computes for ``query (B,T,D)`` and
    ``key (B,S,D)``: softmax(q·kᵀ/√hd) over the keys not masked (``key_padding_mask (B,S)`` True on padding,
    ``attn_mask (B,1,T,S)`` True where a query may attend)."""
    b, t, d = query.shape
    nh = module.num_heads
    q = module.q_proj(query).view(b, t, nh, d // nh).transpose(1, 2)  # (B, nh, T, hd)
    k = module.k_proj(key).view(b, key.shape[1], nh, d // nh).transpose(1, 2)  # (B, nh, S, hd)
    return _softmax_weights(q, k, key_padding_mask, attn_mask)


def _softmax_weights(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None = None) -> Tensor:
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    return logits.softmax(-1)


def _attend(weights: Tensor, v: Tensor, out_proj: nn.Linear) -> Tensor:
    """``weights (B,nh,T,S)`` over ``v (B,nh,S,hd)`` through ``out_proj`` → ``(B,T,D)``."""
    b, nh, t, _ = weights.shape
    return out_proj((weights @ v).transpose(1, 2).reshape(b, t, nh * v.shape[-1]))


def _values(module: nn.Module, proj: nn.Linear, value: Tensor) -> Tensor:
    b, s, d = value.shape
    return proj(value).view(b, s, module.num_heads, d // module.num_heads).transpose(1, 2)  # (B, nh, S, hd)


def _plain_attention(record: dict[str, Any]) -> tuple[Tensor, float]:
    """A ``layers.Attention`` call's weights ``(B,nh,T,S)`` and the error of the output recomputed from them."""
    module = record["module"]
    query, key, value = (_arg(record, i, n) for i, n in enumerate(("query", "key", "value")))
    weights = attention_weights(module, query, key, _arg(record, 3, "key_padding_mask"), _arg(record, 4, "attn_mask"))
    out = _attend(weights, _values(module, module.v_proj, value), module.out_proj)
    return weights, float((out - record["output"]).detach().abs().max())


def _conditional_cross_attention(record: dict[str, Any]) -> tuple[Tensor, float]:
    """``ConditionalCrossAttention``'s weights ``(B,nh,Q,S)``: per head, [content, spatial] queries against
    [content, position] keys, scaled by 1/√(2·hd) (as its forward), and the output's recomputation error."""
    m = record["module"]
    tgt, query_pos, query_sine, memory, pos, mask = (
        _arg(record, i, n) for i, n in enumerate(("tgt", "query_pos", "query_sine", "memory", "pos", "padding_mask"))
    )
    b, q, d = tgt.shape
    s, nh = memory.shape[1], m.num_heads
    hd = d // nh
    q_content, k_content, k_pos = m.q_content(tgt), m.k_content(memory), m.k_pos(pos)
    if m.q_pos is not None:
        q_content = q_content + m.q_pos(query_pos)
        k_content = k_content + k_pos
    qs = torch.cat([q_content.view(b, q, nh, hd), m.q_pos_sine(query_sine).view(b, q, nh, hd)], -1).transpose(1, 2)
    ks = torch.cat([k_content.view(b, s, nh, hd), k_pos.view(b, s, nh, hd)], -1).transpose(1, 2)  # (B, nh, S, 2hd)
    weights = _softmax_weights(qs, ks, mask)  # (B, nh, Q, S)
    out = _attend(weights, _values(m, m.v, memory), m.out_proj)
    return weights, float((out - record["output"]).detach().abs().max())


def _deformable_sampling(record: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, float]:
    """A ``MultiScaleDeformableAttention`` call's sampling locations ``(B,Q,nh,L,P,2)`` (normalised to each padded
    level map), weights ``(B,Q,nh,L,P)``, its ``spatial_shapes`` and the output's recomputation error (through
    the ``grid_sample`` reference)."""
    m: MultiScaleDeformableAttention = record["module"]
    query, reference, value, shapes, mask = (
        _arg(record, i, n)
        for i, n in enumerate(("query", "reference_points", "value", "spatial_shapes", "padding_mask"))
    )
    b, q, _ = query.shape
    nh, n_levels, n_points = m.num_heads, m.n_levels, m.n_points
    v = m.value_proj(value)
    if mask is not None:
        v = v.masked_fill(mask[..., None], 0.0)
    v = v.view(b, value.shape[1], nh, m.dim // nh)  # (B, S, nh, hd)
    offsets = m.sampling_offsets(query).view(b, q, nh, n_levels, n_points, 2)
    weights = m.attention_weights(query).view(b, q, nh, n_levels * n_points).softmax(-1)
    weights = weights.view(b, q, nh, n_levels, n_points)  # (B, Q, nh, L, P)
    if reference.shape[-1] == 2:  # offsets in cells of each level (as the module's forward)
        normalizer = shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (w, h)
        locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:  # offsets relative to the reference box
        locations = reference[:, :, None, :, None, :2] + offsets / n_points * reference[:, :, None, :, None, 2:] * 0.5
    out = m.output_proj(ms_deform_attn_reference(v, shapes, locations, weights))
    return locations, weights, shapes, float((out - record["output"]).detach().abs().max())


# -- per architecture -----------------------------------------------------------------------------------------
def _explain_single_scale(
    exp: Explanation, model: nn.Module, records: dict, queries: Tensor, pixels: Any, scale: Tensor
) -> None:
    feature = records["input_proj"]["output"]  # (1, D, hf, wf) of the padded input
    hf, wf = feature.shape[-2:]
    mask = _arg(records["encoder"], 3, "key_padding_mask")  # (1, S) or None
    valid = torch.ones(hf, wf, dtype=torch.bool) if mask is None else ~mask[0].view(hf, wf).cpu()
    vh, vw = int(valid.any(1).sum()), int(valid.any(0).sum())  # the image's cells sit top-left
    exp.stride = int(model.backbone.level_strides[-1])
    if exp.arch == "detr":
        weights, err_dec = _plain_attention(records["decoder"])
    else:
        weights, err_dec = _conditional_cross_attention(records["decoder"])
    exp.decoder_attention = weights[0][:, queries].transpose(0, 1).reshape(len(queries), -1, hf, wf)[..., :vh, :vw]
    exp.decoder_attention = exp.decoder_attention.cpu()  # (k, nh, h, w)
    enc, err_enc = _plain_attention(records["encoder"])  # (1, nh, S, S)
    if pixels is None:
        boxes = exp.detections.boxes
        pixels = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
        pixels = pixels.clamp(min=0).minimum(torch.tensor(exp.orig_size[::-1]) - 1)
        pixels = torch.unique(pixels.round(), dim=0, sorted=False)  # detections of one object share a centre
    pixels = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 2)
    h, w = exp.orig_size
    if len(pixels) and not bool(((pixels >= 0) & (pixels < torch.tensor([w, h]))).all()):
        raise ValueError(f"pixels must lie inside the {w}x{h} image (x, y), got {pixels.tolist()}")
    cells = (pixels / scale / exp.stride).floor().long()  # (n, 2) (col, row) in the map
    cols, rows = cells[:, 0].clamp(max=vw - 1), cells[:, 1].clamp(max=vh - 1)
    rows_of_s = (rows * wf + cols).to(enc.device)
    exp.pixels = pixels
    exp.encoder_attention = enc[0][:, rows_of_s].transpose(0, 1).reshape(len(pixels), -1, hf, wf)[..., :vh, :vw]
    exp.encoder_attention = exp.encoder_attention.cpu()  # (n, nh, h, w)
    exp.max_error = max(err_dec, err_enc)


def _explain_deformable(
    exp: Explanation, model: nn.Module, records: dict, queries: Tensor, padded: tuple[int, int], scale: Tensor
) -> None:
    locations, weights, shapes, err = _deformable_sampling(records["decoder"])
    level_shapes = [(int(h), int(w)) for h, w in shapes.tolist()]
    strides = list(model.backbone.level_strides[-model.num_backbone_levels :])
    while len(strides) < len(level_shapes):  # the extra levels are stride-2 convolutions of the previous one
        strides.append(strides[-1] * 2)
    # a normalised location covers the level's whole padded map: w_l cells of stride_l pixels
    extent = torch.tensor([[w * s, h * s] for (h, w), s in zip(level_shapes, strides, strict=True)])  # (L, 2)
    points = locations[0][queries].cpu() * extent[None, None, :, None, :] * scale  # (k, nh, L, P, 2)
    exp.sampling_points = points
    exp.sampling_weights = weights[0][queries].cpu()
    exp.level_shapes = level_shapes
    exp.max_error = err


def _explain_yolos(exp: Explanation, model: nn.Module, records: dict, queries: Tensor, padded: tuple[int, int]) -> None:
    weights, err = _plain_attention(records["block"])  # (1, nh, S, S)
    vit = model.backbone
    p = vit.patch_size
    gh, gw = padded[0] // p, padded[1] // p
    g = gh * gw
    mask = _arg(records["block"], 3, "key_padding_mask")
    if mask is None:
        vh, vw = gh, gw
    else:
        valid = ~mask[0, 1 : 1 + g].view(gh, gw).cpu()
        vh, vw = int(valid.any(1).sum()), int(valid.any(0).sum())
    rows = (1 + g + queries).to(weights.device)  # the detection tokens come after [CLS] and the patches
    maps = weights[0][:, rows, 1 : 1 + g].transpose(0, 1).reshape(len(queries), -1, gh, gw)
    exp.decoder_attention = maps[..., :vh, :vw].cpu()  # (k, nh, h, w)
    exp.stride = p
    exp.max_error = err
