"""One declaration per architecture, and the registry derived from the declarations.

Each model file ends with ``ARCHITECTURE = Architecture(...)``: its model class, the ``ModelConfig`` fields that
belong to it alone, the fields that decide its weights (taken from the weights when fine-tuning), its own typed
options and its checks. Every table detrkit needs (the model class of an ``arch``, which fields to take from the
weights, which fields a model ignores) is derived from these declarations by importing the modules of this
package: adding an architecture means adding its model file (and, for published weights, its converter file in
``detrkit/convert/``), and nothing in the engine, the config or the CLI.

Layer: models. May import ``config``, the building blocks (backbone, position encodings, layers) and ``models.base``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig

log = logging.getLogger("detrkit")

# Fields every architecture reads. Any other ModelConfig field belongs to the architectures that declare it.
COMMON_FIELDS = frozenset(
    {
        "arch",
        "num_classes",
        "category_ids",
        "class_names",
        "class_isthing",
        "backbone",
        "backbone_weights",
        "hidden_dim",
        "num_heads",
        "enc_layers",
        "dec_layers",
        "ffn_dim",
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "num_queries",
        "class_loss",
        "aux_loss",
        "image_size",
        "max_size",
        "panoptic_threshold",
        "panoptic_merge",
        "options",
    }
)
# Common fields that decide the weights' keys or shapes, or how the weights are meant to be used.
COMMON_SHAPE_FIELDS = (
    "arch",
    "backbone",
    "hidden_dim",
    "num_heads",
    "enc_layers",
    "dec_layers",
    "ffn_dim",
    "num_queries",
)
# Shape fields a run may turn on over weights saved without them: they add a head that trains from scratch on
# top of the weights (the DETR paper's second stage: a mask head on a trained detector).
ADDED_HEAD_FIELDS = ("masks",)


@dataclass(frozen=True)
class Architecture:
    """What detrkit knows about one architecture.

    Args:
        name: the ``ModelConfig.arch`` value.
        model: the ``Detector`` subclass, built as ``model(config)``.
        fields: the ``ModelConfig`` fields this architecture reads beyond ``COMMON_FIELDS``. A field that another
            architecture declares and this one does not is reset to its default, with a warning
            (``check_config``): a ``model.num_feature_levels=2`` on DETR is never silently kept.
        shape_fields: fields beyond ``COMMON_SHAPE_FIELDS`` that decide the weights (state-dict keys and shapes,
            or what the weights mean, such as DC5 dilation): when fine-tuning they come from the weights. Options
            that do are named ``"options.<name>"``.
        options: a frozen dataclass of options that are this architecture's alone and are not ``ModelConfig``
            fields; they live in ``ModelConfig.options`` (``model.options.depth=3`` on the command line) and are
            validated by the dataclass. ``Architecture.options_of(config)`` returns the typed, filled-in options.
        defaults: ``ModelConfig`` fields that differ from the common defaults when this architecture is built
            from ``detrkit.build(arch=...)`` (e.g. YOLOS's ``backbone="vit"``).
        check: extra validation of a ``ModelConfig`` of this architecture; raises ``ValueError``.
    """

    name: str
    model: type
    fields: tuple[str, ...] = ()
    shape_fields: tuple[str, ...] = ()
    options: type | None = None
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    check: Callable[[ModelConfig], None] | None = None

    def options_of(self, config: ModelConfig) -> Any:
        """The typed options of ``config`` (defaults filled in), or None for an architecture without options."""
        if self.options is None:
            if config.options:
                raise ValueError(f"arch {self.name!r} has no options; got model.options {dict(config.options)}")
            return None
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(config.options) - known)
        if unknown:
            raise ValueError(
                f"unknown model.options for arch {self.name!r}: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        return self.options(**config.options)

    @property
    def all_shape_fields(self) -> tuple[str, ...]:
        return COMMON_SHAPE_FIELDS + self.shape_fields


@functools.cache
def architectures() -> dict[str, Architecture]:
    """Every architecture declared by a module of ``detrkit.models`` (``ARCHITECTURE = Architecture(...)``).

    The modules are found on the package's path and imported by name: the model files import this module, and
    this module never imports them by a static import, so the layers stay acyclic.
    """
    package = sys.modules[__package__]
    found: dict[str, Architecture] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__package__}.{info.name}")
        arch = getattr(module, "ARCHITECTURE", None)
        if isinstance(arch, Architecture):
            if arch.name in found:
                raise RuntimeError(f"two modules declare arch {arch.name!r}: {found[arch.name].model} and {arch.model}")
            found[arch.name] = arch
    return found


def architecture(name: str) -> Architecture:
    known = architectures()
    if name not in known:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def check_config(config: ModelConfig) -> ModelConfig:
    """Validate ``config`` against its architecture's declaration; returns it with the fields of other
    architectures back at their defaults.

    A field that belongs to other architectures only (``num_feature_levels`` on DETR, as when a Deformable DETR
    preset is trained with ``model.arch=detr``) means nothing to this one: it is reset, with a warning naming it, so
    that the saved ``config.json`` says what the model is.
    """
    arch = architecture(config.arch)
    defaults, own = ModelConfig(), set(arch.fields) | COMMON_FIELDS
    foreign = {
        name: getattr(config, name)
        for other in architectures().values()
        for name in other.fields
        if name not in own and getattr(config, name) != getattr(defaults, name)
    }
    if foreign:
        _warn_foreign(config.arch, tuple(sorted(foreign.items(), key=lambda kv: kv[0])))
        config = config.replace(**{name: getattr(defaults, name) for name in foreign})
    arch.options_of(config)
    if arch.check is not None:
        arch.check(config)
    return config


@functools.cache
def _warn_foreign(arch: str, fields: tuple[tuple[str, Any], ...]) -> None:
    """Once per architecture and set of fields: a preset trained with another ``model.arch`` would repeat it."""
    owners = {name: sorted(a.name for a in architectures().values() if name in a.fields) for name, _ in fields}
    listed = ", ".join(f"{name}={value!r} ({'/'.join(owners[name])})" for name, value in fields)
    log.warning("arch %r does not use %s: reset to the defaults", arch, listed)


def build_model(config: ModelConfig):
    """A randomly initialised ``Detector`` for ``config`` (no weights are read: see ``detrkit.checkpoint``)."""
    config = check_config(config)
    return architecture(config.arch).model(config)


def shape_fields(arch: str) -> tuple[str, ...]:
    """The fields that decide the weights of ``arch``: taken from the weights when fine-tuning."""
    return architecture(arch).all_shape_fields


def fine_tuning_config(config: ModelConfig, weights_config: ModelConfig) -> ModelConfig:
    """``config`` (a run's model section) with what decides the weights taken from ``weights_config`` (the config
    saved with the weights to fine-tune): the architecture, its shape fields and shape options
    (``"options.<name>"`` in ``shape_fields``), except a head the run adds (``ADDED_HEAD_FIELDS``: ``masks=True``
    over a detector's weights). Fields of other architectures return to their defaults."""
    arch = architecture(weights_config.arch)
    if config.arch != arch.name:
        defaults, own = ModelConfig(), set(arch.fields) | COMMON_FIELDS
        config = config.replace(**{f: getattr(defaults, f) for f in config.to_dict() if f not in own}, options={})
    fields = {k: getattr(weights_config, k) for k in arch.all_shape_fields if not k.startswith("options.")}
    for name in ADDED_HEAD_FIELDS:
        if name in fields and getattr(config, name) and not fields[name]:
            fields[name] = getattr(config, name)
    options = dict(config.options)
    for name in (k.removeprefix("options.") for k in arch.all_shape_fields if k.startswith("options.")):
        options.pop(name, None)  # absent from the weights' config: the option's default
        if name in weights_config.options:
            options[name] = weights_config.options[name]
    return config.replace(**fields, options=options)
