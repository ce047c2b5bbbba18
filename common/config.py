"""One config object per component, filled from defaults < TOML file < environment < command-line flags.

Each dataclass field becomes ``--field-name`` and ``SPLITMESH_FIELD_NAME``; the field's ``help``
metadata is its one-line description. Lists are comma-separated in flags and environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ENV_PREFIX = "SPLITMESH_"


def field(default: Any, help: str) -> Any:
    """A config field with a default and a one-line description."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def _convert(raw: Any, kind: Any, name: str) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if typing.get_origin(kind) is list:
            (inner,) = typing.get_args(kind)
            items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s.strip()]
            return [_convert(item.strip() if isinstance(item, str) else item, inner, name) for item in items]
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config {name}: {exc}") from exc


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one ``--flag`` per field of ``cls`` (all default to None so unset flags fall through)."""
    parser.add_argument("--config", type=Path, default=None, help="TOML file with these settings")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{f.name.upper()})"
        if hints[f.name] is bool:
            parser.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)


def gather(cls: type[Any], args: argparse.Namespace, env: Mapping[str, str] | None = None,
           section: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw values set in the file, the environment and the flags, and where each came from
    ("config file", "environment" or "command line"); fields set nowhere are absent from both."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_path: Path | None = getattr(args, "config", None) or (
        Path(env[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in env else None)
    if config_path is not None:
        try:
            doc = tomllib.loads(config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from exc
        values.update(doc.get(section, doc) if section else doc)
        sources.update(dict.fromkeys(values, "config file"))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    for name in names:
        env_value = env.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name], sources[name] = env_value, "environment"
        flag_value = getattr(args, name, None)
        if flag_value is not None:
            values[name], sources[name] = flag_value, "command line"
    return values, sources


def build(cls: type[T], args: argparse.Namespace, env: Mapping[str, str] | None = None,
          section: str | None = None) -> T:
    """Merge file, environment and parsed flags into an instance of ``cls``."""
    return build_with_sources(cls, args, env, section)[0]


def build_with_sources(cls: type[T], args: argparse.Namespace, env: Mapping[str, str] | None = None,
                       section: str | None = None) -> tuple[T, dict[str, str]]:
    """:func:`build`, and where each explicitly set field came from (see :func:`gather`)."""
    values, sources = gather(cls, args, env, section)
    hints = typing.get_type_hints(cls)
    converted = {k: _convert(v, hints[k], k) for k, v in values.items()}
    return cls(**converted), sources


def parse(cls: type[T], argv: Sequence[str] | None, description: str, section: str | None = None) -> T:
    return parse_with_sources(cls, argv, description, section)[0]


def parse_with_sources(cls: type[T], argv: Sequence[str] | None, description: str,
                       section: str | None = None) -> tuple[T, dict[str, str]]:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        return build_with_sources(cls, args, section=section)
    except ConfigError as exc:
        parser.error(str(exc))
