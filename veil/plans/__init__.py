"""Plans: computations traced into allowlisted op lists and run remotely in one message."""

from veil.plans import remote  # registers the plan worker functions and storage
from veil.plans.plan import Plan, func2plan, training_plan
from veil.plans.remote import PlanPointer

__all__ = ["Plan", "PlanPointer", "func2plan", "remote", "training_plan"]
