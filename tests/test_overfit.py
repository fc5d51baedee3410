"""End to end on real images: a small DETR overfits the 8 COCO images of ``coco_mini`` and finds their objects again.

Data, model, Hungarian matching, the set loss and COCO evaluation all have to agree for the training images'
own boxes to come back at AP50 ≥ 0.9: a wrong box convention, a label mapping off by one or a matcher that pairs the
wrong queries keeps AP50 far below that.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import detrkit
from detrkit.config import LossConfig, RunConfig
from detrkit.data import CocoDetection, collate
from detrkit.engine import build_criterion
from detrkit.evaluation import evaluate_model
from detrkit.transforms import eval_transforms

COCO_MINI = Path(__file__).parent / "fixtures" / "coco_mini"
SIZE, MAX_SIZE = 64, 96  # memorising 8 images needs no detail: small inputs keep the test fast
STEPS = 150  # AP50 reaches 0.96 after 100 steps and 1.0 after 150
LR = 1e-3


def test_small_detr_overfits_coco_mini():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    dataset = CocoDetection(
        COCO_MINI / "images",
        COCO_MINI / "annotations.json",
        transforms=eval_transforms(size=SIZE, max_size=MAX_SIZE),
    )
    model = detrkit.build(
        label_map=dataset.label_map,
        backbone="resnet18",
        backbone_norm="batch",  # trained from scratch: no pretrained weights offline
        trainable_stages=5,
        feature_level=3,
        hidden_dim=64,
        num_heads=4,
        enc_layers=1,
        dec_layers=2,
        ffn_dim=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        num_queries=10,
        image_size=SIZE,
        max_size=MAX_SIZE,
    )
    config = RunConfig(model=model.config, loss=LossConfig())
    criterion = build_criterion(config, model.config.num_classes)
    # The whole dataset is one batch: every step sees every image (no augmentation, so it is decoded once).
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=collate)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=STEPS, pct_start=0.1)

    start = time.perf_counter()
    model.train()
    for _ in range(STEPS):
        losses = criterion(model(batch.pixel_values, batch.padding_mask), batch.targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    train_time = time.perf_counter() - start

    metrics, results = evaluate_model(model, dataset, batch_size=len(dataset))
    assert results, "the model made no detections"
    assert metrics["AP50"] >= 0.9, (
        f"AP50 {metrics['AP50']:.3f} after {STEPS} steps ({train_time:.0f} s) on the training images; "
        f"final loss {float(losses['loss']):.3f} (ce {float(losses['loss_ce']):.3f}, "
        f"L1 {float(losses['loss_bbox']):.3f}, GIoU {float(losses['loss_giou']):.3f})"
    )
