"""The policy an orchestrator starts with, and why: its settings against the policy persisted by ``policy set``.

Precedence, per field: a setting given explicitly (config file, environment or command line) wins over the
persisted policy; the persisted policy wins over the defaults. So `policy set` survives restarts, and an
operator who starts the orchestrator with ``--cooldown-s 5`` gets 5 even after a `policy set cooldown_s=60`.
Every value that does not come from the defaults is logged at start with its source. A persisted record that
fails validation (e.g. written before policies were validated) is ignored, and that is logged as an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from orchestrator.config import OrchestratorConfig
from orchestrator.policy import Policy, PolicyError, policy_from_json, validated

log = logging.getLogger(__name__)

# orchestrator setting -> (policy field, factor from the setting's unit to the field's)
CONFIG_FIELDS: Mapping[str, tuple[str, float]] = {
    "adaptive": ("adaptive", 1.0),
    "decision_interval_s": ("interval_s", 1.0),
    "latency_max_ms": ("latency_max_ms", 1.0),
    "utilisation_max": ("utilisation_max", 1.0),
    "bandwidth_min_mbps": ("bandwidth_min_bps", 1e6),
    "cooldown_s": ("cooldown_s", 1.0),
    "hysteresis": ("hysteresis", 1.0),
    "ewma_alpha": ("ewma_alpha", 1.0),
    "trusted_leading_layers": ("trusted_leading_layers", 1.0),
    "trusted_trailing_layers": ("trusted_trailing_layers", 1.0),
}


def _from_config(config: OrchestratorConfig, setting: str) -> Any:
    factor = CONFIG_FIELDS[setting][1]
    value = getattr(config, setting)
    return value if isinstance(value, bool) or factor == 1.0 else value * factor


def config_policy(config: OrchestratorConfig) -> Policy:
    """The policy the settings describe alone; PolicyError names the setting that is out of range."""
    try:
        return validated({CONFIG_FIELDS[s][0]: _from_config(config, s) for s in CONFIG_FIELDS})
    except PolicyError as exc:
        settings = ", ".join(f"--{s.replace('_', '-')}" for s in CONFIG_FIELDS)
        raise PolicyError(f"{exc} (orchestrator settings {settings})") from None


def startup_policy(config: OrchestratorConfig, sources: Mapping[str, str], saved: str | None,
                   ) -> tuple[Policy, list[str]]:
    """The starting policy and one line per value not taken from the defaults (say where it came from)."""
    base = config_policy(config)  # validates the settings even when the persisted policy covers them
    lines: list[str] = []
    persisted: Policy | None = None
    if saved:
        try:
            persisted = policy_from_json(saved)
        except PolicyError as exc:
            log.error("ignoring the persisted policy: %s", exc)
    values: dict[str, Any] = persisted.model_dump() if persisted is not None else Policy().model_dump()
    explicit = {s: source for s, source in sorted(sources.items()) if s in CONFIG_FIELDS}
    given = {CONFIG_FIELDS[s][0] for s in explicit}
    if persisted is not None:
        defaults = Policy()
        lines += [f"{name}={getattr(persisted, name)!r} from the persisted policy (splitmesh policy set)"
                  for name in Policy.model_fields
                  if name not in given and getattr(persisted, name) != getattr(defaults, name)]
    for setting, source in explicit.items():
        name = CONFIG_FIELDS[setting][0]
        value = getattr(base, name)
        overridden = f", overriding the persisted {values[name]!r}" if persisted is not None and \
            values[name] != value else ""
        values[name] = value
        lines.append(f"{name}={value!r} from the {source} (--{setting.replace('_', '-')}){overridden}")
    return validated(values), lines
