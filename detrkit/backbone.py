"""ResNet backbones with frozen BatchNorm, optional DC5 dilation, and padding-exact masking.

Shapes: B batch, H×W padded input, h_l×w_l the feature map of level l (stride 4, 8, 16, 32 for layer1..4).

Why the masking: a convolution at the border of an image sees zeros beyond it when the image is alone, but sees the
(non-zero) features of padded pixels when the image was padded to share a batch with a larger one. That makes an
image's detections depend on its batch. Zeroing padded positions before every spatial convolution and pooling makes
the padded computation equal to the unpadded one, position for position, at a cost of one multiply per block.

Layer: building blocks. Imports torch and torchvision only.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}

# ModelConfig fields read by the architectures built on ResNetBackbone (their declarations list them).
RESNET_CONFIG_FIELDS = (
    "dilation",
    "trainable_stages",
    "backbone_norm",
    "mask_backbone_padding",
    "position_embedding",
    "position_temperature",
)
# ... and those of them that decide the weights (frozen vs trainable BatchNorm changes the state dict's keys).
RESNET_SHAPE_FIELDS = ("dilation", "position_embedding", "backbone_norm")


def check_resnet_config(config: Any) -> None:
    """Refuse a ``ModelConfig`` whose backbone is not one of the ResNets (a check of ResNet architectures)."""
    if config.backbone not in RESNET_CHANNELS:
        raise ValueError(f"unknown backbone {config.backbone!r} for {config.arch}; known: {', '.join(RESNET_CHANNELS)}")


def exporting() -> bool:
    """Whether ``torch.onnx.export`` or ``torch.export`` is tracing the model. Data-dependent shortcuts (``if
    mask.any()``) must then take their general path: a trace records the branch its example took, and a graph
    that skips the masking because the example had no padding is silently wrong on a padded batch."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _stride_mask(valid: Tensor, stride: int) -> Tensor:
    """Validity of feature cells at ``stride`` from pixel validity ``valid (B,H,W)`` → ``(B,1,ceil(H/s),ceil(W/s))``.

    A cell is valid when its top-left pixel is: for an image in the top-left corner of a padded canvas this is
    exactly the ``ceil(size/stride)`` cells a stride-``s`` network computes for the image alone, whatever the
    padded size.
    """
    return valid[:, None, ::stride, ::stride]


