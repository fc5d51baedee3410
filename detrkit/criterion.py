"""The DETR set loss: match queries to targets, then classify every query and regress the matched boxes.

Carion et al. 2020, "End-to-End Object Detection with Transformers", Sec. 3.1 (Eq. 2) and the official
``SetCriterion`` (facebookresearch/detr, models/detr.py): cross-entropy over K+1 classes with the no-object
class down-weighted by ``eos_coef``, plus L1 and GIoU losses on the matched boxes, all normalised by the
number of target boxes, repeated for every decoder layer (auxiliary losses, Sec. 3.2). ``focal=True`` replaces
the cross-entropy by the sigmoid focal loss of Deformable DETR (Zhu et al. 2021; official ``SetCriterion`` in
fundamentalvision/Deformable-DETR models/deformable_detr.py), used by Deformable and Conditional DETR.
``mask_loss=True`` adds the segmentation losses of DETR Sec. 4.4 on the last layer's matched queries: a sigmoid
focal loss per pixel and the DICE loss (Milletari et al. 2016) of each predicted mask against its target's
(official ``loss_masks``, facebookresearch/detr models/detr.py, and models/segmentation.py).
Training-only queries (``models/denoising.py``): denoising queries reconstruct the target they were copied from
without matching (DN-DETR, DINO's contrastive negatives learn "no object"); the one-to-many branch is matched to
the targets repeated (H-DETR). ``iou_aware=True`` replaces the focal loss by the varifocal loss with IoU targets.

Tensors: B batch, Q queries, K classes, C class logits (K+1 softmax with no-object last, or K focal), N_b
targets of image b, M = Σ min(Q, N_b) matched pairs; h×w the mask logits' map (a quarter of the padded input),
H×W the largest target mask of the batch.

Layer: building blocks. May import ``box_ops``, ``matcher`` and ``distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from detrkit.distributed import all_reduce_mean
from detrkit.matcher import HungarianMatcher

__all__ = ["SetCriterion", "dice_loss", "matched_query_index", "sigmoid_focal_loss"]

#: The mask logits are laid out at this stride of the padded input (``pred_masks`` is (B, Q, H/4, W/4)).
MASK_STRIDE = 4

Indices = list[tuple[Tensor, Tensor]]


class SetCriterion(nn.Module):
    """Hungarian-matched set loss for the DETR family.

    Args:
        num_classes: K, the number of real classes (without no-object).
        matcher: assigns queries to targets, e.g. ``HungarianMatcher``; called on each layer's outputs.
        eos_coef: weight of the no-object class in the cross-entropy (DETR 0.1); unused with ``focal``.
        weight_ce: weight of the classification loss in ``loss`` (DETR 1; focal models 2).
        weight_bbox: weight of the L1 box loss (5).
        weight_giou: weight of the GIoU loss (2).
        focal: sigmoid focal classification over K logits instead of softmax cross-entropy over K+1.
        focal_alpha: focal loss alpha (only with ``focal``).
        focal_gamma: focal loss gamma (only with ``focal``).
        mask_loss: add ``loss_mask`` and ``loss_dice`` on the last layer's matched ``pred_masks`` (targets then
            need ``masks``); the focal loss on the masks always uses alpha 0.25 and gamma 2, as the reference.
        weight_mask: weight of the per-pixel sigmoid focal mask loss (DETR's ``mask_loss_coef`` 1).
        weight_dice: weight of the DICE loss (DETR's ``dice_loss_coef`` 1).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: nn.Module,
        eos_coef: float = 0.1,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mask_loss: bool = False,
        weight_mask: float = 1.0,
        weight_dice: float = 1.0,
        iou_aware: bool = False,
        weight_one_to_many: float = 1.0,
    ) -> None:
        super().__init__()
        if iou_aware and not focal:
            raise ValueError(
                "SetCriterion(iou_aware=True) needs focal=True: the IoU is the target of a sigmoid score "
                "(varifocal loss); softmax classification has no such target"
            )
        if num_classes < 1:
            raise ValueError(f"SetCriterion needs num_classes >= 1, got {num_classes}")
        if isinstance(matcher, HungarianMatcher) and matcher.focal != focal:
            raise ValueError(
                f"SetCriterion(focal={focal}) got a HungarianMatcher(focal={matcher.focal}): the class cost "
                "of the matching and the classification loss must both be softmax or both be focal"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = float(eos_coef)
        self.weights = {
            "loss_ce": float(weight_ce),
            "loss_bbox": float(weight_bbox),
            "loss_giou": float(weight_giou),
        }
        self.focal = focal
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.mask_loss = bool(mask_loss)
        self.mask_weights = {"loss_mask": float(weight_mask), "loss_dice": float(weight_dice)}
        self.iou_aware = bool(iou_aware)
        self.weight_one_to_many = float(weight_one_to_many)
        # Cross-entropy class weights: 1 for the K classes, eos_coef for no-object (DETR's "empty_weight").
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def extra_repr(self) -> str:
        weights = ", ".join(f"weight_{k[5:]}={v}" for k, v in self.weights.items())
        mode = f"focal=True, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        text = f"num_classes={self.num_classes}, {weights}, " + (mode if self.focal else f"eos_coef={self.eos_coef}")
        if self.mask_loss:
            text += ", mask_loss=True, " + ", ".join(f"weight_{k[5:]}={v}" for k, v in self.mask_weights.items())
        if self.iou_aware:
            text += ", iou_aware=True"
        return text

    def match(self, outputs: dict, targets: list[dict[str, Tensor]]) -> Indices:
        """The last layer's matching, as ``forward`` computes it; pass it back as ``indices`` to reuse it.

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors, see ``HungarianMatcher.forward``.
        """
        return self.matcher(_layer(outputs), targets)

    def forward(
        self, outputs: dict, targets: list[dict[str, Tensor]], *, indices: Indices | None = None
    ) -> dict[str, Tensor]:
        """Compute the set loss of every decoder layer.

        Args:
            outputs: ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4) normalised cxcywh; optional
                ``aux_outputs`` (a list of dicts with the same two keys, one per earlier decoder layer) and
                ``enc_outputs`` (two-stage proposals, matched class-agnostically: every target labelled 0).
                With ``mask_loss``: ``pred_masks`` (B, Q, h, w), the mask logits of the padded input at
                stride 4 (last layer only). Training-only queries (``models/denoising.py``): ``denoising``
                (``pred_logits`` (B, Qd, C), ``pred_boxes``, ``aux_outputs``, ``groups``, ``parts``), trained
                without matching, and ``one_to_many`` (the same keys and ``repeat``), matched to every target
                repeated ``repeat`` times.
            targets: B dicts with ``labels`` (N_b,) int64 and ``boxes`` (N_b, 4) normalised cxcywh; with
                ``mask_loss`` also ``masks`` (N_b, H_b, W_b) bool at the image's unpadded size.
            indices: the last layer's matching if the caller has it already (``match``); computed otherwise.

        Returns:
            ``loss``: the weighted sum over all layers, to call ``backward`` on. ``loss_ce``, ``loss_bbox``,
            ``loss_giou``: the last layer's unweighted terms; ``aux/{i}/loss_ce`` (etc.) for
            ``aux_outputs[i]`` and ``enc/loss_ce`` (etc.) for ``enc_outputs``; with ``mask_loss`` the last
            layer's unweighted ``loss_mask`` and ``loss_dice``; ``dn/loss_ce`` (etc., ``dn/aux/{i}/...``) and
            ``o2m/loss_ce`` (etc.) for the training-only queries. Logged metrics of the last layer, without
            gradient: ``cardinality_error`` and ``class_error``. All are scalar tensors.
        """
        last = _layer(outputs)
        expected = self.num_classes if self.focal else self.num_classes + 1
        if last["pred_logits"].shape[-1] != expected:
            mode = "focal: K" if self.focal else "softmax: K+1 with no-object last"
            raise ValueError(
                f"SetCriterion(num_classes={self.num_classes}, focal={self.focal}) expects pred_logits with "
                f"{expected} classes ({mode}), got shape {tuple(last['pred_logits'].shape)}"
            )
        aux = list(outputs.get("aux_outputs") or [])
        device = last["pred_logits"].device
        num_boxes = self._num_boxes(targets, device)

        # Each layer is matched on its own predictions (DETR Sec. 3.2), but all decoder layers in one matcher
        # call when they share a shape: the batch of L·B images costs one device->host transfer instead of L.
        if indices is None:
            layer_indices = self._match_layers([last, *aux], targets)
        else:
            layer_indices = [indices, *self._match_layers(aux, targets)]

        matched = _Matched.gather(targets, layer_indices[0], device)
        terms = self._layer_losses(last, matched, num_boxes)
        losses = dict(terms)
        total = self._weighted(terms)
        for i, (layer, layer_idx) in enumerate(zip(aux, layer_indices[1:], strict=True)):
            terms = self._layer_losses(_layer(layer), _Matched.gather(targets, layer_idx, device), num_boxes)
            losses.update({f"aux/{i}/{k}": v for k, v in terms.items()})
            total = total + self._weighted(terms)
        if "enc_outputs" in outputs:
            # Two-stage Deformable DETR: the encoder's proposals are trained class-agnostically, every target
            # counting as class 0 (official code: bin_targets with labels zeroed).
            enc = _layer(outputs["enc_outputs"])
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_matched = _Matched.gather(agnostic, self.matcher(enc, agnostic), device)
            terms = self._layer_losses(enc, enc_matched, num_boxes)
            losses.update({f"enc/{k}": v for k, v in terms.items()})
            total = total + self._weighted(terms)

        if self.mask_loss:
            # Last layer only: the mask head runs on the final decoder embeddings (no auxiliary mask losses).
            terms = self._mask_losses(outputs, targets, layer_indices[0], num_boxes)
            losses.update(terms)
            total = total + sum(self.mask_weights[k] * v for k, v in terms.items())
        if "denoising" in outputs:
            terms, dn_total = self._denoising_losses(outputs["denoising"], targets, num_boxes)
            losses.update(terms)
            total = total + dn_total
        if "one_to_many" in outputs:
            terms, o2m_total = self._one_to_many_losses(outputs["one_to_many"], targets, num_boxes)
            losses.update(terms)
            total = total + self.weight_one_to_many * o2m_total

        losses["loss"] = total
        losses.update(self._metrics(last["pred_logits"], targets, matched))
        return losses

    def _denoising_losses(
        self, dn: dict, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The denoising queries' losses (DN-DETR Sec. 3.3; DINO Sec. 3.3), without matching: in each group, the
        positive copy of target ``s`` (slot ``s`` of part 0) reconstructs its box and class, the negative copy
        (part 1, contrastive only) is classified "no object", padding slots are ignored. Normalised by the number
        of targets times the groups, as every group is a full set of targets.

        Returns the unweighted terms (``dn/...``) and their weighted sum over layers.
        """
        logits = dn["pred_logits"]  # (B, Qd, C)
        groups, parts = int(dn["groups"]), int(dn["parts"])
        b, qd = logits.shape[:2]
        slots = qd // (groups * parts)
        device = logits.device
        sizes = [len(t["labels"]) for t in targets]
        # Query index of (group g, part 0, slot s): g·P·S + s; slot s < N_b holds target s of image b.
        batch_idx, query_idx, tgt_idx = [], [], []
        for i, n in enumerate(sizes):
            slot = torch.arange(n)
            query = (torch.arange(groups)[:, None] * (parts * slots) + slot[None]).flatten()  # (G·N_b,)
            batch_idx.append(torch.full_like(query, i))
            query_idx.append(query)
            tgt_idx.append(slot.repeat(groups))
        batch_idx_t, query_idx_t = torch.cat(batch_idx).to(device), torch.cat(query_idx).to(device)
        labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, j in zip(targets, tgt_idx, strict=True)])
        boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, j in zip(targets, tgt_idx, strict=True)])
        positives = _Matched(batch_idx_t, query_idx_t, labels.to(device), boxes.to(device))
        # padding slots (s ≥ N_b, in either part) take no loss
        slot_of_query = torch.arange(qd, device=device) % slots  # (Qd,)
        ignore = slot_of_query[None] >= torch.tensor(sizes, device=device)[:, None]  # (B, Qd)
        normaliser = num_boxes * groups

        losses: dict[str, Tensor] = {}
        total = logits.new_zeros(())
        layers = [("dn/", _layer(dn))] + [(f"dn/aux/{i}/", _layer(a)) for i, a in enumerate(dn.get("aux_outputs", []))]
        for prefix, layer in layers:
            terms = self._layer_losses(layer, positives, normaliser, ignore=ignore)
            losses.update({prefix + k: v for k, v in terms.items()})
            total = total + self._weighted(terms)
        return losses, total

    def _one_to_many_losses(
        self, o2m: dict, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> tuple[dict[str, Tensor], Tensor]:
        """H-DETR's hybrid branch (Sec. 3.2): the one-to-many queries matched, layer by layer, to the targets
        repeated ``repeat`` times, normalised by as many boxes. Returns the terms (``o2m/...``) and their
        weighted sum."""
        k = int(o2m["repeat"])
        repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
        layers = [_layer(o2m), *(_layer(a) for a in o2m.get("aux_outputs", []))]
        device = o2m["pred_logits"].device
        losses: dict[str, Tensor] = {}
        total = o2m["pred_logits"].new_zeros(())
        for i, (layer, indices) in enumerate(zip(layers, self._match_layers(layers, repeated), strict=True)):
            terms = self._layer_losses(layer, _Matched.gather(repeated, indices, device), num_boxes * k)
            prefix = "o2m/" if i == 0 else f"o2m/aux/{i - 1}/"
            losses.update({prefix + name: v for name, v in terms.items()})
            total = total + self._weighted(terms)
        return losses, total

    def _match_layers(self, layers: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> list[Indices]:
        """The matching of each layer; layers of one shape are stacked into one batch for the matcher."""
        shapes = {(layer["pred_logits"].shape, layer["pred_boxes"].shape) for layer in layers}
        if len(layers) < 2 or len(shapes) > 1:
            return [self.matcher(layer, targets) for layer in layers]
        batch = len(targets)
        stacked = {k: torch.cat([layer[k].detach() for layer in layers]) for k in ("pred_logits", "pred_boxes")}
        flat = self.matcher(stacked, targets * len(layers))
        return [flat[i : i + batch] for i in range(0, len(flat), batch)]

    def _weighted(self, terms: dict[str, Tensor]) -> Tensor:
        return sum(self.weights[k] * v for k, v in terms.items())  # type: ignore[return-value]

    def _layer_losses(
        self, layer: dict[str, Tensor], matched: _Matched, num_boxes: float, *, ignore: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Unweighted ``loss_ce``, ``loss_bbox``, ``loss_giou`` of one layer; queries where ``ignore (B,Q)`` is True
        take no classification loss (the denoising queries' padding slots)."""
        logits, boxes = layer["pred_logits"], layer["pred_boxes"]
        batch_idx, query_idx = matched.batch_idx, matched.query_idx
        src_boxes = boxes[batch_idx, query_idx]  # (M, 4)
        tgt_boxes = matched.boxes.to(src_boxes)  # (M, 4)

        # Every query gets a class target: its matched target's label, or no-object.
        num_logits = logits.shape[-1]
        no_object = num_logits if self.focal else num_logits - 1
        target_classes = torch.full(logits.shape[:2], no_object, dtype=torch.int64, device=logits.device)  # (B, Q)
        target_classes[batch_idx, query_idx] = matched.labels
        if self.focal:
            # One-hot over K; unmatched queries are all-zero rows (the official code scatters into K+1 columns
            # and drops the last one).
            onehot = F.one_hot(target_classes, num_logits + 1)[..., :-1].to(logits.dtype)  # (B, Q, K)
            if self.iou_aware:
                loss_ce = self._varifocal(logits, onehot, matched, src_boxes, tgt_boxes, num_boxes, ignore)
            elif ignore is None:
                loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=self.focal_gamma)
            else:
                elementwise = _focal_elementwise(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma)
                loss_ce = (elementwise * (~ignore)[..., None]).sum() / num_boxes
        else:
            # The weighted mean over all queries, normalised by the weight total averaged over processes (not
            # by this process's own total, as F.cross_entropy would): like ``num_boxes``, this makes N
            # processes of batch b compute the same gradient as one process of batch N·b.
            weights = self.empty_weight.to(logits.dtype)[target_classes]  # (B, Q)
            if ignore is not None:
                weights = weights * (~ignore)
            ce = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")  # (B, Q)
            # (clamped: a batch whose every query is ignored has a zero total; its loss is then 0, still in the
            # graph, so every parameter takes part in each step as DDP requires)
            loss_ce = (weights * ce).sum() / all_reduce_mean(weights.sum().detach()).clamp(min=1e-6)

        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _varifocal(
        self,
        logits: Tensor,
        onehot: Tensor,
        matched: _Matched,
        src_boxes: Tensor,
        tgt_boxes: Tensor,
        num_boxes: float,
        ignore: Tensor | None,
    ) -> Tensor:
        """IoU-aware classification: the varifocal loss (Zhang et al. 2021, "VarifocalNet", Eq. 2; RT-DETR's
        ``loss_labels_vfl``). A matched query's target at its class is its box's IoU with the target (no
        gradient), negatives are down-weighted by alpha·p^gamma as in the focal loss, positives weighted by their
        target, so the score learns to rank queries by how well they localise."""
        with torch.no_grad():
            iou = _elementwise_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))  # (M,)
            scores = torch.zeros_like(onehot)  # (B, Q, K)
            scores[matched.batch_idx, matched.query_idx] = onehot[matched.batch_idx, matched.query_idx] * iou[:, None]
            weight = self.focal_alpha * logits.sigmoid().pow(self.focal_gamma) * (1 - onehot) + scores
            if ignore is not None:
                weight = weight * (~ignore)[..., None]
        loss = F.binary_cross_entropy_with_logits(logits, scores, weight=weight, reduction="none")
        return loss.sum() / num_boxes

    def _mask_losses(
        self, outputs: dict, targets: list[dict[str, Tensor]], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """Unweighted ``loss_mask`` (per-pixel sigmoid focal) and ``loss_dice`` of the matched masks.

        As the reference ``loss_masks``, target masks are zero-padded to the batch's largest target (H, W) and
        the predictions upsampled bilinearly to that size. The reference's padded input *is* that size; detrkit
        pads its inputs further, to a multiple of 32 (``data.collate``), so the logits (a quarter of the padded
        input) are upsampled by exactly 4 — back to the padded input's grid — and cropped to (H, W). Where the
        largest target is a multiple of 4 in both sides this is the reference's computation; otherwise the
        reference stretches the map slightly, which this avoids.
        """
        if "pred_masks" not in outputs:
            raise ValueError(
                "SetCriterion(mask_loss=True) needs outputs['pred_masks'] (B, Q, H/4, W/4): build the model with masks"
            )
        pred_masks = outputs["pred_masks"]  # (B, Q, h, w)
        if pred_masks.dim() != 4 or pred_masks.shape[:2] != outputs["pred_logits"].shape[:2]:
            raise ValueError(
                f"pred_masks must be (B, Q, h, w) with the B, Q of pred_logits "
                f"{tuple(outputs['pred_logits'].shape[:2])}, got {tuple(pred_masks.shape)}"
            )
        target_masks = [_target_masks(t, b) for b, t in enumerate(targets)]
        height = max(m.shape[-2] for m in target_masks)
        width = max(m.shape[-1] for m in target_masks)
        h, w = pred_masks.shape[-2:]
        if height > MASK_STRIDE * h or width > MASK_STRIDE * w:
            raise ValueError(
                f"target masks up to {height}x{width} do not fit the padded input of pred_masks {h}x{w} "
                f"(x{MASK_STRIDE} = {MASK_STRIDE * h}x{MASK_STRIDE * w}): masks must be at the unpadded image size"
            )

        batch_idx, query_idx = matched_query_index(indices, device=pred_masks.device)
        src = pred_masks[batch_idx, query_idx]  # (M, h, w)
        if src.dtype in (torch.float16, torch.bfloat16):
            src = src.float()  # sums over ~10^6 pixels per mask
        src = F.interpolate(src[:, None], scale_factor=MASK_STRIDE, mode="bilinear", align_corners=False)
        src = src[:, 0, :height, :width].flatten(1)  # (M, H·W)
        # The matched targets, zero-padded to (H, W), in the order of matched_query_index.
        tgt = src.new_zeros(len(src), height, width)  # (M, H, W)
        start = 0
        for masks, (_, tgt_idx) in zip(target_masks, indices, strict=True):
            matched = masks[tgt_idx.to(masks.device)]  # (n_b, H_b, W_b)
            tgt[start : start + len(matched), : matched.shape[-2], : matched.shape[-1]] = matched.to(tgt)
            start += len(matched)
        tgt = tgt.flatten(1)  # (M, H·W)
        return {
            "loss_mask": _focal_elementwise(src, tgt, alpha=0.25, gamma=2.0).mean(1).sum() / num_boxes,
            "loss_dice": dice_loss(src, tgt, num_boxes),
        }

    @torch.no_grad()
    def _metrics(self, logits: Tensor, targets: list[dict[str, Tensor]], matched: _Matched) -> dict[str, Tensor]:
        """``class_error``: percent of matched queries whose best class is wrong; ``cardinality_error``."""
        if len(matched.labels):
            correct = logits[matched.batch_idx, matched.query_idx].argmax(-1) == matched.labels
            class_error = 100 - 100 * correct.float().mean()
        else:
            # Nothing matched, nothing misclassified (the official code reports 100 here).
            class_error = logits.new_zeros(())
        # Predicted objects per image: queries whose best class is not no-object; with sigmoid scores, queries
        # with some class above 0.5 (the official Deformable DETR reuses the softmax rule, which there counts
        # the queries whose best class is not the last real class).
        if self.focal:
            num_pred = (logits.max(-1).values > 0).sum(1)  # (B,)  sigmoid(x) > 0.5
        else:
            num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)  # (B,)
        num_tgt = torch.tensor([len(t["labels"]) for t in targets], device=logits.device)
        cardinality_error = (num_pred - num_tgt).abs().float().mean()
        return {"cardinality_error": cardinality_error, "class_error": class_error}

    @staticmethod
    def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
        """Target boxes per process, averaged over processes: the loss normaliser (official DETR)."""
        num_boxes = float(sum(len(t["labels"]) for t in targets))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = torch.tensor([num_boxes], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            num_boxes = total.item() / torch.distributed.get_world_size()
        # At least 1, so a batch without any target does not divide by zero.
        return max(num_boxes, 1.0)


@dataclass(frozen=True)
class _Matched:
    """One layer's matched pairs, flattened over the batch: M = Σ min(Q, N_b)."""

    batch_idx: Tensor  # (M,) image of each pair
    query_idx: Tensor  # (M,) query of each pair
    labels: Tensor  # (M,) its target's label
    boxes: Tensor  # (M, 4) its target's box, normalised cxcywh

    @staticmethod
    def gather(targets: list[dict[str, Tensor]], indices: Indices, device: torch.device) -> _Matched:
        batch_idx, query_idx = matched_query_index(indices, device=device)
        pairs = list(zip(targets, indices, strict=True))
        labels = torch.cat([t["labels"][j] for t, (_, j) in pairs]).to(device)
        boxes = torch.cat([t["boxes"][j] for t, (_, j) in pairs]).to(device)
        return _Matched(batch_idx, query_idx, labels, boxes)


def _elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of corresponding xyxy boxes ``a (M,4)``, ``b (M,4)`` → ``(M,)``; 0 for degenerate pairs."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a + area_b - inter).clamp(min=1e-7)


def _layer(outputs: dict) -> dict[str, Tensor]:
    """The two tensors a layer's loss needs (leaves ``aux_outputs`` etc. behind)."""
    return {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}


def matched_query_index(indices: Indices, *, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Flatten per-image matches into ``(batch_idx, query_idx)`` for indexing (B, Q, ...) predictions.

    ``outputs["pred_boxes"][matched_query_index(indices)]`` gives the M matched boxes, in the order of
    ``torch.cat([t["boxes"][tgt_idx] for t, (_, tgt_idx) in zip(targets, indices)])``.

    Args:
        indices: B pairs ``(pred_idx, tgt_idx)`` from the matcher.
        device: where to put the result.

    Returns:
        ``batch_idx`` (M,), ``query_idx`` (M,) int64.
    """
    query_idx = torch.cat([pred for pred, _ in indices])
    batch_idx = torch.repeat_interleave(torch.tensor([len(pred) for pred, _ in indices]))
    return batch_idx.to(device), query_idx.to(device)


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, num_boxes: float, *, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sigmoid focal loss, summed and divided by ``num_boxes``.

    Lin et al. 2017, "Focal Loss for Dense Object Detection", Eq. 5. Official Deformable DETR computes
    ``loss.mean(1).sum() / num_boxes`` and multiplies by Q: the same as summing over queries and classes.

    Args:
        logits: (B, Q, K).
        targets: (B, Q, K) one-hot (0/1) float.
        num_boxes: the normaliser.
        alpha: weight of the positives (1 - alpha for the negatives); < 0 disables it.
        gamma: focusing exponent.

    Returns:
        scalar.
    """
    return _focal_elementwise(logits, targets, alpha=alpha, gamma=gamma).sum() / num_boxes


def _focal_elementwise(logits: Tensor, targets: Tensor, *, alpha: float, gamma: float) -> Tensor:
    """The focal loss of every element (Lin et al. 2017, Eq. 5), not reduced; same shape as ``logits``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """DICE loss of each mask, ``1 - (2·Σ p·t + 1) / (Σ p + Σ t + 1)`` with p = sigmoid(logits), summed over masks
    and divided by ``num_boxes`` (DETR's ``dice_loss``; the +1 keeps empty masks finite: an empty prediction of an
    empty target costs 0).

    Args:
        logits: (M, P) mask logits, P pixels each.
        targets: (M, P) 0/1 float.
        num_boxes: the normaliser.

    Returns:
        scalar.
    """
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(1)  # (M,)
    denominator = prob.sum(1) + targets.sum(1)  # (M,)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def _target_masks(target: dict[str, Tensor], index: int) -> Tensor:
    """Image ``index``'s ``masks`` (N, H, W), checked against its labels."""
    num = len(target["labels"])
    masks = target.get("masks")
    if masks is None:
        if num == 0:
            return torch.zeros(0, 1, 1, dtype=torch.bool, device=target["labels"].device)
        raise ValueError(f"SetCriterion(mask_loss=True): target {index} has {num} labels but no 'masks'")
    if masks.dim() != 3 or len(masks) != num:
        raise ValueError(
            f"SetCriterion(mask_loss=True): target {index} needs masks (N, H, W) with N = {num} labels, "
            f"got {tuple(masks.shape)}"
        )
    return masks
