"""Issue 18's training-only queries and losses: denoising (DN-DETR, DINO's contrastive denoising), the one-to-many
branch (H-DETR), mixed query selection and look forward twice (DINO), IoU-aware classification (varifocal).

With every option off, outputs, losses and gradients equal those of the code before these options existed
(``fixtures/issue18_reference.safetensors``, written by ``_issue18_reference.py``); the attention mask hides the
training-only queries from the matching ones; the losses supervise what the papers say; resume, evaluation and
loading go through the engine unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from _issue18_reference import CASES, batch, compute
from conftest import TINY as SHARED_TINY
from safetensors import safe_open
from test_engine import final_weights, shapes, tiny_config  # noqa: F401 - shapes is a fixture

import detrkit
from detrkit.box_ops import box_cxcywh_to_xyxy
from detrkit.checkpoint import init_from_weights
from detrkit.criterion import SetCriterion
from detrkit.engine import Trainer
from detrkit.matcher import HungarianMatcher
from detrkit.models.denoising import DenoisingQueries, ExtraQueries, query_attention_mask

REFERENCE = Path(__file__).parent / "fixtures" / "issue18_reference.safetensors"

# the shared tiny model without dropout, so that outputs compare exactly
TINY = {**SHARED_TINY, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}
DINO_LIKE = dict(
    arch="deformable_detr",
    class_loss="focal",
    num_feature_levels=2,
    box_refine=True,
    two_stage=True,
    mixed_query_selection=True,
    look_forward_twice=True,
)
ARCHS = {
    "detr": dict(arch="detr"),
    "conditional_detr": dict(arch="conditional_detr", class_loss="focal"),
    # query selection: the encoder's best tokens give the queries' anchor boxes (stride 16: 48 tokens here)
    "conditional_detr_selection": dict(arch="conditional_detr", class_loss="focal", two_stage=True, feature_level=3),
    "detr_selection": dict(arch="detr", two_stage=True, feature_level=3),
    "deformable_detr": DINO_LIKE,
}


# -- every option off: today's computation, bit for bit ------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_options_off_reproduce_the_code_before_them(case):
    """Outputs, the three loss terms, the total and the gradient norm of a training step equal the reference
    computed by the code before issue 18 (bit for bit on a CPU of the kind that wrote it; float rounding of
    another instruction set otherwise)."""
    got = compute(case)
    with safe_open(REFERENCE, "pt") as f:
        same_cpu = f.metadata().get("cpu_capability") == torch.backends.cpu.get_cpu_capability()
        for key, value in got.items():
            expected = f.get_tensor(key)
            if same_cpu:
                assert torch.equal(value, expected), key
            else:
                torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=key)


# -- the attention mask ---------------------------------------------------------------------------------------
def test_attention_mask_layout():
    """Matching rows see matching columns only; a denoising row sees the matching queries and the real slots of
    its own group; one-to-many rows see one-to-many columns only."""
    valid = torch.tensor([[[True, False, True, False], [True, False, True, False]]])  # (B=1, G=2, P·S=4): N=1, S=2
    extra = ExtraQueries(torch.zeros(1, 8, 4), torch.zeros(1, 8, dtype=torch.long), valid, 2, 2, 3)
    q = 5
    allowed = query_attention_mask(q, extra)[0, 0]  # (Qt, Qt)
    assert allowed.shape == (16, 16)
    assert allowed[:q, :q].all() and not allowed[:q, q:].any()
    dn = slice(q, q + 8)
    assert allowed[dn, :q].all() and not allowed[dn, q + 8 :].any()
    block = allowed[dn, dn].int()
    group_of = torch.arange(8) // 4
    real = valid.reshape(8)
    for i in range(8):
        for j in range(8):
            assert block[i, j] == int(group_of[i] == group_of[j] and real[j]), (i, j)
    assert allowed[q + 8 :, q + 8 :].all() and not allowed[q + 8 :, : q + 8].any()
    assert allowed.any(1).all()  # no empty softmax row


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_matching_queries_cannot_see_the_training_queries(arch):
    """Changing everything the denoising and one-to-many queries are made of (their noise, the targets they copy,
    their parameters) leaves every output of the matching queries exactly as it was."""
    torch.manual_seed(0)
    model = detrkit.build(**TINY, **ARCHS[arch], dn_groups=3, dn_contrastive=True, one_to_many_queries=6).train()
    pixels, mask, targets = batch()

    def matching_outputs(seed, tgts):
        torch.manual_seed(seed)
        out = model(pixels, mask, targets=tgts)
        assert out["denoising"]["pred_boxes"].shape[1] == 3 * 2 * max(len(t["labels"]) for t in tgts)
        assert out["one_to_many"]["pred_boxes"].shape[1] == 6
        return [out["pred_logits"], out["pred_boxes"], *[a["pred_boxes"] for a in out["aux_outputs"]]]

    with torch.no_grad():
        before = matching_outputs(0, targets)
        other = [{"labels": (t["labels"] + 1) % 3, "boxes": t["boxes"].flip(-1)} for t in targets]
        after = matching_outputs(1, other)
        for p in model.denoising.parameters():
            p.add_(1.0)
        if hasattr(model, "one_to_many_embed"):  # with query selection the branch takes the next proposals
            model.one_to_many_embed.weight.add_(1.0)
        perturbed = matching_outputs(2, targets)
    for a, b, c in zip(before, after, perturbed, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_training_queries_exist_only_in_training(arch):
    """Evaluation mode needs no targets and returns Q queries only; the matching queries' outputs in training
    (with denoising and one-to-many queries beside them) equal those of evaluation (no dropout, frozen
    BatchNorm)."""
    torch.manual_seed(0)
    model = detrkit.build(**TINY, **ARCHS[arch], dn_groups=2, one_to_many_queries=4)
    pixels, mask, targets = batch()
    with torch.no_grad():
        train_out = model.train()(pixels, mask, targets=targets)
        eval_out = model.eval()(pixels, mask)
    assert "denoising" not in eval_out and "one_to_many" not in eval_out
    assert eval_out["pred_boxes"].shape == (2, TINY["num_queries"], 4)
    torch.testing.assert_close(train_out["pred_boxes"], eval_out["pred_boxes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(train_out["pred_logits"], eval_out["pred_logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="targets=targets"):
        model.train()(pixels, mask)


# -- noise --------------------------------------------------------------------------------------------------------
def test_noise_bounds_of_positive_and_negative_copies():
    """DINO's jitter: every corner of a positive copy moves by less than λ·half-size, every corner of a negative
    copy (where not clamped to the image) by λ to 2λ times it; labels flip at about the asked rate."""
    torch.manual_seed(0)
    dn = DenoisingQueries(5, 8, groups=50, label_noise=0.3, box_noise=0.5, contrastive=True)
    targets = [{"labels": torch.tensor([0, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.4, 0.6, 0.3, 0.1]])}]
    extra = dn.sample(targets, torch.device("cpu"))
    boxes = extra.boxes.view(50, 2, 2, 4)  # (G, P, S, 4)
    gt = targets[0]["boxes"]
    half = torch.cat([gt[:, 2:], gt[:, 2:]], -1) / 2  # (S, 4)
    moved = (box_cxcywh_to_xyxy(boxes) - box_cxcywh_to_xyxy(gt)).abs() / half
    assert (moved[:, 0] < 0.5 + 1e-5).all()
    assert (moved[:, 1] >= 0.5 - 1e-5).all() and (moved[:, 1] < 1.0 + 1e-5).all()
    flipped = (extra.labels.view(50, 2, 2) != targets[0]["labels"]).float().mean()
    assert 0.1 < flipped < 0.4  # 0.3 · 4/5 of the draws change the class
    assert extra.valid.all()


# -- losses -------------------------------------------------------------------------------------------------------
def _criterion(focal: bool, **kwargs) -> SetCriterion:
    return SetCriterion(num_classes=3, matcher=HungarianMatcher(focal=focal), focal=focal, **kwargs)


@pytest.mark.parametrize("focal", [False, True])
def test_denoising_losses_supervise_positives_and_negatives(focal):
    """Positive copies are trained to their own target's box without matching: predicting exactly that box costs
    nothing, whatever the matching queries do; a wrong box at a padding slot costs nothing; a negative copy
    classified as its target's class costs more than one classified as no object."""
    _, _, targets = batch()  # image 0: 2 targets, image 1: 1 → S = 2
    groups, parts, slots = 2, 2, 2
    qd = groups * parts * slots
    c = 3 if focal else 4
    boxes = torch.full((2, qd, 4), 0.25)
    for b, t in enumerate(targets):
        for g in range(groups):
            boxes[b, g * parts * slots : g * parts * slots + len(t["boxes"])] = t["boxes"]  # positives
    logits = torch.zeros(2, qd, c)
    dn = {"pred_logits": logits, "pred_boxes": boxes, "groups": groups, "parts": parts}
    main = {"pred_logits": torch.zeros(2, 8, c), "pred_boxes": torch.rand(2, 8, 4) * 0.5 + 0.25}
    criterion = _criterion(focal)
    losses = criterion({**main, "denoising": dn}, targets)
    assert losses["dn/loss_bbox"] == 0 and losses["dn/loss_giou"].abs() < 1e-6
    assert torch.isfinite(losses["loss"])

    def negative_ce(label: int | None) -> float:
        scored = logits.clone()
        for b, t in enumerate(targets):
            for g in range(groups):
                start = g * parts * slots + slots  # part 1: the negatives
                for s, cls in enumerate(t["labels"].tolist()):
                    if label is None:  # confident no-object
                        scored[b, start + s] = -5.0 if focal else 0.0
                        if not focal:
                            scored[b, start + s, -1] = 5.0
                    else:  # confident of the target's class
                        scored[b, start + s, cls] = 5.0
        return float(criterion({**main, "denoising": {**dn, "pred_logits": scored}}, targets)["dn/loss_ce"])

    assert negative_ce(None) < negative_ce(0)
    # padding slot (image 1, slot 1 of each part) is ignored: any box or score there changes nothing
    noisy = boxes.clone()
    noisy[1, 1] = torch.tensor([0.9, 0.9, 0.05, 0.05])
    scored = logits.clone()
    scored[1, 1] = 7.0
    again = criterion({**main, "denoising": {**dn, "pred_boxes": noisy, "pred_logits": scored}}, targets)
    assert torch.equal(again["dn/loss_bbox"], losses["dn/loss_bbox"])
    assert torch.equal(again["dn/loss_ce"], losses["dn/loss_ce"])


