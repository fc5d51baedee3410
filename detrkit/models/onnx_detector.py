"""``OnnxDetector``: a graph written by ``export_onnx`` run in onnxruntime, with the PyTorch model's ``predict``.

The same pre-processing (``base.preprocessed_batches``: resize, normalise, pad to multiples of 32) and the same
post-processing (``Detector.predict`` / ``predict_panoptic``, which this class borrows) as the PyTorch model, so the
detections equal it within the export's 1e-4. The model's ``ModelConfig`` (label map included) comes from the
file's metadata; no weights or PyTorch model are loaded.

Layer: models. Imports ``config``, ``labels``, ``images`` and ``models.base``; ``onnxruntime`` lazily.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..images import pad_batch
from ..labels import LabelMap
from .base import Detector, preprocessed_batches

METADATA_PREFIX = "detrkit."


class OnnxDetector:
    """Detect with an ONNX file exported by detrkit, in onnxruntime.

    Args:
        path: the ``.onnx`` file (``detrkit export``, ``model.export_onnx``).
        threads: onnxruntime's intra-op threads (default: its own choice, one per core).
        providers: onnxruntime execution providers (default: ``["CPUExecutionProvider"]``).

    ``predict`` and ``predict_panoptic`` take and return what :class:`Detector`'s do; ``__call__(pixel_values,
    padding_mask)`` returns the raw outputs as a dict of tensors, like the PyTorch model's forward.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, providers: list[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("OnnxDetector needs onnxruntime: pip install 'detrkit[onnx]'") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such ONNX file: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{self.path} is not an ONNX model onnxruntime can load: {e}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_PREFIX + "config" not in meta:
            raise ValueError(
                f"{self.path} was not exported by detrkit (no detrkit.config metadata): export it with "
                "`detrkit export WEIGHTS OUT.onnx`"
            )
        self.config = ModelConfig.from_dict(json.loads(meta[METADATA_PREFIX + "config"]))
        self.inputs = json.loads(meta[METADATA_PREFIX + "inputs"])
        self.outputs = json.loads(meta[METADATA_PREFIX + "outputs"])
        self.dynamic = json.loads(meta[METADATA_PREFIX + "dynamic"])
        self.size = tuple(json.loads(meta[METADATA_PREFIX + "size"]))
        self.size_divisibility = json.loads(meta.get(METADATA_PREFIX + "size_divisibility", "32"))
        self.fixed_batch = None if self.dynamic else self.session.get_inputs()[0].shape[0]
        c = self.config
        if c.category_ids is not None:
            names = c.class_names or tuple(str(i) for i in c.category_ids)
            self.label_map = LabelMap(c.category_ids, names, isthing=c.class_isthing)
        else:
            default = LabelMap.default(c.num_classes)
            self.label_map = LabelMap(default.category_ids, default.names, isthing=c.class_isthing)

    # The PyTorch model's inference API, on this class's _forward_images.
    predict = Detector.predict
    predict_panoptic = Detector.predict_panoptic
    postprocess = Detector.postprocess

    def __call__(
        self, pixel_values: Tensor, padding_mask: Tensor, orig_sizes: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Raw outputs for ``pixel_values (B,3,H,W)`` float32 and ``padding_mask (B,H,W)`` bool (H, W multiples of
        32, or the export size for a fixed-shape graph); ``orig_sizes (B,2)`` for a graph with post-processing."""
        feed = {"pixel_values": pixel_values.float().cpu().numpy(), "padding_mask": padding_mask.cpu().numpy()}
        if "orig_sizes" in self.inputs:
            if orig_sizes is None:
                h, w = pixel_values.shape[-2:]
                orig_sizes = torch.tensor([[h, w]] * pixel_values.shape[0])
            feed["orig_sizes"] = orig_sizes.long().cpu().numpy()
        results = self.session.run(self.outputs, feed)
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, results, strict=True)}

    # What evaluation.evaluate_model needs of a model (there is no training mode to leave).
    training = False

    def eval(self) -> OnnxDetector:
        return self

    def train(self, mode: bool = True) -> OnnxDetector:
        if mode:
            raise ValueError("an OnnxDetector is for inference only: it cannot train")
        return self

    def _inference_forward(self, pixel_values: Tensor, padding_mask: Tensor) -> dict[str, Tensor]:
        """Raw ``pred_*`` outputs of a collated batch (``Detector._inference_forward``'s contract); a fixed-shape
        graph gets the batch padded onto its canvas."""
        n = pixel_values.shape[0]
        if not self.dynamic:
            images = [pixel_values[i] for i in range(n)]
            masks = [padding_mask[i] for i in range(n)]
            pixel_values, padding_mask = self._onto_canvas(images, masks)
        return {k: v[:n] for k, v in self(pixel_values, padding_mask).items() if k.startswith("pred_")}

    def _forward_images(
        self, images: Any, size: int | None, max_size: int | None, batch_size: int
    ) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
        """As ``Detector._forward_images``: ``(outputs, orig_sizes (b,2), image_sizes (b,2))`` per batch."""
        if self.fixed_batch is not None:
            batch_size = self.fixed_batch
        for resized, orig_sizes, image_sizes in preprocessed_batches(images, self.config, size, max_size, batch_size):
            n = len(resized)
            if self.dynamic:
                pixel_values, padding_mask = pad_batch(resized, self.size_divisibility)
            else:
                masks = [torch.zeros(im.shape[-2:], dtype=torch.bool) for im in resized]
                pixel_values, padding_mask = self._onto_canvas(resized, masks)
            outputs = self(pixel_values, padding_mask)
            raw = {k: v[:n] for k, v in outputs.items() if k.startswith("pred_")}
            yield raw, orig_sizes, image_sizes

    def _onto_canvas(self, images: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(3,h,w)`` images and their ``(h,w)`` padding masks onto the fixed-shape graph's canvas, the batch filled
        up with copies of the last image (their outputs are dropped)."""
        h, w = self.size
        if len(images) > self.fixed_batch:
            raise ValueError(f"{self.path} has a fixed batch of {self.fixed_batch}, got {len(images)} images")
        too_large = [tuple(im.shape[-2:]) for im in images if im.shape[-2] > h or im.shape[-1] > w]
        if too_large:
            raise ValueError(
                f"{self.path} has a fixed input size {h}x{w}; an image resizes to {too_large[0][0]}x{too_large[0][1]}: "
                f"use a smaller size / max_size, or export without --fixed-shape"
            )
        fill = self.fixed_batch - len(images)
        images, masks = images + [images[-1]] * fill, masks + [masks[-1]] * fill
        pixel_values = images[0].new_zeros(len(images), 3, h, w)
        padding_mask = torch.ones(len(images), h, w, dtype=torch.bool)
        for i, (im, m) in enumerate(zip(images, masks, strict=True)):
            pixel_values[i, :, : im.shape[1], : im.shape[2]] = im
            padding_mask[i, : im.shape[1], : im.shape[2]] = m
        return pixel_values, padding_mask

    def __repr__(self) -> str:
        shape = "dynamic" if self.dynamic else f"fixed {self.fixed_batch}x3x{self.size[0]}x{self.size[1]}"
        return f"OnnxDetector({str(self.path)!r}, arch={self.config.arch!r}, {shape})"
