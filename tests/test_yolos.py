"""YOLOS: position-embedding resizing, padding independence, DeiT/ViT initialisation, parity with transformers'
``YolosForObjectDetection``, the presets, and training through the engine and the CLI."""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import detrkit
from detrkit.config import RunConfig, load_run_config
from detrkit.engine import Trainer, build_criterion
from detrkit.images import pad_batch
from detrkit.models.yolos import YOLOS, resize_patch_embeddings

COCO_MINI = Path(__file__).parent / "fixtures" / "coco_mini"
TOLERANCE = 1e-4  # float32, max abs difference of logits and of normalised boxes

TINY = dict(
    arch="yolos",
    backbone="vit",
    num_classes=3,
    hidden_dim=64,
    num_heads=4,
    enc_layers=3,
    ffn_dim=128,
    num_queries=10,
    patch_size=16,
    pretrain_image_size=(64, 96),  # a 4×6 grid, resized to every other input size
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)


def tiny_yolos(seed: int = 0, **overrides) -> YOLOS:
    torch.manual_seed(seed)
    model = detrkit.build(**{**TINY, **overrides})
    _randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values for every tensor, so that a swapped or mis-mapped weight cannot go unnoticed (LayerNorms and
    biases start as constants). Tokens and position embeddings are O(1), as trained ones are."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if any(s in name for s in ("embeddings", "token", "pos_embed")):
            values = torch.randn(t.shape, generator=g)
        elif t.dim() == 1:
            values = (
                torch.rand(t.shape, generator=g) + 0.5
                if name.endswith(".weight")
                else 0.1 * torch.randn(t.shape, generator=g)
            )
        else:
            values = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
        t.copy_(values)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))


# -- position embeddings ------------------------------------------------------------------------------------------
def test_resize_is_the_identity_at_the_pretraining_grid():
    table = torch.randn(3, 4 * 6, 8)
    assert resize_patch_embeddings(table, (4, 6), (4, 6)) is table
    # The shortcut is exact: bicubic resampling at scale 1 (align_corners=False) returns its input.
    grid = table.transpose(1, 2).reshape(3, 8, 4, 6)
    assert torch.equal(F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False), grid)
    model = tiny_yolos(mid_position_embeddings=True)
    vit = model.backbone
    assert torch.equal(vit._position_embeddings(vit.pos_embed, (4, 6), None)[:, 0], vit.pos_embed)
    assert torch.equal(vit._position_embeddings(vit.mid_pos_embed, (4, 6), None)[:, 0], vit.mid_pos_embed)


@pytest.mark.parametrize("size", [(3, 5), (6, 8), (4, 9)])
def test_resize_shapes_and_transformers_numerics(size):
    transformers = pytest.importorskip("transformers")
    from transformers.models.yolos import modeling_yolos

    model = tiny_yolos(mid_position_embeddings=True)
    vit = model.backbone
    s = 1 + size[0] * size[1] + 10
    pos = vit._position_embeddings(vit.pos_embed, size, None)
    mid = vit._position_embeddings(vit.mid_pos_embed, size, None)
    assert pos.shape == (1, 1, s, 64) and mid.shape == (2, 1, s, 64)
    patches = resize_patch_embeddings(vit.pos_embed[:, 1:25], (4, 6), size)
    assert patches.shape == (1, size[0] * size[1], 64)
    # the [CLS] and detection-token entries are never resized
    assert torch.equal(pos[0, 0, 0], vit.pos_embed[0, 0]) and torch.equal(pos[0, 0, -10:], vit.pos_embed[0, -10:])

    config = transformers.YolosConfig(
        hidden_size=64, num_hidden_layers=3, image_size=[64, 96], patch_size=16, num_detection_tokens=10
    )
    pixels = (size[0] * 16, size[1] * 16)
    with torch.no_grad():
        ref = modeling_yolos.InterpolateInitialPositionEmbeddings(config)(vit.pos_embed, pixels)
        interp = modeling_yolos.InterpolateMidPositionEmbeddings(config)
        interp.mid_position_embeddings.copy_(vit.mid_pos_embed[:, None])
        ref_mid = interp(pixels)
    assert torch.equal(pos[:, 0], ref) and torch.equal(mid[:, 0], ref_mid[:, 0])


