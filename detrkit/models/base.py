"""What every detector shares: its config and label map, output packing, `predict` and `save_pretrained`.

Layer: models. May import ``config``, ``files`` and the building blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..files import save_pretrained
from ..images import load_image_tensor, pad_batch
from ..kernels import cpu_info
from ..labels import LabelMap
from ..postprocess import postprocess, postprocess_instances, postprocess_panoptic
from ..transforms import eval_transforms


@dataclass
class Detections:
    """One image's detections: ``boxes (n,4)`` absolute (x1, y1, x2, y2) pixels of the original image,
    ``scores (n,)``, ``labels (n,)`` dataset category ids and their ``names``; sorted by score, highest first."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    masks: Tensor | None = None  # (n, H, W) bool at the original image size, for models with a mask head

    def __len__(self) -> int:
        return len(self.scores)

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready: one dict per box with ``box`` [x1, y1, x2, y2], ``score``, ``label`` and ``name``."""
        return [
            {
                "box": [round(float(v), 2) for v in box],
                "score": round(float(s), 4),
                "label": int(lbl),
                "name": n,
            }
            for box, s, lbl, n in zip(
                self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), self.names, strict=True
            )
        ]


class Detector(nn.Module):
    """Base class of detrkit models. Subclasses build their modules from ``config`` and implement ``forward``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.category_ids is not None:
            names = config.class_names or tuple(str(c) for c in config.category_ids)
            self.label_map = LabelMap(config.category_ids, names, isthing=config.class_isthing)
        else:
            default = LabelMap.default(config.num_classes)
            self.label_map = LabelMap(default.category_ids, default.names, isthing=config.class_isthing)

    # -- helpers for subclasses -------------------------------------------------------------------------------
    @staticmethod
    def _check_inputs(pixel_values: Tensor, padding_mask: Tensor | None) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        if padding_mask is not None:
            if padding_mask.shape != (pixel_values.shape[0], *pixel_values.shape[2:]):
                raise ValueError(
                    f"padding_mask must be (B, H, W) = {(pixel_values.shape[0], *pixel_values.shape[2:])}, "
                    f"got {tuple(padding_mask.shape)}"
                )
            if padding_mask.dtype != torch.bool:
                raise ValueError(f"padding_mask must be a bool tensor (True on padding), got {padding_mask.dtype}")

    def _pack_outputs(self, logits: Tensor, boxes: Tensor) -> dict[str, Any]:
        """Per-layer ``logits (L,B,Q,C)`` and ``boxes (L,B,Q,4)`` → the output dict (last layer + aux list)."""
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.config.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out

    @property
    def trains_with_targets(self) -> bool:
        """Whether ``forward`` in training mode takes ``targets=`` (denoising queries are made from them,
        ``models/denoising.py``); the training step passes them then."""
        return getattr(self, "denoising", None) is not None

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of the (non-backbone) parameter ``name``; architectures override it."""
        return 1.0

    # -- inference --------------------------------------------------------------------------------------------
    def postprocess(
        self, outputs: dict[str, Any], orig_sizes: Tensor, *, threshold: float = 0.0, top_k: int = 100
    ) -> list[dict[str, Tensor]]:
        """Model outputs → per-image ``scores``, ``labels`` (category ids) and absolute xyxy ``boxes``."""
        return postprocess(
            outputs,
            orig_sizes,
            label_map=self.label_map,
            threshold=threshold,
            top_k=top_k,
            focal=self.config.focal,
        )

    def optimize_for_inference(
        self,
        *,
        fold_batchnorm: bool = True,
        channels_last: bool = True,
        bf16: bool = False,
        compile: bool = False,
    ) -> Detector:
        """Make this model faster for inference, in place; it cannot be trained afterwards. Returns ``self``.

        Args:
            fold_batchnorm: fold the CNN backbone's BatchNorms into its convolutions (float rounding only).
            channels_last: run the CNN backbone in channels-last memory layout, which oneDNN and cuDNN convolutions
                prefer (float rounding only).
            bf16: run ``predict`` under bfloat16 autocast (CPUs with AVX-512 bf16 or AMX, and GPUs); costs accuracy:
                see the README's figures.
            compile: ``torch.compile`` the model (the first calls per input size are slow while it compiles).
        """
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        backbone = getattr(self, "backbone", None)
        if fold_batchnorm and hasattr(backbone, "fold_batchnorm"):
            backbone.fold_batchnorm()
        if channels_last and hasattr(backbone, "fold_batchnorm"):  # CNN backbones only
            backbone.to(memory_format=torch.channels_last)
            self._channels_last = True
        if bf16:
            check_half_precision(torch.bfloat16, next(self.parameters()).device, autocast=True)
        self._inference_bf16 = bf16
        if compile:
            # Kept outside the module tree: assigned as usual, the compiled wrapper (a module holding this model)
            # would be registered as a submodule, the model its own descendant: eval() and state_dict() recurse.
            object.__setattr__(self, "_compiled", torch.compile(self))
        return self

    def _inference_forward(self, pixel_values: Tensor, padding_mask: Tensor) -> dict[str, Any]:
        """``forward`` with the settings of ``optimize_for_inference`` (none by default). A model converted to half
        precision (``model.half()``, ``model.bfloat16()``) gets its input in its own dtype."""
        weight = next(self.parameters())
        if weight.is_floating_point() and pixel_values.dtype != weight.dtype:
            check_half_precision(weight.dtype, weight.device)
            pixel_values = pixel_values.to(weight.dtype)
        if getattr(self, "_channels_last", False):
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        compiled = getattr(self, "_compiled", None)
        forward = self if compiled is None else compiled  # not `or`: a compiled module refuses bool() (len())
        if getattr(self, "_inference_bf16", False):
            with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16):
                outputs = forward(pixel_values, padding_mask)
            return to_float(outputs)
        return forward(pixel_values, padding_mask)

    @torch.inference_mode()
    def predict(
        self,
        images: Any,
        threshold: float = 0.5,
        *,
        top_k: int = 100,
        size: int | None = None,
        max_size: int | None = None,
        batch_size: int = 4,
    ) -> list[Detections]:
        """Detect objects in PIL images, file paths, ``(3,H,W)`` tensors (uint8, or float in [0, 1]) or HWC uint8
        arrays; a single image or a list. Images are resized so their shorter side is ``size`` (longer side at most
        ``max_size``; both default to the model's training values), normalised and batched with padding. The EXIF
        orientation tag is ignored: boxes are in the file's stored pixel grid, as COCO's are.

        Returns one :class:`Detections` per image, boxes in the original image's pixels; with a mask head, each
        detection's binary mask at the original size too (``Detections.masks``).
        """
        single = not isinstance(images, (list, tuple))
        results: list[Detections] = []
        for outputs, orig_sizes, image_sizes in self._forward_images(images, size, max_size, batch_size):
            if "pred_masks" in outputs:
                dets = postprocess_instances(
                    outputs,
                    orig_sizes=orig_sizes,
                    image_sizes=image_sizes,
                    label_map=self.label_map,
                    threshold=threshold,
                    top_k=top_k,
                    focal=self.config.focal,
                )
            else:
                dets = self.postprocess(outputs, orig_sizes, threshold=threshold, top_k=top_k)
            for det in dets:
                names = [self.label_map.names[self.label_map.to_label(int(c))] for c in det["labels"].tolist()]
                masks = det["masks"].cpu() if "masks" in det else None
                results.append(Detections(det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu(), names, masks))
        return results[0] if single else results

    def predict_panoptic(
        self,
        images: Any,
        threshold: float | None = None,
        *,
        size: int | None = None,
        max_size: int | None = None,
        batch_size: int = 4,
    ) -> list[dict[str, Any]]:
        """Panoptic segmentation (a model with a mask head): per image ``segments (H,W)`` int32 segment ids at the
        original size (0 = void) and ``segments_info`` (``id``, ``category_id``, ``isthing``, ``score``, ``area``),
        merged by the DETR reference's rules (``postprocess.postprocess_panoptic``: queries kept above
        ``threshold``, by default ``config.panoptic_threshold``; stuff of one class merged, tiny segments dropped;
        pixels to queries by ``config.panoptic_merge``).
        Same inputs as :meth:`predict`."""
        if not self.config.masks:
            raise ValueError("predict_panoptic needs a model with a mask head (model.masks=true)")
        single = not isinstance(images, (list, tuple))
        results: list[dict[str, Any]] = []
        for outputs, orig_sizes, image_sizes in self._forward_images(images, size, max_size, batch_size):
            results += postprocess_panoptic(
                outputs,
                orig_sizes=orig_sizes,
                image_sizes=image_sizes,
                label_map=self.label_map,
                threshold=self.config.panoptic_threshold if threshold is None else threshold,
                focal=self.config.focal,
                merge=self.config.panoptic_merge,
            )
        return results[0] if single else results

    def _forward_images(self, images: Any, size: int | None, max_size: int | None, batch_size: int):
        """Yield ``(outputs, orig_sizes (b,2), image_sizes (b,2))`` per batch of ``images``, in eval mode."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            batches = preprocessed_batches(images, self.config, size, max_size, batch_size)
            for resized, orig_sizes, image_sizes in batches:
                pixel_values, padding_mask = pad_batch(resized)
                with torch.inference_mode():
                    outputs = self._inference_forward(pixel_values.to(device), padding_mask.to(device))
                yield to_float(outputs), orig_sizes.to(device), image_sizes.to(device)
        finally:
            self.train(was_training)

    # -- persistence ------------------------------------------------------------------------------------------
    def export_onnx(self, path: str | Path, **options: Any) -> Any:
        """Write this model as an ONNX graph at ``path``, checked against PyTorch in onnxruntime (refused, no file,
        when any output differs by more than 1e-4). Options and the returned ``ExportReport``:
        ``detrkit.models.export.export_onnx``."""
        from .export import export_onnx

        return export_onnx(self, path, **options)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (atomically); ``detrkit.load`` reads it."""
        return save_pretrained(self, directory)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively (x86 AVX-512 BF16 or AMX, Arm BF16), and its name and flags
    in words. Without it PyTorch emulates bf16 matrix products, several times slower than float32."""
    info = cpu_info()
    flags = info["flags"]
    native = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    detail = f"{info['model']} ({capability}; bf16 flags: {', '.join(native) or 'none'})"
    return bool(native), detail


