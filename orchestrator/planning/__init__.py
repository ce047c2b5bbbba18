"""The orchestrator's pure decision engine: profiles, cost model, exact split solvers, the decision loop.

No I/O anywhere in this package: callers pass plain frozen dataclasses and get plain dataclasses back.
"""

from .costs import CostBreakdown, evaluate_plan
from .decision import Decision, DecisionConfig, DecisionEngine
from .plan import Plan, Segment, plan_violations, segment_memory
from .profiles import (
    ClusterState,
    CostWeights,
    LinkProfile,
    ModelProfile,
    NodeProfile,
    PrivacyPolicy,
    Problem,
    Workload,
)
from .solver import SolveResult, solve_migration, solve_resplit
from .triggers import Trigger

__all__ = [
    "ClusterState",
    "CostBreakdown",
    "CostWeights",
    "Decision",
    "DecisionConfig",
    "DecisionEngine",
    "LinkProfile",
    "ModelProfile",
    "NodeProfile",
    "Plan",
    "PrivacyPolicy",
    "Problem",
    "Segment",
    "SolveResult",
    "Trigger",
    "Workload",
    "evaluate_plan",
    "plan_violations",
    "segment_memory",
    "solve_migration",
    "solve_resplit",
]