# -- the model --------------------------------------------------------------------------------------------------
def test_outputs_have_no_auxiliary_list_and_boxes_are_normalised():
    model = tiny_yolos(aux_loss=True)  # YOLOS has one prediction stage whatever aux_loss says
    out = model(torch.randn(2, 3, 48, 80))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 10, 4) and out["pred_boxes"].shape == (2, 10, 4)
    assert bool(((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all())
    assert tiny_yolos(class_loss="focal")(torch.randn(1, 3, 32, 32))["pred_logits"].shape == (1, 10, 3)


@pytest.mark.parametrize("mid", [False, True])
def test_padding_does_not_change_an_image_outputs(mid):
    """``vit_padding="mask"``: an image's detections are the same alone and padded beside larger images, with
    several sizes in one batch (one resize per size)."""
    model = tiny_yolos(mid_position_embeddings=mid)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 64, 80, generator=g)  # a multiple of 16: a 4×5 grid, no padding alone
    b = torch.randn(3, 70, 90, generator=g)  # padded alone too (to 96×96): 5×6 patches, the last partly image
    big = torch.randn(3, 120, 150, generator=g)
    with torch.no_grad():
        alone_a = model(a[None])
        alone_b = model(*pad_batch([b]))
        batch = model(*pad_batch([a, big, b, a]))
        ignore = detrkit.build(model.config.replace(vit_padding="ignore"))
        ignore.load_state_dict(model.state_dict())
        ignored = ignore(*pad_batch([a, big, b, a]))
    diffs = [_max_diff({k: v[i : i + 1] for k, v in batch.items()}, alone) for i, alone in ((0, alone_a), (2, alone_b))]
    diffs.append(_max_diff({k: v[3:4] for k, v in batch.items()}, alone_a))
    print(f"max |Δ| alone vs padded in a batch: {max(diffs):.2e}")  # figures for the docs: pytest -s
    assert max(diffs) <= TOLERANCE, diffs
    # transformers' behaviour attends to padding: outputs then depend on the batch
    assert _max_diff({k: v[:1] for k, v in ignored.items()}, alone_a) > 1e-3
    # the image that fills the padded grid computes the same in both modes
    assert _max_diff({k: v[1:2] for k, v in batch.items()}, {k: v[1:2] for k, v in ignored.items()}) <= TOLERANCE


def test_loss_is_finite_and_gradients_reach_every_parameter():
    model = tiny_yolos(mid_position_embeddings=True, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    model.train()
    criterion = build_criterion(RunConfig(model=model.config), model.config.num_classes)
    pixel_values, padding_mask = pad_batch([torch.randn(3, 64, 96), torch.randn(3, 40, 50)])
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[0.4, 0.6, 0.5, 0.5]]), "labels": torch.tensor([1])},
    ]
    losses = criterion(model(pixel_values, padding_mask), targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad


def test_save_and_load_round_trip(tmp_path):
    model = tiny_yolos(mid_position_embeddings=True, pretrain_image_size=(48, 64))
    model.save_pretrained(tmp_path)
    loaded = detrkit.load(tmp_path)
    assert loaded.config == model.config and loaded.config.pretrain_image_size == (48, 64)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert _max_diff(loaded(x), model(x)) == 0


# -- initialising the ViT from DeiT/ViT ImageNet checkpoints ------------------------------------------------------
def _check_initialised(model: YOLOS, blocks: dict, cls: torch.Tensor, pos: torch.Tensor, before: dict) -> None:
    """``blocks``: layer i → the source's q, k, v, out weights; ``pos (1, 1 + s·s, D)`` without other tokens."""
    vit = model.backbone
    assert torch.equal(vit.cls_token, cls)
    side = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].transpose(1, 2).reshape(1, 64, side, side)
    expected = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.equal(vit.pos_embed[:, 0], pos[:, 0]) and torch.allclose(vit.pos_embed[:, 1:25], expected)
    for i, (q, k, v, o) in blocks.items():
        attn = vit.blocks[i].attn
        for ours, theirs in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v), (attn.out_proj, o)):
            assert torch.equal(ours.weight, theirs)
    # new: the detection tokens, their position embeddings, the mid-layer table and the heads are untouched
    state = model.state_dict()
    for key in (
        "backbone.det_token",
        "backbone.mid_pos_embed",
        "class_embed.layers.0.weight",
        "bbox_embed.layers.2.bias",
    ):
        assert torch.equal(state[key], before[key]), key
    assert torch.equal(vit.pos_embed[:, 25:], before["backbone.pos_embed"][:, 25:])


