"""A real multi-host testbed: network-namespace hosts on a private bridge, tc-tbf shaped links, a live mesh.

See :mod:`bench.testbed.testbed` for the entry point and :mod:`bench.testbed.scenario` for the file format.
"""

from .netns import LinkShape, NetnsError, Network, remove_leftovers, unavailable_reason
from .scenario import Event, HostSpec, RequestSpec, Scenario, ScenarioError, load_scenario, parse_scenario
from .testbed import ORCH_HOST, Testbed

__all__ = [
    "ORCH_HOST",
    "Event",
    "HostSpec",
    "LinkShape",
    "NetnsError",
    "Network",
    "RequestSpec",
    "Scenario",
    "ScenarioError",
    "Testbed",
    "load_scenario",
    "parse_scenario",
    "remove_leftovers",
    "unavailable_reason",
]
