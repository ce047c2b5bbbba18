"""The adaptive loop's policy: thresholds, weights and request shape, readable and settable at run time.

Flattened to ``name -> text`` for the Admin API and the CLI (``splitmesh policy get|set``), validated
as a whole, and persisted so a restart keeps what the operator set.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.planning import DecisionConfig, Workload


@dataclass(frozen=True)
class Policy:
    adaptive: bool = True  # run the decision loop; off = plans change only by operator action or node loss
    interval_s: float = 1.0  # monitoring period: one decision per interval
    decision: DecisionConfig = field(default_factory=DecisionConfig)  # thresholds, cool-down, weights
    prompt_tokens: int = 256  # request shape the cost model optimises for
    decode_tokens: int = 128
    kv_budget_tokens: int = 4096  # KV-cache tokens every hosting node reserves per layer
    default_link_mbps: float = 1000.0  # assumed for node pairs not yet measured
    default_rtt_ms: float = 1.0

    def workload(self) -> Workload:
        return Workload(self.prompt_tokens, self.decode_tokens, self.kv_budget_tokens)




def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "privacy":
            out[prefix + "extra_critical_layers"] = ",".join(map(str, sorted(value.extra_critical_layers)))
        elif dataclasses.is_dataclass(value):
            out.update(_flatten(value, prefix))
        else:
            out[prefix + f.name] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def policy_values(policy: Policy) -> dict[str, str]:
    return _flatten(policy)


def _parse(text: str, like: Any, name: str) -> Any:
    if isinstance(like, bool):
        if text.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise ValueError(f"{name} must be true or false, got {text!r}")
        return text.lower() in ("true", "1", "on")
    if isinstance(like, (int, float)):
        try:
            return type(like)(float(text) if isinstance(like, float) else int(text))
        except ValueError:
            raise ValueError(f"{name} must be a number, got {text!r}") from None
    return text


def apply_policy(policy: Policy, updates: dict[str, str]) -> Policy:
    """A new policy with ``updates`` applied; ValueError names the first bad key or value."""
    current = policy_values(policy)
    unknown = sorted(set(updates) - set(current))
    if unknown:
        raise ValueError(f"unknown policy keys: {', '.join(unknown)} (known: {', '.join(sorted(current))})")

    def rebuild(obj: Any) -> Any:
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "privacy" and "extra_critical_layers" in updates:
                text = updates["extra_critical_layers"]
                try:
                    layers = frozenset(int(x) for x in text.split(",") if x.strip())
                except ValueError:
                    raise ValueError(f"extra_critical_layers must be comma-separated integers, got {text!r}") from None
                changes[f.name] = dataclasses.replace(value, extra_critical_layers=layers)
            elif dataclasses.is_dataclass(value):
                changes[f.name] = rebuild(value)
            elif f.name in updates:
                changes[f.name] = _parse(updates[f.name], value, f.name)
        try:
            return dataclasses.replace(obj, **changes)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid policy: {exc}") from exc

    new = rebuild(policy)
    if new.interval_s <= 0:
        raise ValueError("interval_s must be positive")
    new.workload()  # validates the request shape
    return new  # type: ignore[no-any-return]


def policy_to_json(policy: Policy) -> str:
    return json.dumps(policy_values(policy), sort_keys=True)


def policy_from_json(text: str, base: Policy) -> Policy:
    return apply_policy(base, json.loads(text))