def _random_init(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return detrkit.build(**{**TINY, "enc_layers": 2, "mid_position_embeddings": True}).state_dict()


def test_init_from_a_timm_deit_checkpoint(tmp_path, caplog):
    timm = pytest.importorskip("timm")
    src = timm.models.vision_transformer.VisionTransformer(
        img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=7
    ).eval()
    _randomize_(src, 3)
    path = tmp_path / "deit.pth"
    torch.save({"model": src.state_dict(), "epoch": 300}, path)  # as DeiT releases them

    before = _random_init()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="detrkit"):
        model = detrkit.build(
            **{**TINY, "enc_layers": 2, "mid_position_embeddings": True, "backbone_weights": str(path)}
        ).eval()
    blocks = {i: (*src.blocks[i].attn.qkv.weight.chunk(3), src.blocks[i].attn.proj.weight) for i in range(2)}
    _check_initialised(model, blocks, src.cls_token, src.pos_embed, before)
    assert "timm layout" in caplog.text and "3×3 → 4×6" in caplog.text
    assert "head.weight" in caplog.text and "det_token" in caplog.text
    # the same computation as timm's blocks (LayerNorm eps 1e-6 there, 1e-12 here)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        for ours, theirs in zip(model.backbone.blocks, src.blocks, strict=True):
            assert (ours(x) - theirs(x)).abs().max() <= TOLERANCE
        assert torch.allclose(
            model.backbone.patch_embed(torch.ones(1, 3, 16, 16)), src.patch_embed.proj(torch.ones(1, 3, 16, 16))
        )


@pytest.mark.parametrize("kind", ["vit-folder", "deit-distilled-safetensors"])
def test_init_from_a_transformers_checkpoint(tmp_path, kind, caplog):
    """A ViT ``save_pretrained`` folder (``vit.`` keys), and a distilled DeiT's ``state_dict()`` in one safetensors
    file (``deit.`` keys, 5.x in-memory names, a distillation token)."""
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=16)
    if kind == "vit-folder":
        src = transformers.ViTForImageClassification(transformers.ViTConfig(image_size=32, **kwargs)).eval()
        _randomize_(src, 4)
        src.save_pretrained(tmp_path)
        vit, path, state = src.vit, tmp_path, load_file(str(tmp_path / "model.safetensors"))
        assert "vit.encoder.layer.0.attention.attention.query.weight" in state
    else:
        src = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(image_size=32, **kwargs))
        _randomize_(src.eval(), 4)
        vit, path, state = src.deit, tmp_path / "deit.safetensors", src.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        assert "deit.embeddings.distillation_token" in state

    before = _random_init()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="detrkit"):
        model = detrkit.build(
            **{**TINY, "enc_layers": 2, "mid_position_embeddings": True, "backbone_weights": str(path)}
        ).eval()
    layers = getattr(vit, "layers", None) or vit.encoder.layer
    blocks = {}
    for i, layer in enumerate(layers):
        a = layer.attention
        names = ("q_proj", "k_proj", "v_proj", "o_proj") if hasattr(a, "q_proj") else None
        mods = (
            [getattr(a, n) for n in names]
            if names
            else [a.attention.query, a.attention.key, a.attention.value, a.output.dense]
        )
        blocks[i] = tuple(m.weight for m in mods)
    pos = vit.embeddings.position_embeddings
    if kind != "vit-folder":  # [CLS], distillation token, patches: the distillation entry is dropped
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        assert "distillation token" in caplog.text
    _check_initialised(model, blocks, vit.embeddings.cls_token, pos, before)
    assert "transformers" in caplog.text and "2×2 → 4×6" in caplog.text
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        for ours, theirs in zip(model.backbone.blocks, layers, strict=True):
            out = theirs(x)
            out = out[0] if isinstance(out, tuple) else out
            assert (ours(x) - out).abs().max() <= TOLERANCE


