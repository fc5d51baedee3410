"""The mapping between a dataset's category ids and the model's contiguous labels.

COCO numbers its 80 categories 1..90 with gaps; the model's class head wants 0..K-1. The mapping is read from the
annotation file, saved in the model's ``config.json`` and used again by post-processing, so predictions come back in
the dataset's own ids and names.

Layer: building blocks. Imports nothing from detrkit.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabelMap:
    """Contiguous label ``i`` is dataset category ``category_ids[i]`` called ``names[i]``; for panoptic data
    ``isthing[i]`` says whether it is a countable "thing" (True) or amorphous "stuff" (False), None otherwise."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    isthing: tuple[bool, ...] | None = None
    _index: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "category_ids", tuple(int(c) for c in self.category_ids))
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if len(self.category_ids) != len(self.names):
            raise ValueError(
                f"LabelMap needs one name per category id: got {len(self.category_ids)} ids and {len(self.names)} names"
            )
        if self.isthing is not None:
            object.__setattr__(self, "isthing", tuple(bool(t) for t in self.isthing))
            if len(self.isthing) != len(self.category_ids):
                raise ValueError(
                    f"LabelMap needs one isthing flag per category: got {len(self.isthing)} for "
                    f"{len(self.category_ids)} categories"
                )
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"LabelMap category ids must be unique: {list(self.category_ids)}")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.category_ids)})

    @classmethod
    def from_coco_categories(cls, categories: list[dict]) -> LabelMap:
        """Build from a COCO ``categories`` list, ordered by id (the order the official code uses)."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        isthing = tuple(bool(c["isthing"]) for c in cats) if cats and all("isthing" in c for c in cats) else None
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats), isthing=isthing)

    @classmethod
    def default(cls, num_classes: int) -> LabelMap:
        """Labels that are their own ids, for models built without a dataset."""
        return cls(tuple(range(num_classes)), tuple(f"class_{i}" for i in range(num_classes)))

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def to_label(self, category_id: int) -> int:
        try:
            return self._index[int(category_id)]
        except KeyError:
            raise KeyError(
                f"category id {category_id} is not in the label map (known ids: {list(self.category_ids)})"
            ) from None

    def to_category_id(self, label: int) -> int:
        return self.category_ids[int(label)]

    def to_dict(self) -> dict:
        d = {"category_ids": list(self.category_ids), "names": list(self.names)}
        if self.isthing is not None:
            d["isthing"] = list(self.isthing)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LabelMap:
        isthing = d.get("isthing")
        return cls(tuple(d["category_ids"]), tuple(d["names"]), isthing=tuple(isthing) if isthing else None)
