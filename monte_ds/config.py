"""MonteCLoRAConfig: the LoRA fields plus the MonteCLoRA hyperparameters (paper Tables 3-4)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

# LLaMA's attention and MLP projections: what the paper adapts.
LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class MonteCLoRAConfig:
    """Hyperparameters of one MonteCLoRA adapter.

    `wishart_df=None` means nu = r (Appendix E.1; nu must be >= r). `sample_scaler` is the
    paper's epsilon (5e-3 in Table 4; 2.5e-5 for LLaMA-3.2). `posthoc=True` freezes A and B and
    trains only the Wishart scale and Dirichlet concentration (paper §6.4).
    """

    r: int = 8
    lora_alpha: float = 16
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    n_components: int = 4
    sample_scaler: float = 5e-3
    kl_weight: float = 1e-5
    dirichlet_prior: float = 1.0
    dirichlet_init: Literal["ones", "uniform"] = "ones"
    wishart_df: float | None = None
    sparse_mixture: bool = False
    posthoc: bool = False
    seed: int = 0
    sampler: Literal["async", "sync"] = "async"
    prefetch_layers: int = 2
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        require(is_int(self.r) and self.r >= 1, "r", ">= 1")
        require(is_number(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "> 0")
        require(
            self.target_modules is None
            or isinstance(self.target_modules, str)
            or (isinstance(self.target_modules, list) and all(isinstance(m, str) for m in self.target_modules)),
            "target_modules",
            "a module name, a list of names, or null",
        )
        require(is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        require(isinstance(self.use_rslora, bool), "use_rslora", "a bool")
        require(is_int(self.n_components) and self.n_components >= 1, "n_components", ">= 1")
        require(is_number(self.sample_scaler) and self.sample_scaler >= 0, "sample_scaler", ">= 0")
        require(is_number(self.kl_weight) and self.kl_weight >= 0, "kl_weight", ">= 0")
        require(is_number(self.dirichlet_prior) and self.dirichlet_prior > 0, "dirichlet_prior", "> 0")
        require(self.dirichlet_init in ("ones", "uniform"), "dirichlet_init", "'ones' or 'uniform'")
        require(
            self.wishart_df is None or (is_number(self.wishart_df) and self.wishart_df >= self.r),
            "wishart_df",
            f"null or >= r ({self.r})",
        )
        require(isinstance(self.sparse_mixture, bool), "sparse_mixture", "a bool")
        require(isinstance(self.posthoc, bool), "posthoc", "a bool")
        require(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")
        require(self.sampler in ("async", "sync"), "sampler", "'async' or 'sync'")
        require(is_int(self.prefetch_layers) and self.prefetch_layers >= 1, "prefetch_layers", ">= 1")

    @property
    def degrees_of_freedom(self) -> float:
        """The Wishart nu actually used."""
        return float(self.r if self.wishart_df is None else self.wishart_df)

    @property
    def resolved_target_modules(self) -> list[str] | str:
        return LLAMA_TARGET_MODULES if self.target_modules is None else self.target_modules

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonteCLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MonteCLoRAConfig field(s): {', '.join(unknown)}")
        return cls(**data)
