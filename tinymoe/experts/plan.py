"""Which physical copies serve each logical expert, and in what precision (data only)."""
from dataclasses import dataclass, field

from ..kernels.moe_op import PRECISIONS  # noqa: F401 (the one list; routers read it here)


@dataclass(frozen=True)
class Copy:
    expert: int
    precision: str = "full"
    device: int = 0


@dataclass
class ExpertPlan:
    copies: list[Copy] = field(default_factory=list)

    @classmethod
    def default(cls, num_experts: int) -> "ExpertPlan":
        return cls([Copy(e) for e in range(num_experts)])

    def copies_of(self, expert: int) -> list[int]:
        return [i for i, c in enumerate(self.copies) if c.expert == expert]
