from .experts import Experts
from .plan import Copy, ExpertPlan

__all__ = ["Experts", "Copy", "ExpertPlan"]
