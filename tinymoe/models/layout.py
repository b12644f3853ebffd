"""How a family names its tensors in a Hugging Face checkpoint."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    moe_prefix: str                       # module name of a routed MoE block: "block_sparse_moe" or "mlp"
    expert_names: tuple[str, str, str]    # per-expert (gate, up, down) projection names
    shared_name: str = "shared_experts"

    def checkpoint_names(self, name: str, moe_layer: bool, num_experts: int) -> str | list[str]:
        """Our parameter name -> its checkpoint name (a list for experts stacked as [E, ...])."""
        if moe_layer and ".mlp." in name:
            name = name.replace(".mlp.", f".{self.moe_prefix}.", 1)
        for ours, theirs in zip(("w_gate", "w_up", "w_down"), self.expert_names):
            if name.endswith(f".experts.{ours}"):
                base = name[: -len(ours) - 1]
                return [f"{base}.{e}.{theirs}.weight" for e in range(num_experts)]
        return name
