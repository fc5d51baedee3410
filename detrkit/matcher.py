"""Hungarian matching between a DETR's queries and the ground-truth boxes of each image.

Carion et al. 2020, "End-to-End Object Detection with Transformers", Sec. 3.1 and Eq. 1: the set loss needs
the one-to-one assignment of queries to targets with the lowest total cost, where the pair cost is a weighted
sum of a class cost, the L1 distance of the (normalised cxcywh) boxes and the negative generalised IoU.
Queries left over are "no object". Deformable DETR (Zhu et al. 2021) swaps the softmax class cost for a
sigmoid focal one (``focal=True``).

Tensors: B batch, Q queries, C class logits (K+1 softmax with no-object last, or K for focal), N_b targets of
image b, T = Σ N_b targets in the batch.

Speed. The official code (and transformers) builds one (B·Q) × T cost matrix over the whole batch and throws
away all but its B diagonal blocks: B times the work needed. Here each target is paired only with the Q
queries of its own image: the queries are gathered per target, which computes exactly the B blocks, stacked as
one (T, Q) tensor, with a fixed number of tensor operations whatever B is (no Python loop over images on the
device). The (T, Q) tensor goes to the CPU in one transfer; only ``scipy.optimize.linear_sum_assignment`` runs
per image.

Layer: building blocks. May import ``box_ops``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detrkit.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou

__all__ = ["HungarianMatcher", "NonFiniteCostError"]


class NonFiniteCostError(ValueError):
    """The matching cost has NaN or inf entries: the predictions (or targets) are not finite.

    A ``ValueError`` with its own type so that a training loop can treat it like a non-finite loss (skip the
    step) instead of crashing on it.
    """


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets, per image.

    Args:
        cost_class: weight of the class cost (DETR 1; Deformable / Conditional DETR 2).
        cost_bbox: weight of the L1 distance between normalised cxcywh boxes (5 in the papers).
        cost_giou: weight of the negative generalised IoU (2 in the papers).
        focal: use the sigmoid focal class cost of Deformable DETR on (B, Q, K) logits instead of the softmax
            one on (B, Q, K+1) logits.
        focal_alpha: focal cost's alpha (only with ``focal``).
        focal_gamma: focal cost's gamma (only with ``focal``).
    """

    def __init__(
        self,
        *,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        weights = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"HungarianMatcher cost weights must be >= 0, got {weights}")
        if all(w == 0 for w in weights.values()):
            raise ValueError(
                "HungarianMatcher needs at least one non-zero cost weight (cost_class, cost_bbox, "
                "cost_giou): with all three 0 every assignment costs the same"
            )
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.focal = focal
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def extra_repr(self) -> str:
        s = f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}"
        if self.focal:
            return s + f", focal=True, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        return s

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4) normalised cxcywh; others ignored.
            targets: B dicts with ``labels`` (N_b,) int64 contiguous labels and ``boxes`` (N_b, 4) normalised
                cxcywh.

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors of length min(Q, N_b): query ``pred_idx[i]``
            is matched to target ``tgt_idx[i]``; ``pred_idx`` ascending, as ``linear_sum_assignment``
            returns it in official DETR. Images without targets get two empty tensors.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch_size, num_queries, num_logits = logits.shape
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher got {len(targets)} targets for a batch of {batch_size} images")
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0 or num_queries == 0:
            return [(_empty_index(), _empty_index()) for _ in sizes]

        device = logits.device
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # (T,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device, torch.float32)  # (T, 4)
        self._check_labels(labels, num_logits)
        # image[t]: the image of target t, whose queries are the only ones target t is compared with.
        image = torch.from_numpy(np.repeat(np.arange(batch_size, dtype=np.int64), sizes)).to(device)  # (T,)

        cost = self._pair_costs(logits, boxes, image, labels, tgt_boxes)  # (T, Q)
        # One device -> host transfer for the whole batch; rows [start, start + N_b) are image b's block.
        # float64 is what scipy solves in: converted once here rather than once per image.
        cost_np = cost.to("cpu", torch.float64).numpy()
        # The float64 sum of float32 costs cannot overflow, so it is finite exactly when every cost is.
        if not math.isfinite(cost_np.sum()):
            raise self._non_finite_error(cost_np, sizes, logits, boxes, tgt_boxes)

        indices = []
        start = 0
        for n in sizes:
            if n == 0:
                indices.append((_empty_index(), _empty_index()))
                continue
            # Official DETR solves the (Q, N_b) matrix; scipy solves a tall matrix by transposing it to the
            # wide one and sorting the result by column. Doing that here on the contiguous (N_b, Q) block
            # skips scipy's transposed copy and gives the same indices, ties included.
            tgt_idx, pred_idx = linear_sum_assignment(cost_np[start : start + n])
            start += n
            order = pred_idx.argsort()
            indices.append((torch.from_numpy(pred_idx[order]), torch.from_numpy(tgt_idx[order])))
        return indices

    def _pair_costs(self, logits: Tensor, boxes: Tensor, image: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Weighted matching cost of every target against every query of its own image -> (T, Q), float32.

        Terms with weight 0 are skipped (also so that a NaN in an unused term cannot poison the cost). Most
        operations here run on (T, Q) tensors, so signs and weights are folded into as few of them as possible.
        """
        cost: Tensor | None = None

        def add(term: Tensor, weight: float) -> None:
            # cost += weight * term, reusing term's memory for the first one.
            nonlocal cost
            cost = term.mul_(weight) if cost is None else cost.add_(term, alpha=weight)

        if self.cost_class:
            if self.focal:
                # Deformable DETR's matcher: at the target's class, focal loss of a positive minus that of a
                # negative, pos - neg = -alpha (1-p)^gamma log(p) + (1-alpha) p^gamma log(1-p) (logs with
                # +1e-8). Gathered first: only T·Q of the B·Q·K sigmoids are needed.
                alpha, gamma = self.focal_alpha, self.focal_gamma
                prob = logits[image, :, labels].float().sigmoid()  # (T, Q)
                one_minus = 1 - prob
                neg = prob.pow(gamma).mul_((one_minus + 1e-8).log_())  # -neg / (1 - alpha)
                pos = one_minus.pow_(gamma).mul_((prob + 1e-8).log_())  # -pos / alpha
                add(neg.mul_(1 - alpha).sub_(pos, alpha=alpha), self.cost_class)
            else:
                # DETR approximates the NLL by 1 - prob[target class]; the constant 1 changes no matching.
                prob = logits.float().softmax(-1)  # (B, Q, K+1)
                add(prob[image, :, labels], -self.cost_class)  # (T, Q)
        if self.cost_bbox or self.cost_giou:
            # Coordinate planes, (8, T, Q): cxcywh then xyxy of the queries of each target's image. Planes
            # keep every elementwise operation on contiguous (T, Q) rows; slicing (T, Q, 4) boxes is several
            # times slower.
            pred = boxes.float().permute(2, 0, 1).contiguous()  # (4, B, Q)
            pred = torch.cat([pred, box_cxcywh_to_xyxy(pred, dim=0)]).index_select(1, image)  # (8, T, Q)
            tgt = tgt_boxes.t()  # (4, T)
            tgt = torch.cat([tgt, box_cxcywh_to_xyxy(tgt, dim=0)])[:, :, None]  # (8, T, 1)
            if self.cost_bbox:
                add((pred[:4] - tgt[:4]).abs_().sum(0), self.cost_bbox)  # (T, Q) L1, as torch.cdist(p=1)
            if self.cost_giou:
                giou = elementwise_generalized_box_iou(pred[4:], tgt[4:], dim=0)  # (T, Q)
                add(giou, -self.cost_giou)
        assert cost is not None  # at least one weight is non-zero (checked in __init__)
        return cost

    def _check_labels(self, labels: Tensor, num_logits: int) -> None:
        # An out-of-range label would index past the logits (a device-side assert on CUDA), and in softmax
        # mode the no-object index would be silently accepted as a class. One small transfer, before the cost
        # kernels.
        num_classes = num_logits if self.focal else num_logits - 1
        low, high = torch.stack(labels.aminmax()).tolist()
        if low < 0 or high >= num_classes:
            mode = "focal: K logits" if self.focal else "softmax: K+1 logits, the last one no-object"
            raise ValueError(
                f"HungarianMatcher: target labels must lie in [0, {num_classes}) for pred_logits with "
                f"{num_logits} classes ({mode}); got labels in [{low}, {high}]"
            )

    @staticmethod
    def _non_finite_error(
        cost: np.ndarray, sizes: list[int], logits: Tensor, boxes: Tensor, tgt_boxes: Tensor
    ) -> NonFiniteCostError:
        # Only built on the failure path: says where the NaN/inf came from instead of scipy's "matrix contains
        # invalid numeric entries". (transformers replaces them by the largest float, which hides a diverged
        # model.)
        bad_rows = ~np.isfinite(cost).all(axis=1)
        bad_images = sorted({int(b) for b in np.repeat(np.arange(len(sizes)), sizes)[bad_rows]})
        return NonFiniteCostError(
            f"HungarianMatcher: the matching cost has NaN or inf entries for images {bad_images}. "
            f"pred_logits finite: {bool(torch.isfinite(logits).all())}, "
            f"pred_boxes finite: {bool(torch.isfinite(boxes).all())}, "
            f"target boxes finite: {bool(torch.isfinite(tgt_boxes).all())}. Non-finite predictions mean the "
            "model has diverged (lower the learning rate, clip gradients, or check the inputs); non-finite "
            "targets mean the data pipeline produced invalid boxes."
        )


def _empty_index() -> Tensor:
    return torch.empty(0, dtype=torch.int64)
