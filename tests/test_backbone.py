"""The backbone's three ways of computing convolution + BatchNorm (+ residual) (+ ReLU) agree.

``modules`` runs the torchvision modules one after the other (the reference); ``folded`` folds BatchNorm into the
convolution (also while training); ``fused`` adds oneDNN's post-ops, folding into a per-thread scratch buffer and
accumulating residuals in place (CPU inference).
"""

from __future__ import annotations

import pytest
import torch

from detrkit.backbone import ResNetBackbone, _onednn_post_ops_work


def _randomise_norms_(backbone: ResNetBackbone, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in backbone.modules():
            if getattr(mod, "running_var", None) is not None:
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))


def _forward(backbone: ResNetBackbone, mode: str, x, mask, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setattr(backbone, "_conv_mode", lambda _x: mode)
    try:
        return [f for f, _ in backbone(x, mask)]
    finally:
        monkeypatch.undo()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 96, generator=g)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 40:, :] = True
    mask[1, :, 70:] = True
    return x, mask


BACKBONES = [
    dict(name="resnet18", norm="frozen"),
    dict(name="resnet18", norm="batch"),
    dict(name="resnet50", norm="frozen", dilation=True),
]


@pytest.mark.parametrize("kwargs", BACKBONES, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_inference_modes_agree(kwargs, monkeypatch):
    torch.manual_seed(0)
    backbone = ResNetBackbone(return_levels=(2, 3, 4), **kwargs).eval()
    _randomise_norms_(backbone)
    x, mask = _batch()
    modes = ["modules", "folded"] + (["fused"] if _onednn_post_ops_work() else [])
    with torch.inference_mode():
        outs = {mode: _forward(backbone, mode, x, mask, monkeypatch) for mode in modes}
        # the automatic choice under inference_mode on this CPU
        auto = [f for f, _ in backbone(x, mask)]
    for mode in modes[1:]:
        for ref, out in zip(outs["modules"], outs[mode], strict=True):
            assert out.shape == ref.shape
            assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), mode
    for ref, out in zip(outs["modules"], auto, strict=True):
        assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    # padding stays exactly zero in every mode (masking is applied the same way)
    for mode in modes:
        level2 = outs[mode][0]  # stride 8: image 1 covers 5×9 of the 8×12 cells
        assert level2[1, :, 5:, :].abs().max() == 0 and level2[1, :, :, 9:].abs().max() == 0
        assert level2[1, :, :5, :9].abs().max() > 0


def test_mode_selection(monkeypatch):
    frozen = ResNetBackbone("resnet18", norm="frozen")
    trainable_bn = ResNetBackbone("resnet18", norm="batch")
    x = torch.zeros(1, 3, 32, 32)
    assert trainable_bn.train()._conv_mode(x) == "modules"  # batch statistics cannot be folded
    assert frozen.train()._conv_mode(x) == "folded"  # frozen BatchNorm folds while training too
    assert trainable_bn.eval()._conv_mode(x) == "folded"  # eval-mode statistics are constants
    with torch.no_grad():
        expected = "fused" if _onednn_post_ops_work() else "folded"
        assert frozen.eval()._conv_mode(x) == expected
        assert frozen._conv_mode(x.double()) == "folded"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert frozen._conv_mode(x) == "folded"  # autocast applies to conv2d, not to oneDNN's private ops
        # torch.compile and torch.export trace the modules, and fuse on their own
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert frozen._conv_mode(x) == "modules"


def test_folded_training_matches_modules(monkeypatch):
    """Frozen BatchNorm folded into the convolution trains the same weights: same loss and gradients."""
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", norm="frozen", trainable_stages=3, return_levels=(3, 4)).train()
    _randomise_norms_(backbone)
    x, mask = _batch()
    grads = {}
    for mode in ("modules", "folded"):
        backbone.zero_grad()
        feats = _forward(backbone, mode, x, mask, monkeypatch)
        sum(f.square().mean() for f in feats).backward()
        grads[mode] = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}
    assert grads["modules"].keys() == grads["folded"].keys() and grads["modules"]
    for name, ref in grads["modules"].items():
        assert (grads["folded"][name] - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), name