def check_half_precision(dtype: torch.dtype, device: torch.device, *, autocast: bool = False) -> None:
    """Refuse half precision where ``device`` cannot run it (a clear error, not a kernel's), warn where it runs
    emulated (bf16 on CPUs without native bf16: correct, but slower than float32)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support: use float16 or float32")
    if device.type == "cpu" and dtype == torch.bfloat16:
        native, detail = cpu_bf16()
        if not native:
            warnings.warn(
                f"bfloat16{' autocast' if autocast else ''} on this CPU, {detail}, is emulated: expect it slower than "
                "float32 (bf16 is the fast path on CPUs with AVX-512 BF16 or AMX)",
                stacklevel=3,
            )


def preprocessed_batches(
    images: Any, config: ModelConfig, size: int | None, max_size: int | None, batch_size: int
) -> Iterator[tuple[list[Tensor], Tensor, Tensor]]:
    """``predict``'s inputs (an image or a list, as :meth:`Detector.predict` takes them) in batches of
    ``batch_size``: the resized, normalised ``(3,H,W)`` images, their ``orig_sizes (b,2)`` and the resized
    ``image_sizes (b,2)`` [h, w] (CPU). ``size``/``max_size`` default to the model's training values."""
    items: Sequence[Any] = [images] if not isinstance(images, (list, tuple)) else images
    preprocess = eval_transforms(size=size or config.image_size, max_size=max_size or config.max_size)
    for start in range(0, len(items), batch_size):
        loaded = [load_image_tensor(x) for x in items[start : start + batch_size]]
        resized = [preprocess(im).as_subclass(torch.Tensor) for im in loaded]
        orig_sizes = torch.tensor([im.shape[-2:] for im in loaded], dtype=torch.long)
        image_sizes = torch.tensor([im.shape[-2:] for im in resized], dtype=torch.long)
        yield resized, orig_sizes, image_sizes


def to_float(outputs: Any) -> Any:
    """Model outputs (tensors in dicts and lists) in float32: losses and matching run in float32."""
    if isinstance(outputs, Tensor):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [to_float(v) for v in outputs]
    return outputs
