"""Attention and sampling maps (``detrkit.explain``) and the drawings (``detrkit.visualize``): the recomputed
weights reproduce what the modules computed, the normal forward is left untouched, and the pictures are readable."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from PIL import Image

from detrkit.cli import main
from detrkit.explain import _plain_attention, attention_weights, explain
from detrkit.images import pad_batch
from detrkit.models.base import Detections
from detrkit.models.layers import Attention
from detrkit.transforms import eval_transforms
from detrkit.visualize import (
    class_color,
    curves_figure,
    draw_attention,
    draw_boxes,
    draw_detections,
    draw_sampling,
    label_style,
    save_explanation,
)

ARCHS = {
    "detr": {},
    "conditional_detr": {"arch": "conditional_detr", "class_loss": "focal"},
    "deformable_detr": {"arch": "deformable_detr", "class_loss": "focal", "num_feature_levels": 2,
                        "enc_points": 2, "dec_points": 2, "box_refine": True, "two_stage": True},
    "deformable_points": {"arch": "deformable_detr", "class_loss": "focal", "num_feature_levels": 3},
    "yolos": {"arch": "yolos", "backbone": "vit", "aux_loss": False, "pretrain_image_size": (64, 64)},
}  # fmt: skip


def _image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 70, 100)  # resized to 64×91 and padded to 64×96: the maps must leave the padding out


def _outputs(model, image) -> dict:
    x = eval_transforms(size=model.config.image_size, max_size=model.config.max_size)(image).as_subclass(torch.Tensor)
    pixel_values, padding_mask = pad_batch([x])
    with torch.no_grad():
        return model.eval()(pixel_values, padding_mask)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_recomputed_maps_are_what_the_model_used(name):
    model = tiny_model(**ARCHS[name])
    image = _image()
    before = _outputs(model, image)
    exp = explain(model, image, top_k=3)
    # the explicit recomputation reproduces the attention modules' outputs
    assert exp.max_error < 1e-5
    # no hook is left behind and the normal forward gives exactly what it gave before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    after = _outputs(model, image)
    assert torch.equal(before["pred_logits"], after["pred_logits"])
    assert torch.equal(before["pred_boxes"], after["pred_boxes"])
    # the detections explained are the model's own queries, best first
    assert len(exp.detections) == 3 and exp.queries.tolist() == sorted(
        set(exp.queries.tolist()), key=exp.queries.tolist().index
    )
    cx, cy, w, h = before["pred_boxes"][0, exp.queries].unbind(-1)
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor([100, 70, 100, 70])
    torch.testing.assert_close(exp.detections.boxes, expected)
    assert exp.detections.scores.tolist() == sorted(exp.detections.scores.tolist(), reverse=True)
    if name in ("detr", "conditional_detr"):
        # the feature map of the 64×91 input has 2×3 valid cells (stride 32): the padded column gets no attention
        assert exp.decoder_attention.shape == (3, 4, 2, 3) and exp.stride == 32
        torch.testing.assert_close(exp.decoder_attention.sum((-2, -1)), torch.ones(3, 4))
        assert exp.encoder_attention.shape[1:] == (4, 2, 3) and len(exp.pixels) == len(exp.encoder_attention)
        torch.testing.assert_close(exp.encoder_attention.sum((-2, -1)), torch.ones(len(exp.pixels), 4))
    elif name == "yolos":
        assert exp.decoder_attention.shape == (3, 4, 4, 6) and exp.stride == 16  # 4×6 valid 16-pixel patches
        share = exp.decoder_attention.sum((-2, -1))  # the rest goes to [CLS] and the detection tokens
        assert bool(((share > 0) & (share < 1)).all())
    else:
        k, nh, n_levels, n_points, _ = exp.sampling_points.shape
        assert (k, nh, n_levels) == (3, 4, len(exp.level_shapes))
        torch.testing.assert_close(exp.sampling_weights.sum((-2, -1)), torch.ones(k, nh))
        if name == "deformable_points":  # at initialisation: uniform weights, a ring of points around the reference
            torch.testing.assert_close(
                exp.sampling_weights, torch.full_like(exp.sampling_weights, 1 / (n_levels * n_points))
            )
            centre = exp.sampling_points.mean((1, 3))  # (k, L, 2): the heads' rings are symmetric
            assert bool((centre[:, :, 0] > -50).all() and (centre[:, :, 0] < 150).all())


def test_the_error_check_detects_a_wrong_recomputation():
    torch.manual_seed(0)
    module = Attention(16, 4)
    q, k = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    weights = attention_weights(module, q, k, mask)
    assert weights.shape == (2, 4, 3, 5)
    assert float(weights[1, :, :, 3:].detach().abs().max()) == 0.0  # padded keys get nothing
    record = {"module": module, "args": (q, k, k, mask), "kwargs": {}, "output": module(q, k, k, mask)}
    assert _plain_attention(record)[1] < 1e-6
    record["output"] = record["output"] + 1e-3
    assert _plain_attention(record)[1] == pytest.approx(1e-3, rel=1e-2)


def test_explain_refuses_bad_requests():
    model = tiny_model()
    with pytest.raises(ValueError, match="pixels must lie inside"):
        explain(model, _image(), pixels=[(150, 10)])
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        explain(model, _image(), layer=5)
    with pytest.raises(ValueError, match="top_k"):
        explain(model, _image(), top_k=0)
    exp = explain(model, _image(), pixels=[(10, 60), (99, 0)], layer=0)
    assert exp.layer == 0 and exp.pixels.tolist() == [[10, 60], [99, 0]]


def test_explanation_pictures_and_the_cli(tmp_path, capsys):
    model = tiny_model()
    image = tmp_path / "cat.png"
    Image.fromarray((_image() * 255).byte().permute(1, 2, 0).numpy()).save(image)
    exp = explain(model, image, top_k=2)
    decoder = draw_attention(exp, which="decoder")
    assert decoder.dtype == torch.uint8 and decoder.shape[1] > 240  # panels enlarged from the 70-pixel image
    assert draw_sampling(exp) is None
    paths = save_explanation(exp, tmp_path / "out", "cat")
    assert sorted(p.name for p in paths) == ["cat_decoder.png", "cat_encoder.png"]

    deformable = tiny_model(**ARCHS["deformable_points"])
    sampling = draw_sampling(explain(deformable, image, top_k=2))
    assert sampling is not None and sampling.shape[0] == 3

    model.save_pretrained(tmp_path / "weights")
    code = main(["explain", str(tmp_path / "weights"), str(image), "--out", str(tmp_path / "cli"), "--top", "2",
                 "--device", "cpu", "--pixel", "5,5"])  # fmt: skip
    assert code == 0
    assert Image.open(tmp_path / "cli" / "cat_decoder.png").size[0] > 400
    assert "query" in capsys.readouterr().out
    assert main(["explain", str(tmp_path / "weights"), str(image), "--pixel", "5"]) == 2
    assert main(["explain", str(tmp_path / "weights"), str(tmp_path / "missing.png")]) == 2


def test_labels_are_readable_and_colours_stable():
    assert label_style(96, 128)[0] == 10 and label_style(800, 1200)[0] == 24  # font grows with the image
    assert class_color(3) == class_color(3) and len({class_color(c) for c in range(8)}) == 8
    white = torch.full((3, 100, 200), 255, dtype=torch.uint8)
    drawn = draw_boxes(white, torch.tensor([[50.0, 40.0, 150.0, 90.0]]), ["square 0.93"], ["#4363d8"])
    fill = (drawn == torch.tensor([0x43, 0x63, 0xD8])[:, None, None]).all(0)  # (H, W): the label's background
    rows, cols = fill.nonzero().unbind(1)
    box_edges = 2 * 100 + 2 * 50  # the outline alone, one pixel wide at this size
    assert int(fill.sum()) > box_edges + 300  # a filled band, not just the outline
    band = fill[:40, 50:]  # above the box's top edge (y = 40), from its left edge
    assert int(band.sum()) > 300 and int(rows.min()) >= 40 - 20
    top, bottom = int(band.any(1).nonzero().min()), 40
    text = (drawn[:, top:bottom, 50:120] == 255).all(0)  # white text on the dark blue band
    assert 0 < text.float().mean() < 0.5
    # a small image is enlarged so that its labels fit; boxes scale with it
    det = Detections(torch.tensor([[10.0, 10.0, 40.0, 40.0]]), torch.tensor([0.9]), torch.tensor([3]), ["square"])
    big = draw_detections(torch.rand(3, 60, 80), det, min_side=240)
    assert big.shape == (3, 240, 320)
    orange = torch.tensor([int(class_color(3)[i : i + 2], 16) for i in (1, 3, 5)])
    edge = (big[:, 120] == orange[:, None]).all(0).nonzero().flatten().tolist()  # row 120 crosses the box's sides
    assert edge == [40, 160]  # at 4× the image's coordinates


def test_curves_of_a_short_run_show_validation_points_and_the_learning_rate():
    steps = [{"type": "step", "epoch": 1, "step": s, "loss": 3.0 - s / 10, "loss_ce": 1.0, "lr": 1e-4 * s}
             for s in range(1, 6)]  # fmt: skip
    epochs = [{"type": "epoch", "epoch": 1, "step": 5, "AP": 0.123, "AP50": 0.456, "AP75": 0.1}]
    fig = curves_figure(steps, epochs)
    _, lr, val = fig.axes
    assert list(lr.lines[0].get_ydata()) == pytest.approx([1e-4 * s for s in range(1, 6)])
    assert {t.get_text() for t in val.texts} == {"0.123", "0.456", "0.100"}
    assert [line.get_label() for line in val.lines] == ["AP", "AP50", "AP75"]
    lo, hi = val.get_xlim()
    assert lo < 1 < hi  # the single evaluation is inside the panel, not on its edge
    json.dumps(steps)  # records as log.jsonl has them