def test_fused_path_follows_weight_updates(monkeypatch):
    """Inference after an optimizer step and after load_state_dict sees the new weights."""
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", norm="frozen", trainable_stages=5, return_levels=(4,))
    _randomise_norms_(backbone)
    x, mask = _batch()

    def check() -> None:
        backbone.eval()
        with torch.inference_mode():
            auto = backbone(x, mask)[0][0]
            ref = _forward(backbone, "modules", x, mask, monkeypatch)[0]
        assert (auto - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())

    check()
    opt = torch.optim.SGD(backbone.parameters(), lr=0.5)
    backbone.train()
    backbone(x, mask)[0][0].mean().backward()
    opt.step()
    check()
    other = ResNetBackbone("resnet18", norm="frozen", trainable_stages=5, return_levels=(4,))
    _randomise_norms_(other, seed=3)
    backbone.load_state_dict(other.state_dict())
    check()


def test_inference_keeps_no_copy_of_the_weights(monkeypatch):
    """Folding writes into one scratch buffer per thread, sized to the largest convolution: nothing else is kept,
    and the buffer works under no_grad and inference_mode alike (an inference tensor could not be written under
    no_grad)."""
    import detrkit.backbone as backbone_module

    monkeypatch.setattr(backbone_module, "_SCRATCH", backbone_module.threading.local())
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", norm="frozen", return_levels=(4,)).eval()
    _randomise_norms_(backbone)
    x, mask = _batch()
    before = set(backbone.__dict__)
    with torch.inference_mode():
        first = backbone(x, mask)[0][0]
    with torch.no_grad():
        second = backbone(x, mask)[0][0]
    assert torch.equal(first, second)
    assert set(backbone.__dict__) == before  # no cache attached to the module
    buffers = backbone_module._SCRATCH.buffers
    largest = max(m.weight.numel() for m in backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert list(buffers) == [torch.float32] and buffers[torch.float32].numel() == largest


def test_concurrent_inference_threads_do_not_share_folded_weights(monkeypatch):
    """Two threads running one model at once get what each gets alone (each thread folds into its own buffer)."""
    import threading

    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", norm="frozen", return_levels=(3, 4)).eval()
    _randomise_norms_(backbone)
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(1, 3, 96, 128, generator=g) for _ in range(2)]
    with torch.inference_mode():
        alone = [[f for f, _ in backbone(x)] for x in inputs]
    results: dict[int, list] = {}

    def run(i: int) -> None:
        with torch.inference_mode():
            for _ in range(5):
                results.setdefault(i, []).append([f for f, _ in backbone(inputs[i])])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for outs in results[i]:
            for ref, out in zip(alone[i], outs, strict=True):
                assert torch.equal(ref, out)


def test_frozen_stages_train_with_gradients_to_their_inputs(monkeypatch):
    """A frozen convolution whose input needs a gradient: its folded weight must outlive the forward (the backward
    reads it), so under autograd it is not written to the scratch buffer."""
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", norm="frozen", trainable_stages=0, return_levels=(4,)).train()
    _randomise_norms_(backbone)
    x, mask = _batch()
    grads = {}
    for mode in ("modules", "folded"):
        xi = x.clone().requires_grad_(True)
        _forward(backbone, mode, xi, mask, monkeypatch)[0].square().mean().backward()
        grads[mode] = xi.grad
    assert (grads["folded"] - grads["modules"]).abs().max() <= 1e-4 * grads["modules"].abs().max()


def test_in_place_residuals_leave_returned_levels_intact():
    """The fused path accumulates each block's residual in place; the earlier levels it returns are not touched
    by the later blocks (each level's output equals the one computed with that level last)."""
    torch.manual_seed(0)
    full = ResNetBackbone("resnet50", norm="frozen", return_levels=(1, 2, 3, 4)).eval()
    _randomise_norms_(full)
    x, mask = _batch()
    with torch.inference_mode():
        levels = [f.clone() for f, _ in full(x, mask)]
        for i, level in enumerate((1, 2, 3)):
            alone = ResNetBackbone("resnet50", norm="frozen", return_levels=(level,)).eval()
            alone.load_state_dict(full.state_dict(), strict=False)  # the stages above `level` are not built
            assert torch.equal(alone(x, mask)[0][0], levels[i]), level
