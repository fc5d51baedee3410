import pytest
import torch

from detrkit.labels import LabelMap
from detrkit.postprocess import postprocess


def test_softmax_scaling_to_original_size_and_clamping():
    # K=2 (+ no-object). Query 0: class 1 with 0.7; query 1: class 0 with 0.2 (no-object 0.75 ignored).
    logits = torch.tensor([[[0.1, 0.7, 0.2], [0.2, 0.05, 0.75]]]).log()  # softmax(log p) = p as each row sums to 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.95, 0.1, 0.3, 0.4]]])
    result = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert len(result) == 1
    r = result[0]
    torch.testing.assert_close(r["scores"], torch.tensor([0.7, 0.2]))
    torch.testing.assert_close(r["labels"], torch.tensor([1, 0]))
    # [h, w] = [100, 200]: (0.4, 0.3, 0.6, 0.7) * (200, 100, 200, 100); the second box (0.8, -0.1, 1.1, 0.3)
    # is clamped to the image.
    torch.testing.assert_close(r["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [160.0, 0.0, 200.0, 30.0]]))


def test_threshold_top_k_and_per_image_sizes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 6, generator=g)
    boxes = torch.rand(3, 50, 4, generator=g)
    sizes = torch.tensor([[480, 640], [100, 50], [333, 500]])
    results = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, threshold=0.3, top_k=10)
    probs = logits.softmax(-1)[..., :-1].max(-1).values
    for r, p, (h, w) in zip(results, probs, sizes.tolist(), strict=True):
        expected = p.sort(descending=True).values[:10]
        expected = expected[expected > 0.3]
        torch.testing.assert_close(r["scores"], expected)
        assert r["boxes"].shape == (len(expected), 4) and r["labels"].dtype == torch.int64
        assert (r["boxes"] >= 0).all() and (r["boxes"][:, 0::2] <= w).all() and (r["boxes"][:, 1::2] <= h).all()
    all_kept = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, top_k=1000)
    assert [len(r["scores"]) for r in all_kept] == [50, 50, 50]  # top_k larger than Q keeps every query


def test_category_ids_from_label_map():
    label_map = LabelMap((1, 5, 90), ("person", "car", "toothbrush"))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 20, 4, generator=g)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(2, 20, 4, generator=g)}
    sizes = torch.tensor([[10, 10], [10, 10]])
    contiguous = postprocess(outputs, sizes)
    mapped = postprocess(outputs, sizes, label_map=label_map)
    for c, m in zip(contiguous, mapped, strict=True):
        assert m["labels"].tolist() == [label_map.to_category_id(i) for i in c["labels"].tolist()]
        assert set(m["labels"].tolist()) <= {1, 5, 90}
    with pytest.raises(ValueError, match="label_map has 3 classes"):
        postprocess(outputs, sizes, label_map=LabelMap.default(3), focal=True)


def test_focal_top_k_over_queries_and_classes():
    # K=3 sigmoid scores; query 0 is confident in two classes, so it appears twice.
    probs = torch.tensor([[[0.9, 0.8, 0.1], [0.05, 0.3, 0.2]]])
    logits = torch.logit(probs)
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]]])
    label_map = LabelMap((3, 7, 11), ("a", "b", "c"))
    (r,) = postprocess(
        {"pred_logits": logits, "pred_boxes": boxes},
        torch.tensor([[10, 20]]),
        label_map=label_map,
        threshold=0.15,
        top_k=4,
        focal=True,
    )
    torch.testing.assert_close(r["scores"], torch.tensor([0.9, 0.8, 0.3, 0.2]))
    assert r["labels"].tolist() == [3, 7, 7, 11]
    torch.testing.assert_close(
        r["boxes"],
        torch.tensor([[5.0, 2.5, 15.0, 7.5], [5.0, 2.5, 15.0, 7.5], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 5.0]]),
    )


def test_bad_arguments():
    outputs = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.zeros(2, 3, 4)}
    with pytest.raises(ValueError, match="orig_sizes"):
        postprocess(outputs, torch.tensor([100, 200]))
    with pytest.raises(ValueError, match="top_k"):
        postprocess(outputs, torch.ones(2, 2), top_k=0)
