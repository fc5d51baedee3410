"""Iterative box refinement (``model.box_refine``, ``model.look_forward_twice``) for DETR and Conditional DETR
(issue 18, ``models/single_scale.py``'s ``BoxRefinement``): each decoder layer refines the previous layer's box, and
the next layer's query position (Conditional DETR: also its reference point) comes from that box.

Checked on tiny models: every option combination trains (every parameter gets a gradient) and evaluates with Q
queries; the layers chain exactly as written (layer l+1's box is its offset from layer l's box, its query position
that box's embedding, its reference point that box's centre); the anchor is detached unless look forward twice;
padding, save/load, explain and ONNX export work with the option on; bad combinations are refused.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

import detrkit
from detrkit.config import LossConfig, RunConfig
from detrkit.engine import build_criterion
from detrkit.explain import explain
from detrkit.models import shape_fields
from detrkit.models.layers import inverse_sigmoid
from detrkit.position_encoding import sine_embed_points

# no dropout, so that outputs compare exactly; stride 16 (24 tokens at 64×96) so query selection has enough
NO_DROPOUT = {**TINY, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "feature_level": 3}
ARCHS = {"detr": {"arch": "detr"}, "conditional_detr": {"arch": "conditional_detr", "class_loss": "focal"}}
ANCHORS = {"learned": {}, "two_stage": {"two_stage": True}}


def batch() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two images, the second 64×64 padded to 64×96, with 2 and 1 targets."""
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(2, 3, 64, 96, generator=g)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    pixels[1, :, :, 64:] = 0
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return pixels, mask, targets


def build(arch: str, anchors: str = "learned", **overrides) -> detrkit.Detector:
    torch.manual_seed(0)
    return detrkit.build(**{**NO_DROPOUT, **ARCHS[arch], **ANCHORS[anchors], "box_refine": True, **overrides})


def _randomise_box_heads(model: detrkit.Detector) -> None:
    """The heads start at "no change" (last layer zero); non-zero ones make every gradient path show."""
    for head in model.bbox_embed:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
        torch.nn.init.normal_(head.layers[-1].bias, std=0.1)


# -- training and evaluation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dn", [0, 2], ids=["plain", "dn_o2m"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_query_selection_without_refinement_uses_every_parameter(arch, dn):
    """Query selection alone (``two_stage``, no ``box_refine``): every trainable parameter gets a gradient, with
    and without the training-only queries. A module the forward never uses (a reference-point head whose points
    are given, a second box → position map, learned one-to-many positions the proposals replace) stalls DDP."""
    extra = {"dn_groups": dn, "dn_contrastive": True, "one_to_many_queries": 4} if dn else {}
    torch.manual_seed(0)
    model = detrkit.build(**{**NO_DROPOUT, **ARCHS[arch], "two_stage": True, **extra}).train()
    pixels, mask, targets = batch()
    out = model(pixels, mask, targets=targets)
    run = RunConfig(model=model.config, loss=LossConfig())
    build_criterion(run, model.config.num_classes)(out, targets)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("dn", [0, 2], ids=["plain", "dn_o2m"])