def test_backbone_weights_that_do_not_fit_are_refused(tmp_path):
    timm = pytest.importorskip("timm")
    src = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0
    )
    torch.save(src.state_dict(), tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"3 blocks[\s\S]*blocks\.2\.attn\.q_proj\.weight"):
        detrkit.build(**{**TINY, "enc_layers": 2, "backbone_weights": str(tmp_path / "deep.pth")})
    state = src.state_dict()
    state["blocks.0.ls1.gamma"] = torch.ones(64)  # layer scale: a ViT detrkit does not compute
    save_file(state, str(tmp_path / "cait.safetensors"))
    with pytest.raises(ValueError, match="blocks.0.ls1.gamma"):
        detrkit.build(**{**TINY, "backbone_weights": str(tmp_path / "cait.safetensors")})
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        detrkit.build(**{**TINY, "backbone_weights": str(tmp_path / "nope.pth")})


# -- parity with transformers ------------------------------------------------------------------------------------
def _hf_yolos(mid: bool, seed: int = 0, **overrides):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(
        num_labels=3,
        id2label={0: "N/A", 1: "cat", 2: "dog"},
        label2id={"N/A": 0, "cat": 1, "dog": 2},
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=[64, 96],
        patch_size=16,
        num_detection_tokens=10,
        use_mid_position_embeddings=mid,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.YolosForObjectDetection(transformers.YolosConfig(**kwargs))
    _randomize_(model, seed)
    return model.eval()


@pytest.mark.parametrize("mid", [False, True], ids=["no-mid-pe", "mid-pe"])
def test_parity_with_transformers(tmp_path, mid):
    """Random weights written by ``save_pretrained``, read by ``detrkit.load``: the same outputs at two input sizes
    other than the pre-training size (transformers ignores padding, so the batches are unpadded)."""
    hf = _hf_yolos(mid)
    hf.save_pretrained(tmp_path)
    ours = detrkit.load(tmp_path)
    c = ours.config
    assert (c.arch, c.hidden_dim, c.num_heads, c.enc_layers, c.ffn_dim) == ("yolos", 64, 4, 3, 128)
    assert (c.num_queries, c.patch_size, c.pretrain_image_size, c.mid_position_embeddings) == (10, 16, (64, 96), mid)
    assert c.vit_padding == "ignore" and c.aux_loss is False and c.num_classes == 3
    assert ours.label_map.names == ("N/A", "cat", "dog")
    masked = detrkit.load(tmp_path, vit_padding="mask")
    g = torch.Generator().manual_seed(0)
    for size in [(48, 80), (96, 128)]:
        pixel_values = torch.randn(2, 3, *size, generator=g)
        with torch.no_grad():
            ref = hf(pixel_values=pixel_values)
            out = ours(pixel_values)
            out_masked = masked(pixel_values, torch.zeros(2, *size, dtype=torch.bool))
        diffs = [(o["pred_logits"] - ref.logits).abs().max().item() for o in (out, out_masked)] + [
            (o["pred_boxes"] - ref.pred_boxes).abs().max().item() for o in (out, out_masked)
        ]
        print(f"{size}: max |Δ| logits {max(diffs[:2]):.2e}, boxes {max(diffs[2:]):.2e}")
        assert max(diffs) <= TOLERANCE, diffs


def test_transformers_in_memory_names(tmp_path):
    """``model.state_dict()`` saved as is: the mid-layer table under ``vit.encoder.interpolation.``."""
    hf = _hf_yolos(True)
    hf.save_pretrained(tmp_path)
    state = hf.state_dict()
    assert "vit.encoder.interpolation.mid_position_embeddings" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    ours = detrkit.load(tmp_path)
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        assert (ours(x)["pred_logits"] - ref.logits).abs().max() <= TOLERANCE


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("qkv_bias", False, "qkv_bias=False"),
        ("hidden_act", "relu", "activation 'relu'"),
        ("layer_norm_eps", 1e-6, "layer_norm_eps"),
        ("patch_size", [16, 8], "non-square"),
    ],
)
def test_configs_detrkit_cannot_reproduce_are_refused(tmp_path, field, value, message):
    _hf_yolos(False).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        detrkit.load(tmp_path)