def test_one_to_many_matches_repeated_targets():
    """The one-to-many branch matches each target ``repeat`` times: with queries placed on the targets,
    ``repeat`` copies of each, its box loss is 0; with one copy only it is not."""
    _, _, targets = batch()
    k = 3
    boxes = torch.full((2, 9, 4), 0.5)
    boxes[:, :, 2:] = 0.05
    for b, t in enumerate(targets):
        boxes[b, : k * len(t["boxes"])] = t["boxes"].repeat(k, 1)
    main = {"pred_logits": torch.zeros(2, 8, 3), "pred_boxes": torch.rand(2, 8, 4) * 0.5 + 0.25}
    o2m = {"pred_logits": torch.zeros(2, 9, 3), "pred_boxes": boxes, "repeat": k}
    criterion = _criterion(True)
    losses = criterion({**main, "one_to_many": o2m}, targets)
    assert losses["o2m/loss_bbox"] < 1e-6
    single = torch.full((2, 9, 4), 0.5)
    single[:, :, 2:] = 0.05
    for b, t in enumerate(targets):
        single[b, : len(t["boxes"])] = t["boxes"]  # one copy of each target only
    assert criterion({**main, "one_to_many": {**o2m, "pred_boxes": single}}, targets)["o2m/loss_bbox"] > 0.1
    weighted = _criterion(True, weight_one_to_many=0.0)({**main, "one_to_many": o2m}, targets)
    plain = criterion(main, targets)
    torch.testing.assert_close(weighted["loss"], plain["loss"])


