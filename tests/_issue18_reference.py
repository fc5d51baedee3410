"""The pre-issue-18 reference of ``tests/test_denoising.py``: tiny DETR, Conditional DETR and Deformable DETR
(box refinement, two-stage) in training mode on a padded batch, their outputs, set losses and gradient norms.

``python tests/_issue18_reference.py OUT.safetensors`` wrote ``fixtures/issue18_reference.safetensors`` from the code
before denoising, one-to-many matching, query selection and look forward twice existed (commit cd617ce, this file on
``PYTHONPATH=<that tree>``); the test recomputes the same tensors with every new option off and compares.
"""

from __future__ import annotations

import sys

import torch

import detrkit
from detrkit.criterion import SetCriterion
from detrkit.matcher import HungarianMatcher

CASES = {
    "detr": dict(arch="detr", class_loss="softmax"),
    "conditional": dict(arch="conditional_detr", class_loss="focal"),
    "deformable": dict(
        arch="deformable_detr", class_loss="focal", box_refine=True, two_stage=True, num_feature_levels=2
    ),
}
TINY = dict(
    backbone="resnet18",
    backbone_norm="batch",
    trainable_stages=5,
    hidden_dim=32,
    num_heads=4,
    enc_layers=1,
    dec_layers=2,
    ffn_dim=64,
    num_queries=8,
    num_classes=3,
)


def batch() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    pixels[1, :, :, 96:] = 0
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return pixels, mask, targets


def compute(name: str, **options) -> dict[str, torch.Tensor]:
    """Build case ``name`` (plus ``options``) with seed 0, one training forward, its losses and gradient norm; on
    one thread, since the number of threads changes how sums are rounded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute(name, **options)
    finally:
        torch.set_num_threads(threads)


def _compute(name: str, **options) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = detrkit.build(**TINY, **CASES[name], **options).train()
    focal = model.config.focal
    criterion = SetCriterion(
        num_classes=3,
        matcher=HungarianMatcher(cost_class=2.0 if focal else 1.0, focal=focal),
        weight_ce=2.0 if focal else 1.0,
        focal=focal,
    )
    pixels, mask, targets = batch()
    torch.manual_seed(1)  # the dropout (and any other training-time randomness) draws from here
    kwargs = {"targets": targets} if getattr(model, "trains_with_targets", False) else {}
    out = model(pixels, mask, **kwargs)
    losses = criterion(out, targets)
    losses["loss"].backward()
    grad = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    result = {f"{name}/pred_logits": out["pred_logits"], f"{name}/pred_boxes": out["pred_boxes"]}
    for i, aux in enumerate(out["aux_outputs"]):
        result[f"{name}/aux{i}/pred_boxes"] = aux["pred_boxes"]
    for k in ("loss", "loss_ce", "loss_bbox", "loss_giou"):
        result[f"{name}/{k}"] = losses[k].reshape(1)
    for k in losses:
        if k.startswith(("dn/", "o2m/")):
            result[f"{name}/{k}"] = losses[k].reshape(1)
    result[f"{name}/grad_norm"] = grad.reshape(1)
    return {k: v.detach().contiguous() for k, v in result.items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for case in CASES:
        tensors.update(compute(case))
    save_file(tensors, sys.argv[1], metadata={"cpu_capability": torch.backends.cpu.get_cpu_capability()})
