"""Partition planning: where to split each query, and what to upload first."""

from iotoffload.planning.cost import best_plan, evaluate, single_split_plan
from iotoffload.planning.model import (
    ChainProfile,
    Estimates,
    Objective,
    Plan,
    PlanningInputs,
    Power,
    Segment,
)
from iotoffload.planning.planners import PLANNERS, Planner, make_planner
from iotoffload.planning.profile import chain_profile

__all__ = [
    "PLANNERS",
    "ChainProfile",
    "Estimates",
    "Objective",
    "Plan",
    "Planner",
    "PlanningInputs",
    "Power",
    "Segment",
    "best_plan",
    "chain_profile",
    "evaluate",
    "make_planner",
    "single_split_plan",
]
