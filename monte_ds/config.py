"""MonteCLoRAConfig: the LoRA fields plus the MonteCLoRA hyperparameters (paper Tables 3-4)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from monte_ds.errors import InputError


# LLaMA's attention and MLP projections: what the paper adapts.
LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# peft's task types (peft.TaskType values); None wraps any nn.Module in a plain PeftModel.
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")
# peft's initialisations MonteCLoRA keeps exactly (True: peft's default, re-drawn from the seed).
INIT_LORA_WEIGHTS = ("gaussian", "pissa", "olora", "loftq", "eva", "orthogonal")
# A plain module name (no regex syntax besides the dots of a path): one target, not a pattern.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]+")


@dataclass
class MonteCLoRAConfig:
    """Hyperparameters of one MonteCLoRA adapter.

    The LoRA fields are peft's `LoraConfig` fields of the same names, passed through
    (`task_type=None`: inferred from the model). `wishart_df=None` means nu = each layer's own
    rank (Appendix E.1; nu must be >= the largest rank). `sample_scaler` is the
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
    sampler: Literal["auto", "async", "sync"] = "auto"
    modules_to_save: list[str] | None = field(default=None)
    task_type: Literal[TASK_TYPES] | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    init_lora_weights: bool | str = True
    loftq_config: dict[str, int] = field(default_factory=dict)
    eva_config: dict[str, Any] | None = None
    use_dora: bool = False

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise InputError(f"must be {rule}, got {getattr(self, name)!r}", key=name)

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
            isinstance(self.rank_pattern, dict) and all(is_int(r) and r >= 1 for r in self.rank_pattern.values()),
            "rank_pattern",
            "a mapping of module names to ranks >= 1",
        )
        require(
            isinstance(self.alpha_pattern, dict) and all(is_number(a) and a > 0 for a in self.alpha_pattern.values()),
            "alpha_pattern",
            "a mapping of module names to alphas > 0",
        )
        require(
            self.wishart_df is None or (is_number(self.wishart_df) and self.wishart_df >= self.max_rank),
            "wishart_df",
            f"null or >= the largest rank ({self.max_rank})",
        )
        require(isinstance(self.sparse_mixture, bool), "sparse_mixture", "a bool")
        require(isinstance(self.posthoc, bool), "posthoc", "a bool")
        require(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")
        require(self.sampler in ("auto", "async", "sync"), "sampler", "'auto', 'async' or 'sync'")
        for name in ("exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            require(
                value is None
                or isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(m, str) for m in value)),
                name,
                "a name, a list of names, or null",
            )
        require(
            self.layers_to_transform is None
            or (is_int(self.layers_to_transform) and self.layers_to_transform >= 0)
            or (
                isinstance(self.layers_to_transform, list)
                and all(is_int(i) and i >= 0 for i in self.layers_to_transform)
            ),
            "layers_to_transform",
            "a layer index >= 0, a list of them, or null",
        )
        require(
            self.task_type is None or self.task_type in TASK_TYPES,
            "task_type",
            f"one of {', '.join(TASK_TYPES)} or null",
        )
        require(self.bias in ("none", "all", "lora_only"), "bias", "'none', 'all' or 'lora_only'")
        for name in ("fan_in_fan_out", "lora_bias", "use_dora"):
            require(isinstance(getattr(self, name), bool), name, "a bool")
        require(
            isinstance(self.init_lora_weights, bool)
            or self.init_lora_weights in INIT_LORA_WEIGHTS
            or re.fullmatch(r"pissa_niter_\d+", str(self.init_lora_weights)) is not None,
            "init_lora_weights",
            f"true, false, pissa_niter_<n> or one of {', '.join(INIT_LORA_WEIGHTS)}",
        )
        require(isinstance(self.loftq_config, dict), "loftq_config", "a mapping (peft's LoftQConfig fields)")
        require(
            self.eva_config is None or isinstance(self.eva_config, dict),
            "eva_config",
            "null or a mapping (peft's EvaConfig fields)",
        )
        require(
            self.init_lora_weights != "eva" or (self.eva_config or {}).get("rho") == 1,
            "eva_config",
            "{'rho': 1} with init_lora_weights 'eva' (EVA's rank redistribution rebuilds peft's layers without MonteCLoRA)",
        )

    @property
    def max_rank(self) -> int:
        """The largest rank of any layer: `r` or a `rank_pattern` rank."""
        return max([self.r, *self.rank_pattern.values()])

    @property
    def resolved_target_modules(self) -> list[str] | str:
        """What peft matches: null is LLaMA's projections, and one plain module name is that
        name (peft would read a lone string as a regex over the full module path)."""
        if self.target_modules is None:
            return LLAMA_TARGET_MODULES
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            if _PLAIN_NAME.fullmatch(self.target_modules):
                return [self.target_modules]
        return self.target_modules

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonteCLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown MonteCLoRAConfig field(s): {', '.join(unknown)}")
        return cls(**data)
