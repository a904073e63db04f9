"""A new run's settings: checked once before the corpus is read, then sized once its length is known.

Layers, later ones winning: the dataclass defaults, the recipe, the size preset (default recipe only),
then the settings given explicitly (``charloom train`` flags, ``charloom.train`` keywords).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..config import ConfigError, ModelConfig, TrainConfig, apply_overrides
from ..errors import CharloomError
from ..models import LanguageModel, model_class
from ..presets import RECIPES

MODEL_FIELDS = {f.name for f in fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def config_error(exc: ConfigError) -> CharloomError:
    return CharloomError("--" + exc.field.replace("_", "-"), str(exc), "see charloom train --help")


@dataclass(frozen=True)
class RunSettings:
    """A new run's settings, checked once before the corpus is read; :meth:`sized` adds what its size decides.

    Layers, later ones winning: the dataclass defaults, the recipe, the size preset (default recipe
    only, once the corpus is counted), then the settings given explicitly.
    """

    arch: type[LanguageModel]
    recipe: str
    given: dict[str, Any]  # the explicit settings, ``arch`` renamed to ``model``
    train: TrainConfig  # without the size preset: what preparing the corpus reads (tokens, lowercase, ...)

    @classmethod
    def check(cls, settings: dict[str, Any]) -> "RunSettings":
        """Refuse unknown names, recipes, architectures and out-of-range values, naming the flag."""
        if "arch" in settings and "model" not in settings:  # the name before --model
            settings = {**settings, "model": settings["arch"]}
            settings.pop("arch")
        unknown = sorted(set(settings) - MODEL_FIELDS - TRAIN_FIELDS)
        if unknown:
            raise CharloomError(f"setting {unknown[0]!r}", "unknown", "see charloom train --help for the settings")
        recipe = settings.get("recipe", "default")
        if recipe not in RECIPES:
            raise CharloomError("--recipe", f"unknown recipe {recipe!r}", f"use one of {', '.join(RECIPES)}")
        try:
            arch = model_class(settings.get("model", RECIPES[recipe]["model"].get("model", ModelConfig.model)))
        except ValueError as exc:
            raise CharloomError("--model", str(exc), "pick one of the listed architectures") from None
        _, train = _build([RECIPES[recipe]], settings)
        return cls(arch, recipe, dict(settings), train)

    def sized(self, n_train_chars: int | None, **fixed: Any) -> tuple[ModelConfig, TrainConfig]:
        """The run's configs for a training split of ``n_train_chars`` (None: no size preset), with
        ``fixed`` (what preparing the corpus decided, e.g. ``lowercase``) set as if given."""
        layers: list[dict[str, dict[str, Any]]] = [RECIPES[self.recipe]]
        if self.recipe == "default" and n_train_chars is not None:
            max_time = self.given.get("max_time", 0.0)
            layers.append(self.arch.preset(n_train_chars, max_time if isinstance(max_time, (int, float)) else 0.0))
        mcfg, tcfg = _build(layers, {**self.given, **fixed})
        if not mcfg.context:  # "the training window", fixed now so the checkpoint records it
            mcfg.context = tcfg.seq_len
        try:
            self.arch.check_config(mcfg, tcfg)
        except ConfigError as exc:
            raise config_error(exc) from None
        return mcfg, tcfg



def _build(layers: list[dict[str, dict[str, Any]]], given: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Validated configs from ``layers`` of defaults, each overriding the last, then the ``given`` settings."""
    model_values: dict[str, Any] = {}
    train_values: dict[str, Any] = {}
    for layer in layers:
        model_values.update(layer.get("model", {}))
        train_values.update(layer.get("train", {}))
    model_values.update({k: v for k, v in given.items() if k in MODEL_FIELDS})
    train_values.update({k: v for k, v in given.items() if k in TRAIN_FIELDS})
    try:
        return (apply_overrides(ModelConfig(), model_values).validate(),
                apply_overrides(TrainConfig(), train_values).validate())
    except ConfigError as exc:
        raise config_error(exc) from None
    except TypeError as exc:
        raise CharloomError("settings", str(exc), "see charloom train --help") from None


def resolve_configs(settings: dict[str, Any], n_train_chars: int | None) -> tuple[ModelConfig, TrainConfig]:
    """Defaults, then the recipe, then the size preset (default recipe), then explicit settings."""
    return RunSettings.check(settings).sized(n_train_chars)
