"""MonteCLoRAConfig: the LoRA fields plus the MonteCLoRA hyperparameters (paper Tables 3-4)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from monte_ds import schema
from monte_ds.errors import InputError
from monte_ds.schema import option


# LLaMA's attention and MLP projections: what the paper adapts.
LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# peft's task types (peft.TaskType values); None wraps any nn.Module in a plain PeftModel.
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")
# peft's initialisations MonteCLoRA keeps exactly (True: peft's default, re-drawn from the seed).
INIT_LORA_WEIGHTS = ("gaussian", "pissa", "olora", "loftq", "eva", "orthogonal")
_INIT_LORA_WEIGHTS_PATTERN = rf"^(?:{'|'.join(INIT_LORA_WEIGHTS)}|pissa_niter_\d+)\Z"
# A plain module name (no regex syntax besides the dots of a path): one target, not a pattern.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]+")
_NAMES = "a name, a list of names, or null"


@dataclass
class MonteCLoRAConfig:
    """Hyperparameters of one MonteCLoRA adapter.

    The LoRA fields are peft's `LoraConfig` fields of the same names, passed through
    (`task_type=None`: inferred from the model). `wishart_df=None` means nu = each layer's own
    rank (Appendix E.1; nu must be >= the largest rank). `sample_scaler` is the
    paper's epsilon (5e-3 in Table 4; 2.5e-5 for LLaMA-3.2). `posthoc=True` freezes A and B and
    trains only the Wishart scale and Dirichlet concentration (paper §6.4).

    Each field's type and bounds are checked on construction (`schema.check_fields`): a bad value
    is an `InputError` (a `ValueError`) naming the field.
    """

    r: int = option(8, minimum=1)
    lora_alpha: float = option(16, exclusiveMinimum=0)
    target_modules: list[str] | str | None = option(None, must_be="a module name, a list of names, or null")
    lora_dropout: float = option(0.0, minimum=0, exclusiveMaximum=1)
    use_rslora: bool = False
    n_components: int = option(4, minimum=1)
    sample_scaler: float = option(5e-3, minimum=0)
    kl_weight: float = option(1e-5, minimum=0)
    dirichlet_prior: float = option(1.0, exclusiveMinimum=0)
    dirichlet_init: Literal["ones", "uniform"] = "ones"
    # >= the largest rank: a rule between fields, in __post_init__.
    wishart_df: float | None = option(None, must_be="null or a number >= the largest rank")
    sparse_mixture: bool = False
    posthoc: bool = False
    seed: int = option(0, minimum=0, must_be="an integer >= 0")
    sampler: Literal["auto", "async", "sync"] = "auto"
    modules_to_save: list[str] | None = None
    task_type: Literal[TASK_TYPES] | None = option(None, must_be=f"one of {', '.join(TASK_TYPES)} or null")
    exclude_modules: list[str] | str | None = option(None, must_be=_NAMES)
    layers_to_transform: list[int] | int | None = option(
        None, minimum=0, items={"minimum": 0}, must_be="a layer index >= 0, a list of them, or null"
    )
    layers_pattern: list[str] | str | None = option(None, must_be=_NAMES)
    rank_pattern: dict[str, int] = option(
        {}, additionalProperties={"type": "integer", "minimum": 1}, must_be="a mapping of module names to ranks >= 1"
    )
    alpha_pattern: dict[str, float] = option(
        {},
        additionalProperties={"type": "number", "exclusiveMinimum": 0},
        must_be="a mapping of module names to alphas > 0",
    )
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    init_lora_weights: bool | str = option(
        True,
        pattern=_INIT_LORA_WEIGHTS_PATTERN,
        must_be=f"true, false, pissa_niter_<n> or one of {', '.join(INIT_LORA_WEIGHTS)}",
    )
    loftq_config: dict[str, int] = option({}, must_be="a mapping (peft's LoftQConfig fields)")
    eva_config: dict[str, Any] | None = option(None, must_be="null or a mapping (peft's EvaConfig fields)")
    use_dora: bool = False

    def __post_init__(self) -> None:
        schema.check_fields(self)
        schema.check_rules(
            self,
            [
                (
                    self.wishart_df is None or self.wishart_df >= self.max_rank,
                    "wishart_df",
                    f"null or >= the largest rank ({self.max_rank})",
                ),
                (
                    self.init_lora_weights != "eva" or (self.eva_config or {}).get("rho") == 1,
                    "eva_config",
                    "{'rho': 1} with init_lora_weights 'eva' (EVA's rank redistribution rebuilds peft's layers "
                    "without MonteCLoRA)",
                ),
            ],
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
