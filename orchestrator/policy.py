"""The adaptive loop's policy: one validated model for the orchestrator's settings, the Admin API and the
persisted record.

Every field has a range (below); a value outside it, NaN or infinity is refused with the field named, and
nothing changes. The Admin API and the CLI see the policy flattened to ``name -> text``
(``splitmesh policy get|set``); the state store keeps it as the model's JSON and re-validates it on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.privacy import TrustRule
from orchestrator.planning import CostWeights, DecisionConfig, PrivacyPolicy, Workload

MAX_LAYERS = 65_536  # layer indices a policy may name
MAX_TOKENS = 1 << 20
TRUSTED_DEPTH = 1  # default leading trusted depth (README, "What split inference protects")


class PolicyError(ValueError):
    """A policy value is unknown or out of range; the message names the field."""


class Policy(BaseModel):
    """Thresholds, weights and request shape of the adaptive loop (ranges are part of the contract)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    adaptive: bool = True  # run the decision loop; off = plans change only by operator action or node loss
    interval_s: float = Field(default=1.0, ge=0.1, le=3600.0)  # monitoring period: one decision per interval
    latency_max_ms: float = Field(default=150.0, gt=0.0, le=600_000.0)  # L_max: EWMA per-token latency that fires
    utilisation_max: float = Field(default=0.85, gt=0.0, le=1.0)  # U_max: a plan node busier than this fires
    bandwidth_min_bps: float = Field(default=50e6, ge=0.0, le=1e13)  # B_min: a plan link slower than this (bit/s) fires
    bandwidth_scope: Literal["plan", "all"] = "plan"  # watch the plan's links (ring included) or all links
    cooldown_s: float = Field(default=30.0, ge=0.0, le=86_400.0)  # T_cool: no voluntary change sooner after the last
    hysteresis: float = Field(default=0.05, ge=0.0, lt=1.0)  # a new plan must cut predicted Phi by more
    ewma_alpha: float = Field(default=0.3, gt=0.0, le=1.0)  # weight of the newest latency sample in the EWMA
    alpha: float = Field(default=1.0, ge=0.0, le=1e6)  # Phi weight per second of predicted request latency
    beta: float = Field(default=0.1, ge=0.0, le=1e6)  # Phi weight of the imbalance term
    gamma: float = Field(default=10.0, ge=0.0, le=1e6)  # Phi weight per critical layer untrusted (soft)
    privacy_hard: bool = True  # critical layers only on trusted nodes (False: penalise with gamma)
    extra_critical_layers: frozenset[int] = Field(default=frozenset(), max_length=4096)  # more layers that stay trusted
    trusted_leading_layers: int = Field(default=TRUSTED_DEPTH, ge=1, le=MAX_LAYERS)  # layers [0, n) trusted only
    trusted_trailing_layers: int = Field(default=1, ge=1, le=MAX_LAYERS)  # the last n layers trusted only
    prompt_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS)  # request shape the cost model optimises for
    decode_tokens: int = Field(default=128, ge=1, le=MAX_TOKENS)
    kv_budget_tokens: int = Field(default=4096, ge=0, le=MAX_TOKENS)  # KV tokens a host reserves per layer
    default_link_mbps: float = Field(default=1000.0, gt=0.0, le=1e7)  # assumed for node pairs not yet measured
    default_rtt_ms: float = Field(default=1.0, ge=0.0, le=600_000.0)

    @field_validator("extra_critical_layers", mode="before")
    @classmethod
    def _layer_list(cls, value: Any) -> Any:
        """The flattened form is comma-separated text ("" = none)."""
        if isinstance(value, str):
            try:
                return frozenset(int(x) for x in value.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"must be comma-separated layer indices, got {value!r}") from None
        return value

    @field_validator("extra_critical_layers")
    @classmethod
    def _layers_exist(cls, value: frozenset[int]) -> frozenset[int]:
        bad = sorted(i for i in value if not 0 <= i < MAX_LAYERS)
        if bad:
            raise ValueError(f"layer indices must be in [0, {MAX_LAYERS}), got {bad[:5]}")
        return value

    @property
    def decision(self) -> DecisionConfig:
        return DecisionConfig(
            latency_max_ms=self.latency_max_ms, utilisation_max=self.utilisation_max,
            bandwidth_min_bps=self.bandwidth_min_bps, bandwidth_scope=self.bandwidth_scope,
            cooldown_s=self.cooldown_s, hysteresis=self.hysteresis, ewma_alpha=self.ewma_alpha,
            weights=CostWeights(self.alpha, self.beta, self.gamma, self.privacy_hard),
            privacy=PrivacyPolicy(self.extra_critical_layers, self.trusted_leading_layers,
                                  self.trusted_trailing_layers))

    def workload(self) -> Workload:
        return Workload(self.prompt_tokens, self.decode_tokens, self.kv_budget_tokens)

    def trust_rule(self) -> TrustRule:
        """What the plans record and the nodes refuse on untrusted boxes: the trusted depth and the extra
        layers when privacy is hard; soft privacy only penalises them, and the first and last layer are
        enforced either way."""
        if not self.privacy_hard:
            return TrustRule()
        return TrustRule(self.trusted_leading_layers, self.trusted_trailing_layers, self.extra_critical_layers)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, frozenset):
        return ",".join(map(str, sorted(value)))
    return str(value)


def policy_values(policy: Policy) -> dict[str, str]:
    """The flattened form of the Admin API: every field as text."""
    return {name: _text(getattr(policy, name)) for name in Policy.model_fields}


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        name = ".".join(map(str, error["loc"])) or "policy"
        parts.append(f"{name}: {error['msg']} (got {error.get('input')!r})")
    return "invalid policy: " + "; ".join(parts)


def validated(values: Mapping[str, Any]) -> Policy:
    """A policy from field values (text or typed); PolicyError names every bad field."""
    try:
        return Policy.model_validate(dict(values))
    except ValidationError as exc:
        raise PolicyError(_explain(exc)) from None


def apply_policy(policy: Policy, updates: Mapping[str, str]) -> Policy:
    """A new policy with ``updates`` applied, validated as a whole; PolicyError names unknown or bad keys."""
    unknown = sorted(set(updates) - set(Policy.model_fields))
    if unknown:
        known = ", ".join(sorted(Policy.model_fields))
        raise PolicyError(f"unknown policy keys: {', '.join(unknown)} (known: {known})")
    return validated({**policy.model_dump(), **updates})


def changed(before: Policy, after: Policy) -> list[str]:
    return [name for name in Policy.model_fields if getattr(before, name) != getattr(after, name)]


def policy_to_json(policy: Policy) -> str:
    return policy.model_dump_json()


def policy_from_json(text: str) -> Policy:
    """The persisted record, re-validated (a record written before validation existed may be refused)."""
    try:
        return Policy.model_validate_json(text)
    except ValidationError as exc:
        raise PolicyError(_explain(exc)) from None
