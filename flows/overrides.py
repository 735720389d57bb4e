"""Build a PipelineConfig from a preset name and `--set a.b=v` overrides, with one-line errors."""
from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError

from model.config import PipelineConfig, one_line


class ConfigError(ValueError):
    """Unknown preset, unknown key or wrong value type; the message says which and how to fix it."""


def with_prices(cfg: PipelineConfig, path: str | None) -> PipelineConfig:
    """`cfg` with the user's price file in it (`path`, else $CHATFORGE_HOME/prices.toml when it exists), read
    now: a bad file fails before anything runs."""
    from artifacts.prices import user_file

    price_file, file_prices = user_file(path)
    cost = cfg.cost.model_copy(update={"price_file": price_file, "file_prices": file_prices})
    return cfg.model_copy(update={"cost": cost})


def build_config(preset: str = "tiny", sets: list[str] | None = None) -> PipelineConfig:
    from .presets import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    if not sets:
        return cfg
    tree = cfg.model_dump(mode="json")
    for item in sets:
        path, value, raw = _parse(item)
        _assign(tree, cfg, path, value, raw)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None


def _parse(item: str) -> tuple[list[str], object, str]:
    if "=" not in item:
        raise ConfigError(f"bad --set {item!r}: write it as key.path=value, e.g. tokenizer.vocab_size=8192")
    path, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string
    return path.strip().split("."), value, raw


def _assign(tree: dict, model: BaseModel, path: list[str], value, raw: str) -> None:
    """Walk the path against the typed model (so unknown keys are named), then set it in the dict tree."""
    node, obj, done = tree, model, []
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(obj, list):
            if not part.isdigit() or int(part) >= len(obj):
                raise ConfigError(f"bad --set key {'.'.join(path)!r}: {'.'.join(done)} has items 0..{len(obj) - 1}")
            idx = int(part)
            child_obj, container, slot = obj[idx], node, idx
        elif isinstance(obj, BaseModel):
            fields = type(obj).model_fields
            if part not in fields:
                where = ".".join(done) or "the config"
                raise ConfigError(
                    f"unknown --set key {'.'.join(path)!r}: {where} has {', '.join(fields)}"
                )
            child_obj, container, slot = getattr(obj, part), node, part
        elif isinstance(obj, dict):
            child_obj, container, slot = obj.get(part), node, part
        else:
            raise ConfigError(f"unknown --set key {'.'.join(path)!r}: {'.'.join(done)} is a plain value")
        done.append(part)
        if last:
            # a string field takes the text as typed (revision=1 means the tag "1", not the number)
            container[slot] = raw if isinstance(child_obj, str) else value
            return
        node, obj = container[slot], child_obj
