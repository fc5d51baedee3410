"""The panoptic options beyond the reference's: score-weighted merging (``model.panoptic_merge="score"``) and the
encoder level Deformable DETR's mask head attends to (``model.mask_feature_level``). Both default to the reference's
behaviour; the ``demo_panoptic`` preset turns them on (README "Segmentation")."""

from __future__ import annotations

import pytest
import torch

import detrkit
from detrkit.config import ModelConfig, load_run_config
from detrkit.labels import LabelMap
from detrkit.models.registry import check_config
from detrkit.postprocess import postprocess_panoptic

LABELS = LabelMap((1, 2, 9), ("thing_a", "thing_b", "stuff"), isthing=(True, True, False))
SIZES = {"orig_sizes": torch.tensor([[8, 8]]), "image_sizes": torch.tensor([[8, 8]]), "padded_size": (8, 8)}


def _two_things_over_stuff(score_a: float, score_b: float) -> dict[str, torch.Tensor]:
    """Three focal queries on an 8×8 image (mask logits at stride 1 here, as ``padded_size`` says): A (thing_a,
    confident) and B (thing_b, doubtful) both claim the top-left 4×4 block, B with the higher mask logit; the stuff
    query claims the rest."""
    logit = torch.logit(torch.tensor([score_a, score_b, 0.9]))
    logits = torch.full((3, 3), -10.0)
    logits[0, 0], logits[1, 1], logits[2, 2] = logit
    masks = torch.full((3, 8, 8), -5.0)
    masks[0, :4, :4] = 1.0  # sigmoid 0.73
    masks[1, :4, :4] = 2.0  # sigmoid 0.88
    masks[2] = 0.0
    masks[2, :4, :4] = -5.0
    return {"pred_logits": logits[None], "pred_masks": masks[None]}


def _run(outputs: dict[str, torch.Tensor], merge: str, threshold: float = 0.3) -> tuple[torch.Tensor, list[dict]]:
    (result,) = postprocess_panoptic(outputs, **SIZES, label_map=LABELS, threshold=threshold, focal=True, merge=merge)
    return result["segments"], result["segments_info"]


def test_score_merging_gives_overlaps_to_the_confident_query() -> None:
    """Where two kept queries' masks overlap, the reference gives the pixels to the higher mask logit (the doubtful
    B), ``merge="score"`` to the higher score × probability (A: 0.9·0.73 = 0.66 against 0.35·0.88 = 0.31)."""
    outputs = _two_things_over_stuff(0.9, 0.35)
    segments, info = _run(outputs, "reference")
    categories = {s["id"]: s["category_id"] for s in info}
    assert categories[int(segments[0, 0])] == 2 and 1 not in categories.values()  # A lost every pixel: dropped
    segments, info = _run(outputs, "score")
    categories = {s["id"]: s["category_id"] for s in info}
    assert categories[int(segments[0, 0])] == 1 and 2 not in categories.values()
    assert categories[int(segments[7, 7])] == 9
    assert sum(s["area"] for s in info) == 64 and {s["area"] for s in info} == {16, 48}


def test_score_merging_with_equal_scores_is_the_reference() -> None:
    """With every kept query at the same score the weighting changes no pixel's argmax (log-sigmoid is monotone)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.full((1, 6, 3), -10.0)
    logits[0, torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2])] = 1.0
    outputs = {"pred_logits": logits, "pred_masks": 4 * torch.randn(1, 6, 8, 8, generator=g)}
    reference, ref_info = _run(outputs, "reference", threshold=0.5)
    scored, info = _run(outputs, "score", threshold=0.5)
    assert torch.equal(reference, scored) and ref_info == info
    assert len(info) >= 3  # the case has several segments to get wrong


def test_merge_is_validated_and_travels_with_the_model(tmp_path) -> None:
    with pytest.raises(ValueError, match="merge must be one of"):
        _run(_two_things_over_stuff(0.9, 0.35), "mask")
    with pytest.raises(ValueError, match="model.panoptic_merge must be one of"):
        ModelConfig(panoptic_merge="max")
    preset = load_run_config("demo_panoptic", []).model
    assert preset.panoptic_merge == "score" and ModelConfig().panoptic_merge == "reference"
    model = detrkit.build(**SMALL, arch="deformable_detr", panoptic_merge="score")
    model.save_pretrained(tmp_path / "m")
    assert detrkit.load(tmp_path / "m").config.panoptic_merge == "score"


SMALL = dict(
    backbone="resnet18", hidden_dim=32, num_heads=4, enc_layers=1, dec_layers=1, ffn_dim=32, num_queries=4,
    num_classes=3, masks=True, num_feature_levels=2,
)  # fmt: skip


def _attended_size(model: detrkit.Detector, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[int, int]:
    """The (h, w) of the map the mask head's attention covers on input ``x``."""
    seen = []
    handle = model.bbox_attention.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        model(x, mask)
    handle.remove()
    return seen[0]


def test_mask_feature_level_attends_at_stride_16() -> None:
    """``mask_feature_level=3`` attends to the stride-16 memory (4× the cells of stride 32); the masks keep their
    stride-4 layout and an image's masks still do not depend on its batch's padding."""
    torch.manual_seed(0)
    coarse = detrkit.build(**SMALL, arch="deformable_detr").eval()
    torch.manual_seed(0)
    fine = detrkit.build(**SMALL, arch="deformable_detr", mask_feature_level=3).eval()
    assert fine.config.mask_feature_level == 3
    x = torch.randn(1, 3, 96, 128)
    assert _attended_size(coarse, x) == (3, 4) and _attended_size(fine, x) == (6, 8)
    # same weights (the level decides no shape), different masks
    fine.load_state_dict(coarse.state_dict())
    with torch.no_grad():
        a, b = coarse(x), fine(x)
    assert a["pred_masks"].shape == b["pred_masks"].shape == (1, 4, 24, 32)
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert not torch.allclose(a["pred_masks"], b["pred_masks"], atol=1e-3)

    alone = torch.randn(1, 3, 70, 90)
    batch = torch.randn(2, 3, 96, 128)
    batch[0] = 0
    batch[0, :, :70, :90] = alone[0]
    padding = torch.ones(2, 96, 128, dtype=torch.bool)
    padding[0, :70, :90] = False
    padding[1] = False
    with torch.no_grad():
        single, padded = fine(alone)["pred_masks"][0], fine(batch, padding)["pred_masks"][0, :, :18, :23]
    assert (single - padded).abs().max().item() <= 1e-4


def test_mask_feature_level_errors() -> None:
    with pytest.raises(ValueError, match="mask_feature_level must be 3 or 4"):
        ModelConfig(mask_feature_level=2)
    with pytest.raises(ValueError, match=r"holds backbone levels \[4\] only"):
        detrkit.build(**{**SMALL, "num_feature_levels": 1}, arch="deformable_detr", mask_feature_level=3)
    # DETR attends to its one level (``feature_level``): the field is Deformable DETR's, reset elsewhere
    assert check_config(ModelConfig(arch="detr", masks=True, mask_feature_level=3)).mask_feature_level == 4