def test_iou_aware_target_is_the_box_iou():
    """Varifocal loss: a matched query's classification gradient at its class vanishes where its score equals
    its box's IoU with the target (and not at score 1); focal models only."""
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    pred = torch.tensor([[[0.55, 0.5, 0.4, 0.4]]])  # overlap 0.35 × 0.4 = 0.14, union 0.16 + 0.16 - 0.14
    iou = 0.14 / 0.18
    criterion = _criterion(True, iou_aware=True)
    for score, vanishes in ((iou, True), (0.99, False)):
        logits = torch.full((1, 1, 3), -20.0)
        logits[0, 0, 1] = torch.logit(torch.tensor(score))
        logits.requires_grad_(True)
        criterion({"pred_logits": logits, "pred_boxes": pred}, target)["loss_ce"].backward()
        assert (abs(float(logits.grad[0, 0, 1])) < 1e-5) == vanishes
    with pytest.raises(ValueError, match="focal"):
        _criterion(False, iou_aware=True)


# -- look forward twice, configuration ------------------------------------------------------------------------
def test_look_forward_twice_same_boxes_gradient_one_layer_back():
    """The boxes are the same values; the last layer's box loss reaches the previous layer's box head only with
    look forward twice."""
    pixels, mask, _ = batch()
    grads, outs = {}, {}
    for lft in (False, True):
        torch.manual_seed(0)
        options = {**DINO_LIKE, "look_forward_twice": lft}
        model = detrkit.build(**TINY, **options).eval()
        for head in model.decoder.bbox_embed:  # non-zero heads, so that gradients through them show
            torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
        out = model(pixels, mask)
        out["pred_boxes"].sum().backward()
        outs[lft] = out["pred_boxes"].detach()
        grads[lft] = model.decoder.bbox_embed[0].layers[-1].weight.grad
    assert torch.equal(outs[False], outs[True])
    assert grads[False] is None or grads[False].abs().max() == 0
    assert grads[True].abs().max() > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(arch="deformable_detr", box_refine=True, dn_groups=2), "two_stage"),
        (dict(arch="deformable_detr", mixed_query_selection=True), "two_stage"),
        (dict(arch="deformable_detr", look_forward_twice=True), "box_refine"),
        (dict(arch="detr", dn_groups=-1), "dn_groups"),
        (dict(arch="detr", dn_label_noise=1.5), "dn_label_noise"),
        (dict(arch="detr", one_to_many_queries=4, masks=True), "one_to_many"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        detrkit.build(**{**TINY, **options})


def test_query_selection_needs_enough_tokens():
    """Conditional DETR's query selection keeps the top Q (+ one-to-many) of the encoder's tokens: a stride-32 map
    of 3×4 cells cannot give 8 + 6 queries, and the error says so."""
    options = {**ARCHS["conditional_detr_selection"], "feature_level": 4}
    model = detrkit.build(**TINY, **options, one_to_many_queries=6)
    pixels, mask, targets = batch()
    with pytest.raises(ValueError, match="top 14 of the encoder's 12 tokens"):
        model.train()(pixels, mask, targets=targets)
    out = model.eval()(pixels, mask)  # inference has no one-to-many queries: 8 of 12
    assert out["pred_boxes"].shape == (2, 8, 4) and out["enc_outputs"]["pred_boxes"].shape == (2, 12, 4)


# -- through the engine: train, resume to the same weights, evaluate, load, predict ---------------------------
ENGINE_CASES = {
    "detr_dn_o2m": ["model.dn_groups=2", "model.dn_contrastive=true", "model.one_to_many_queries=6"],
    "dino": [
        "model.arch=deformable_detr",
        "model.class_loss=focal",
        "model.num_feature_levels=2",
        "model.enc_points=2",
        "model.dec_points=2",
        "model.box_refine=true",
        "model.two_stage=true",
        "model.mixed_query_selection=true",
        "model.look_forward_twice=true",
        "model.dn_groups=2",
        "model.dn_contrastive=true",
        "loss.cost_class=2",
        "loss.weight_ce=2",
        "loss.iou_aware=true",
    ],
}


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_train_resume_load_with_training_queries(case, shapes, tmp_path):  # noqa: F811 - shapes is a fixture
    """The denoising noise comes from the run's random stream: an interrupted and resumed run ends with the same
    weights; the saved model loads and predicts with Q queries; fine-tuning from it with the options off drops the
    training-only parameters, and turning them on over weights without them starts them from scratch."""
    extra = [
        "train.deterministic=true",
        "train.schedule=step",
        "train.epochs=2",
        "train.max_steps_per_epoch=2",
        *ENGINE_CASES[case],
    ]
    Trainer(tiny_config(shapes, tmp_path / "a", *extra)).fit()
    Trainer(tiny_config(shapes, tmp_path / "b", *extra, "train.epochs=1")).fit()
    Trainer(tiny_config(shapes, tmp_path / "b", *extra), resume="auto").fit()
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("denoising.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    model = detrkit.load(tmp_path / "a" / "model")
    det = model.predict(torch.rand(3, 64, 80), threshold=0.0, top_k=5)
    assert len(det) == 5 and det.boxes.shape == (5, 4)

    off_config = model.config.replace(dn_groups=0, one_to_many_queries=0)
    off = init_from_weights(off_config, str(tmp_path / "a" / "model"))
    assert not any(k.startswith(("denoising.", "one_to_many_")) for k in off.state_dict())
    key = next(k for k in off.state_dict() if k.startswith("class_embed"))
    assert torch.equal(off.state_dict()[key], model.state_dict()[key])  # the trained weights were loaded
    off.save_pretrained(tmp_path / "off")
    on = init_from_weights(model.config, str(tmp_path / "off"))
    assert "denoising.label_embed.weight" in on.state_dict()


# -- detrkit doctor's suggestions -------------------------------------------------------------------------------
def test_doctor_suggests_queries_and_input_size():
    """Queries from the objects per image (3× the 99th percentile, at least the most); a larger input or stride 16
    when the median object spans under two stride-32 cells, nothing when it spans more."""
    from detrkit.data import Issues
    from detrkit.doctor import DatasetReport

    per_image = np.array([1, 2, 3, 4] * 25 + [9])
    small = DatasetReport(Path("i"), Path("a.json"), Issues("a.json"), image_size=96, boxes_per_image=per_image)
    small.box_pixels = np.full(int(per_image.sum()), 24.0)  # 0.75 stride-32 cells
    small.image_sizes = np.full((len(per_image), 2), 96)
    text = small.suggestions()
    queries = int(np.ceil(3 * np.quantile(per_image, 0.99)))
    assert text[0].startswith(f"model.num_queries={queries} ")
    assert "feature_level=3" in text[1] and "≈ 256" in text[1]  # 96 · 64 / 24, to a multiple of 32
    assert "suggest   model.num_queries" in small.format()
    large = dataclasses.replace(small, box_pixels=np.full(int(per_image.sum()), 100.0))
    assert len(large.suggestions()) == 1