# -- presets and training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, dims, params",
    [("yolos_ti", (192, 3, 768, False, (800, 1333)), 6.5), ("yolos_s", (384, 6, 1536, True, (512, 864)), 30.7)],
)
def test_presets_have_the_paper_architectures(name, dims, params):
    config = load_run_config(name)
    m = config.model
    assert (m.hidden_dim, m.num_heads, m.ffn_dim, m.mid_position_embeddings, m.pretrain_image_size) == dims
    assert (m.arch, m.enc_layers, m.num_queries, m.aux_loss) == ("yolos", 12, 100, False)
    assert config.train.lr == config.train.lr_backbone and config.train.schedule == "cosine"
    with torch.device("meta"):
        model = detrkit.build(m.replace(num_classes=91))
    assert abs(model.num_parameters() / 1e6 - params) < 0.1  # the paper's parameter counts (Table 2)


def _coco_mini_overrides(out: Path, *extra: str) -> list[str]:
    return [
        f"data.train_images={COCO_MINI / 'images'}",
        f"data.train_annotations={COCO_MINI / 'annotations.json'}",
        "data.val_images=",
        "data.val_annotations=",
        "data.train_scales=[64,80]",
        "data.train_max_size=96",
        "data.crop_resize=[64]",
        "data.crop_size=[48,64]",
        "data.eval_size=64",
        "data.eval_max_size=96",
        "data.num_workers=0",
        "model.hidden_dim=32",
        "model.num_heads=2",
        "model.enc_layers=2",
        "model.ffn_dim=64",
        "model.num_queries=10",
        "model.pretrain_image_size=[64,96]",
        "model.dropout=0.1",
        f"train.output_dir={out}",
        "train.epochs=2",
        "train.batch_size=2",
        "train.max_steps_per_epoch=2",
        "train.warmup_steps=2",
        "train.lr=1e-3",
        "train.lr_backbone=1e-3",
        "train.log_every=1",
        "train.report=false",  # report.html and query statistics are test_report.py's
        "train.query_stats_images=0",
        *extra,
    ]


def test_cli_trains_and_evaluates_a_tiny_yolos_on_coco_mini(tmp_path):
    from detrkit.cli import main

    run = tmp_path / "run"
    overrides = _coco_mini_overrides(run, "train.epochs=1", "train.eval_every=1")
    overrides[2:4] = [
        f"data.val_images={COCO_MINI / 'images'}",
        f"data.val_annotations={COCO_MINI / 'annotations.json'}",
    ]
    assert main(["train", "yolos_s", *overrides]) == 0
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in steps if r["type"] == "step")
    assert "AP" in json.loads((run / "metrics.json").read_text())
    model = detrkit.load(run / "model")
    assert isinstance(model, YOLOS) and model.config.mid_position_embeddings and model.config.num_classes == 80
    det = model.predict(sorted((COCO_MINI / "images").glob("*.jpg"))[:2], threshold=0.0, top_k=5)
    assert [len(d) for d in det] == [5, 5] and set(det[0].labels.tolist()) <= set(model.label_map.category_ids)


class _StopAfter(torch.nn.Module):
    """Wraps a criterion and raises the trainer's stop flag (as SIGTERM does) during call ``n``."""

    def __init__(self, trainer: Trainer, n: int) -> None:
        super().__init__()
        self.trainer, self.inner, self.n, self.calls = trainer, trainer.criterion, n, 0

    def forward(self, outputs, targets):
        self.calls += 1
        if self.calls == self.n:
            self.trainer._stop_signal = signal.SIGTERM
        return self.inner(outputs, targets)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    extra = ("train.deterministic=true",)
    Trainer(load_run_config("yolos_ti", _coco_mini_overrides(tmp_path / "a", *extra))).fit()

    config = load_run_config("yolos_ti", _coco_mini_overrides(tmp_path / "b", *extra))
    interrupted = Trainer(config)
    interrupted.criterion = _StopAfter(interrupted, 3)  # mid-epoch 2
    interrupted.fit()
    assert interrupted.state.global_step == 3 and not (tmp_path / "b" / "model").exists()
    resumed = Trainer(config, resume="auto")
    assert resumed.state.global_step == 3
    resumed.fit()
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