class ResNetBackbone(nn.Module):
    """A torchvision ResNet body (no pooling head) returning the feature maps of the requested levels.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        dilation: replace the stride of the last stage with dilation (DETR-DC5): level 4 at stride 16.
        trainable_stages: how many of the last stages (layer4, layer3, ...) train; 0 freezes the whole body,
            5 also trains the stem. The DETR recipe trains layer2-4 (3).
        return_levels: which of levels 1..4 (layer1..layer4) to return, lowest stride first.
        weights: a torchvision weights name such as ``"IMAGENET1K_V1"`` (downloaded by torchvision when asked for;
            ``None`` leaves the random initialisation).
        mask_padding: zero padded positions before each spatial convolution (see the module docstring).
        norm: ``"frozen"`` (FrozenBatchNorm2d, the DETR recipe for ImageNet-initialised backbones) or ``"batch"``
            (trainable BatchNorm2d, for backbones trained from scratch, where frozen statistics of a random
            initialisation would leave the network unnormalised).
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        dilation: bool = False,
        trainable_stages: int = 3,
        return_levels: tuple[int, ...] = (4,),
        weights: str | None = None,
        mask_padding: bool = True,
        norm: str = "frozen",
    ) -> None:
        super().__init__()
        if norm not in ("frozen", "batch"):
            raise ValueError(f"backbone norm must be 'frozen' or 'batch', got {norm!r}")
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNET_CHANNELS)}")
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5, got {trainable_stages}")
        if not return_levels or any(lvl not in (1, 2, 3, 4) for lvl in return_levels):
            raise ValueError(f"return_levels must be a non-empty subset of (1, 2, 3, 4), got {return_levels}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), not {name}")
        body = getattr(torchvision.models, name)(
            weights=weights,
            norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d,
            replace_stride_with_dilation=[False, False, dilation] if name in ("resnet50", "resnet101") else None,
        )
        del body.fc, body.avgpool
        for level in range(max(return_levels) + 1, 5):  # stages above the last one used would get no gradient
            delattr(body, f"layer{level}")
        self.body = body
        self.return_levels = tuple(sorted(return_levels))
        self.mask_padding = mask_padding
        self.strides = (4, 8, 16, 16 if dilation else 32)
        self.num_channels = tuple(RESNET_CHANNELS[name][lvl - 1] for lvl in self.return_levels)
        self.level_strides = tuple(self.strides[lvl - 1] for lvl in self.return_levels)

        stages = [("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1")]
        trainable = tuple(prefix for stage in stages[:trainable_stages] for prefix in stage)
        for pname, p in self.body.named_parameters():
            p.requires_grad_(pname.startswith(trainable) if trainable else False)

    def forward(self, pixel_values: Tensor, padding_mask: Tensor | None = None) -> list[tuple[Tensor, Tensor | None]]:
        """Args: ``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` True on padding, or None.

        Returns, per requested level: ``(features (B,C_l,h_l,w_l), padding_mask (B,h_l,w_l) or None)``; the
        features are channels-last in memory when the folded path ran (see :meth:`_conv`).
        """
        masking = self.mask_padding and padding_mask is not None and (exporting() or bool(padding_mask.any()))
        valid = ~padding_mask if padding_mask is not None else None
        cache: dict[int, Tensor] = {}

        def mask(x: Tensor, stride: int) -> Tensor:
            if not masking:
                return x
            if stride not in cache:
                cache[stride] = _stride_mask(valid, stride).to(x.dtype)
            return x * cache[stride]

        mode = self._conv_mode(pixel_values)
        if mode != "modules":
            # oneDNN and cuDNN convolutions are fastest in channels-last layout (NCHW inputs get reordered inside
            # every convolution); measured 25% on ResNet-50 inference here
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        b = self.body
        x = mask(pixel_values, 1)
        x = self._conv(mode, b.conv1, b.bn1, x, relu=True)
        x = b.maxpool(mask(x, 2))  # post-ReLU features are ≥ 0, so zeroed padding never wins a max
        stride = 4
        x = mask(x, stride)
        outputs: dict[int, Tensor] = {}
        for level in range(1, max(self.return_levels) + 1):
            layer = getattr(b, f"layer{level}")
            out_stride = self.strides[level - 1]
            for block in layer:
                x = self._block(mode, block, x, mask, stride)
                stride = out_stride
            if level in self.return_levels:
                outputs[level] = x
        result = []
        for level, stride in zip(self.return_levels, self.level_strides, strict=True):
            feat = outputs[level]
            if padding_mask is None:
                level_mask = None
            elif self.mask_padding:
                level_mask = padding_mask[:, ::stride, ::stride]
            else:
                # The reference implementations' rule: nearest-neighbour resize of the pixel mask. It equals the
                # strided rule when the padded size is a multiple of the stride.
                level_mask = F.interpolate(padding_mask[None].float(), size=feat.shape[-2:])[0].bool()
            result.append((feat, level_mask))
        return result

    # -- convolution + normalisation, three ways ---------------------------------------------------------------
    def _conv_mode(self, x: Tensor) -> str:
        """How this forward computes each convolution + BatchNorm (+ residual) (+ ReLU):

        - ``"modules"``: the modules one after the other. Needed while a trainable BatchNorm computes batch
          statistics, and used under tracing, export and ``torch.compile`` (which fuse on their own).
        - ``"folded"``: one convolution whose weight and bias fold the (frozen or eval-mode) BatchNorm in: no
          per-channel affine pass over each feature map, forward or backward. Gradients reach the convolution
          weights through the folding, so this also trains (frozen BatchNorm, the DETR recipe).
        - ``"fused"``: no gradient, float32 on a CPU with oneDNN: the folded convolution with its ReLU, or its
          residual addition and ReLU, applied inside oneDNN's convolution (post-ops), the weights folded anew each
          call (see :meth:`_folded`). The default inference path: 13% faster than "folded" on
          ResNet-50 at 800×1216 here.
        """
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return "modules"
        if self.training and any(isinstance(m, nn.BatchNorm2d) for m in self.body.modules()):
            return "modules"
        if (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and _onednn_post_ops_work()
        ):
            return "fused"
        return "folded"

    def _folded(self, conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
        """``conv`` then ``bn`` as one convolution's (weight, bias), channels-last.

        With gradients off, the folded weight on a CPU is written into this thread's scratch buffer and is
        valid only until this thread's next call: the convolution that asked for it runs at once. Folding anew each
        forward costs no measurable time (DETR-R50, batch 1: 411 vs 417 ms at 512×512, 1278 vs 1265 ms at
        800×1216, against a cache of folded weights) and, unlike such a cache, keeps no second copy of the
        backbone (ResNet-50: 90 MiB of peak RSS) and cannot outlive an in-place weight update.
        """
        # Under autograd even a frozen weight must outlive this call (a convolution's backward reads it).
        weight, bias = _fold(conv, bn, out=None if torch.is_grad_enabled() else _scratch(conv.weight))
        return weight.contiguous(memory_format=torch.channels_last), bias

    def _conv(
        self, mode: str, conv: nn.Conv2d, bn: nn.Module, x: Tensor, *, relu: bool, residual: Tensor | None = None
    ) -> Tensor:
        """``relu?(bn(conv(x)) + residual?)``, computed the way ``mode`` says (see :meth:`_conv_mode`)."""
        if mode == "modules":
            out = bn(conv(x))
            if residual is not None:
                out = out + residual
            return F.relu(out, inplace=True) if relu else out
        weight, bias = self._folded(conv, bn)
        if mode == "fused":
            args = (weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if relu else "none", [], "")
            if residual.is_contiguous(memory_format=torch.channels_last):
                # Accumulate into the residual: it is the block's input or its downsampled copy, neither read
                # again, and no gradient runs here. One feature map fewer alive at the block's peak (DETR-R50 at
                # 800×1216: -70 MiB peak RSS), outputs bit-identical.
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    residual, x, *args, "add", None, "relu" if relu else None, [], ""
                )
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, *args, "add", None, "relu" if relu else None, [], ""
            )
        out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if residual is not None:
            out = out + residual
        return F.relu(out, inplace=True) if relu else out

    @torch.no_grad()
    def fold_batchnorm(self) -> int:
        """Fold every BatchNorm (frozen, or trainable in eval mode) into the convolution before it, for inference:
        one convolution with a bias instead of a convolution and a per-channel affine pass over the whole feature
        map. Returns the number of folded pairs. The backbone is inference-only afterwards (the statistics are
        gone); outputs change only by float rounding.
        """
        pairs: list[tuple[nn.Module, str, str]] = [(self.body, "conv1", "bn1")]
        for module in self.body.modules():
            if isinstance(module, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)):
                pairs += [(module, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(module, f"bn{i}")]
                if module.downsample is not None:
                    pairs.append((module.downsample, "0", "1"))
        folded = 0
        for parent, conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if isinstance(bn, nn.Identity):
                continue
            if isinstance(bn, nn.BatchNorm2d) and bn.training:
                raise RuntimeError("fold_batchnorm() folds running statistics: call model.eval() first")
            weight, bias = _fold(conv, bn)
            fused = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=True,
            ).to(device=conv.weight.device, dtype=conv.weight.dtype)
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)
            fused.requires_grad_(False)
            setattr(parent, conv_name, fused)
            setattr(parent, bn_name, nn.Identity())
            folded += 1
        return folded

    def _block(self, mode: str, block: nn.Module, x: Tensor, mask, stride_in: int) -> Tensor:
        """A torchvision BasicBlock/Bottleneck forward with padded positions zeroed before spatial convolutions.

        ``x`` arrives masked at ``stride_in``; the block's output is masked at its own stride.
        """
        downsample = block.downsample
        identity = x if downsample is None else self._conv(mode, downsample[0], downsample[1], x, relu=False)
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            out = self._conv(mode, block.conv1, block.bn1, x, relu=True)  # 1x1: no spatial mixing
            out = mask(out, stride_in)
            out = self._conv(mode, block.conv2, block.bn2, out, relu=True)
            out = self._conv(mode, block.conv3, block.bn3, out, relu=True, residual=identity)
            return mask(out, stride_in * block.conv2.stride[0])
        out = self._conv(mode, block.conv1, block.bn1, x, relu=True)
        out = mask(out, stride_in * block.conv1.stride[0])
        out = self._conv(mode, block.conv2, block.bn2, out, relu=True, residual=identity)
        return mask(out, stride_in * block.conv1.stride[0])


def _fold(conv: nn.Conv2d, bn: nn.Module, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the convolution equal to ``bn(conv(x))``, with ``bn`` applying its running statistics
    (FrozenBatchNorm2d, or BatchNorm2d in eval mode; an Identity when already folded). Differentiable unless
    ``out`` (a tensor of the weight's shape, any strides) is given to receive the weight."""
    bias = conv.bias if conv.bias is not None else torch.zeros_like(conv.weight[:, 0, 0, 0])
    if isinstance(bn, nn.Identity):
        if out is None or conv.weight.is_contiguous(memory_format=torch.channels_last):
            return conv.weight, bias
        return out.copy_(conv.weight), bias
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    weight = torch.mul(conv.weight, scale[:, None, None, None], **({} if out is None else {"out": out}))
    return weight, (bias - bn.running_mean) * scale + bn.bias


_SCRATCH = threading.local()  # per thread: concurrent inference on one model must not share a buffer


def _scratch(weight: Tensor) -> Tensor | None:
    """A channels-last tensor shaped like the convolution ``weight (O, I, kh, kw)`` in this thread's reusable
    buffer (grown to the largest weight: ResNet-50's 512×512×3×3, 9 MiB), or None off the CPU, where the caching
    allocator already makes a fresh tensor cheap. Reusing it spares the page faults of a new allocation per
    convolution, which made an unbuffered fold cost 5% of a 512×512 forward."""
    if weight.device.type != "cpu":
        return None
    buffers: dict[torch.dtype, Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(weight.dtype)
    if buffer is None or buffer.numel() < weight.numel():
        with torch.inference_mode(False):  # a normal tensor: writable under no_grad and inference_mode alike
            buffer = buffers[weight.dtype] = torch.empty(weight.numel(), dtype=weight.dtype)
    o, i, kh, kw = weight.shape
    return buffer[: weight.numel()].view(o, kh, kw, i).permute(0, 3, 1, 2)  # (O, I, kh, kw), channels-last


@functools.cache
def _onednn_post_ops_work() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution ops (private: ``torch.ops.mkldnn``, what
    ``torch.compile`` emits on CPUs) and they compute what ``conv2d`` + add + ReLU do. Probed once."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    b, r = torch.randn(8, generator=g), torch.randn(1, 8, 6, 5, generator=g)
    try:
        with torch.no_grad():
            ref = F.relu(F.conv2d(x, w, b, 1, 1) + r)
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                x, r, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu", [], ""
            )
            plain = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(out, ref, atol=1e-4) and torch.allclose(plain, F.conv2d(x, w, b, 1, 1), atol=1e-4))