@pytest.mark.parametrize("anchors", sorted(ANCHORS))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trains_and_evaluates(arch, anchors, dn):
    """A training step through the criterion (with denoising and one-to-many queries beside the matched ones, or
    without) gives a finite loss and a gradient to every trainable parameter (what DDP needs); evaluation returns Q
    queries and no training-only outputs."""
    extra = {"dn_groups": dn, "dn_contrastive": True, "one_to_many_queries": 4} if dn else {}
    model = build(arch, anchors, look_forward_twice=True, **extra).train()
    assert isinstance(model.bbox_embed, torch.nn.ModuleList) and len(model.bbox_embed) == 2
    assert not hasattr(model, "query_embed")  # positions come from the anchors
    assert hasattr(model, "anchor_embed") == (anchors == "learned")
    pixels, mask, targets = batch()
    out = model(pixels, mask, targets=targets)
    q = NO_DROPOUT["num_queries"]
    assert out["pred_boxes"].shape == (2, q, 4) and len(out["aux_outputs"]) == 1
    assert ("enc_outputs" in out) == (anchors == "two_stage")
    if dn:
        assert out["denoising"]["pred_boxes"].shape == (2, 2 * 2 * 2, 4)  # groups · parts · most targets
        assert out["one_to_many"]["pred_boxes"].shape == (2, 4, 4)
    run = RunConfig(model=model.config, loss=LossConfig())
    losses = build_criterion(run, model.config.num_classes)(out, targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    with torch.no_grad():
        evaluated = model.eval()(pixels, mask)
    assert evaluated["pred_boxes"].shape == (2, q, 4)
    assert "denoising" not in evaluated and "one_to_many" not in evaluated
    assert ((evaluated["pred_boxes"] > 0) & (evaluated["pred_boxes"] < 1)).all()


def test_learned_anchors_start_spread_over_the_image():
    model = build("detr", num_queries=64)
    anchors = model.anchor_embed.weight.sigmoid()  # (Q, 4)
    assert (anchors[:, :2] > 0.04).all() and (anchors[:, :2] < 0.96).all()
    assert anchors[:, 0].std() > 0.2 and anchors[:, 1].std() > 0.2  # uniform in (0.05, 0.95): std 0.26
    torch.testing.assert_close(anchors[:, 2:], torch.full((64, 2), 0.25))
    with torch.no_grad():  # the heads start at "no change": every layer's box is its query's anchor
        out = model.eval()(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(out["pred_boxes"][0], anchors)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"][0], anchors)


# -- the layers chain -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anchors", sorted(ANCHORS))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_layer_refines_the_previous_layers_box(arch, anchors):
    """Layer 1's box is its head's offset applied to layer 0's box in logit space; its query position is the
    embedding of layer 0's box; in Conditional DETR its spatial query is the sine embedding of that box's centre
    (scaled by ``query_scale``). Changing only layer 0's box head changes layer 1's boxes and scores."""
    model = build(arch, anchors).eval()
    _randomise_box_heads(model)
    pixels, mask, _ = batch()
    records: dict[str, list] = {"delta": [], "position_in": [], "scale": [], "cross": []}
    hooks = [
        model.bbox_embed[1].register_forward_hook(lambda m, a, o: records["delta"].append(o)),
        model.query_position.register_forward_hook(lambda m, a, o: records["position_in"].append(a[0])),
    ]
    if arch == "conditional_detr":
        t = model.transformer
        hooks.append(t.query_scale.register_forward_hook(lambda m, a, o: records["scale"].append(o)))
        hooks.append(t.decoder[1].cross_attn.register_forward_hook(lambda m, a, o: records["cross"].append(a)))
    with torch.no_grad():
        out = model(pixels, mask)
    for h in hooks:
        h.remove()
    first, last = out["aux_outputs"][0]["pred_boxes"], out["pred_boxes"]
    torch.testing.assert_close(last, (records["delta"][0] + inverse_sigmoid(first)).sigmoid())
    torch.testing.assert_close(records["position_in"][-1], first)  # the last embedding made: layer 1's anchors
    if arch == "conditional_detr":
        d = NO_DROPOUT["hidden_dim"]
        sine = sine_embed_points(first[..., :2], d // 2, temperature=model.config.position_temperature)
        torch.testing.assert_close(records["cross"][0][2], sine * records["scale"][-1])  # query_sine of layer 1

    with torch.no_grad():
        model.bbox_embed[0].layers[-1].bias.add_(0.3)
        moved = model(pixels, mask)
    assert not torch.allclose(moved["pred_boxes"], last, atol=1e-3)
    assert not torch.allclose(moved["pred_logits"], out["pred_logits"], atol=1e-4)  # layer 1 looked elsewhere


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_anchor_is_detached_unless_look_forward_twice(arch):
    """The same boxes either way; the last layer's boxes train layer 0's box head only with look forward twice
    (through the previous box it refines), never through the detached anchor."""
    pixels, mask, _ = batch()
    outs, grads = {}, {}
    for lft in (False, True):
        model = build(arch, look_forward_twice=lft).eval()
        _randomise_box_heads(model)
        out = model(pixels, mask)
        out["pred_boxes"].sum().backward()
        outs[lft] = out["pred_boxes"].detach()
        grads[lft] = model.bbox_embed[0].layers[-1].weight.grad
        assert model.bbox_embed[1].layers[-1].weight.grad.abs().max() > 0
    assert torch.equal(outs[False], outs[True])
    assert grads[False] is None or grads[False].abs().max() == 0
    assert grads[True].abs().max() > 0


# -- padding, persistence, explain, export -----------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "anchors"), [("detr", "two_stage"), ("conditional_detr", "learned")])
def test_padding_does_not_change_an_images_outputs(arch, anchors):
    model = build(arch, anchors).eval()
    _randomise_box_heads(model)
    torch.manual_seed(1)
    small = torch.randn(1, 3, 64, 64)
    pixels = torch.zeros(2, 3, 64, 128)
    pixels[0, :, :64, :64] = small[0]
    pixels[1] = torch.randn(3, 64, 128)
    mask = torch.ones(2, 64, 128, dtype=torch.bool)
    mask[0, :64, :64] = False
    mask[1] = False
    with torch.no_grad():
        alone, padded = model(small), model(pixels, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert (alone[key][0] - padded[key][0]).abs().max() < 1e-4, key


def test_save_load_round_trip_and_explain(tmp_path):
    """The saved model loads with its options and gives the same outputs; the attention maps that ``explain``
    recomputes are what the refined decoder used."""
    pixels, mask, _ = batch()
    for arch, anchors in (("detr", "learned"), ("conditional_detr", "two_stage")):
        model = build(arch, anchors, look_forward_twice=True).eval()
        _randomise_box_heads(model)
        model.save_pretrained(tmp_path / arch)
        loaded = detrkit.load(tmp_path / arch).eval()
        assert loaded.config.box_refine and loaded.config.look_forward_twice
        with torch.no_grad():
            want, got = model(pixels, mask), loaded(pixels, mask)
        assert torch.equal(want["pred_boxes"], got["pred_boxes"])
        assert torch.equal(want["pred_logits"], got["pred_logits"])
        exp = explain(model, torch.rand(3, 70, 100), top_k=3)
        assert exp.max_error < 1e-5 and exp.decoder_attention.shape[:2] == (3, NO_DROPOUT["num_heads"])


def test_masks_with_box_refinement_and_a_frozen_detector():
    """The mask head reads the refined decoder's last embeddings; with ``freeze_detector`` the refinement's
    parameters (anchors, per-layer heads, the box → position map) are frozen with the rest of the detector."""
    model = build("detr", masks=True, freeze_detector=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("bbox_attention.", "mask_head.")) for n in trainable)
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 96))
    assert out["pred_masks"].shape == (1, NO_DROPOUT["num_queries"], 16, 24)


@pytest.mark.slow
def test_onnx_export(tmp_path):
    """One real export (the tiniest refining model, 64×64): onnxruntime agrees with PyTorch at three sizes."""
    from detrkit.models.export import export_onnx

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = build("conditional_detr", "two_stage", look_forward_twice=True).eval()
    _randomise_box_heads(model)
    report = export_onnx(model, tmp_path / "m.onnx", size=(64, 64))
    assert len(report.checks) == 3 and report.max_abs_diff <= 1e-4
    assert any("padded" in name for name in report.checks)


# -- configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_options_are_kept_refused_and_decide_the_weights(arch):
    model = build(arch, look_forward_twice=True)
    assert model.config.box_refine and model.config.look_forward_twice  # the architecture's own fields now
    assert "box_refine" in shape_fields(arch) and "look_forward_twice" not in shape_fields(arch)
    with pytest.raises(ValueError, match="look_forward_twice .* needs model.box_refine=true"):
        detrkit.build(**{**NO_DROPOUT, **ARCHS[arch], "look_forward_twice": True})
    with pytest.raises(ValueError, match="needs model.aux_loss=true"):
        build(arch, aux_loss=False)
