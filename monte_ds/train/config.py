"""The training config: one JSON file, `--set` overrides, validation before anything is loaded.

Sections: `model`, `quantization`, `adapter` (MonteCLoRAConfig fields, or `"method": "lora"`),
`data`, `training` (TRL's SFTConfig, passed through), `distributed` (DeepSpeed or FSDP2) and
`eval` (`monte_ds.evaluation.EvalOptions`). Every problem is a `UserError` naming the key, raised
before the output directory is touched. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig
from trl import SFTConfig

from monte_ds import pretrained, schema
from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError, UserError, first_line
from monte_ds.evaluation.options import EvalOptions
from monte_ds.schema import option
from monte_ds.train.data import BUNDLED_PREFIX, DATA_SUFFIXES, DataSection, bundled_path
from monte_ds.train.methods import (
    METHODS,
    MONTECLORA_ONLY,
    OPTION_FIELDS,
    MethodOptions,
    check_method_options,
    check_method_setup,
    method_options,
    resolved_options,
)


logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPUTE_DTYPES = DTYPES[1:]
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
QUANTIZATION_MODES = ("none", "nf4", "fp4", "int8")
# Every field of peft's LoraConfig: those the adapter section lacks are named as not offered (docs/training.md says why).
PEFT_LORA_CONFIG_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}
# SFTConfig fields this recipe owns: set elsewhere in the config or by the launcher.
TRAINING_OWNED = {
    "deepspeed": "set it in distributed.deepspeed",
    "fsdp": "set it in distributed.fsdp",
    "fsdp_config": "set it in distributed.fsdp",
    "resume_from_checkpoint": "use the --resume flag",
    "local_rank": "the launcher sets it",
    "do_train": "this command always trains",
    "do_eval": "the eval section evaluates after training",
    "do_predict": "the eval section evaluates after training",
}


@dataclass(frozen=True)
class ModelSection:
    path: str = option(minLength=1)
    dtype: Literal[DTYPES] = "auto"
    attn_implementation: Literal[(*ATTENTION, None)] = None
    revision: str | None = None
    trust_remote_code: bool = False
    build_tiny: bool = False
    # A packaged pretrained base converted to `path` once (monte_ds.pretrained).
    prepare: Literal[(*pretrained.PACKAGED, None)] = None
    # A GGUF file inside `path`, dequantised to `dtype` on every load.
    gguf_file: str | None = option(None, minLength=1)


@dataclass(frozen=True)
class QuantizationSection:
    mode: Literal[QUANTIZATION_MODES] = "none"
    double_quant: bool = False
    compute_dtype: Literal[COMPUTE_DTYPES] = "bfloat16"
    quant_storage: Literal[("auto", "uint8", *COMPUTE_DTYPES)] = "auto"

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class FsdpKeys:
    """The keys `distributed.fsdp` takes (TrainingArguments' `fsdp_config`, FSDP2). The section is
    passed on as written, a key left out keeping accelerate's default: this class only declares
    the keys for the schema (hence no defaults, and no instances)."""

    version: Literal[2]
    reshard_after_forward: bool
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"]
    transformer_layer_cls_to_wrap: list[str]
    min_num_params: int = option(minimum=0)
    cpu_offload: bool
    cpu_ram_efficient_loading: bool
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"]
    activation_checkpointing: bool


def _section(properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def config_schema() -> dict[str, Any]:
    """The whole file's schema, each section's derived from its dataclass (`schema.dataclass_schema`).

    The adapter's is the types of MonteCLoRAConfig and MethodOptions only: their bounds are checked
    when they are built (`schema.check_fields`), which words an error the same from Python and
    from a config file ("adapter.r: must be >= 1, got 0").
    """
    adapter = schema.dataclass_schema(MonteCLoRAConfig, bounds=False)
    adapter["properties"].update(schema.dataclass_schema(MethodOptions, bounds=False)["properties"])
    adapter["properties"]["method"] = {"enum": list(METHODS)}
    training = schema.dataclass_schema(SFTConfig)
    for key in TRAINING_OWNED:
        training["properties"].pop(key, None)
    training["required"] = ["output_dir"]
    training["properties"]["output_dir"] = {"type": "string", "minLength": 1}
    fsdp = {**schema.dataclass_schema(FsdpKeys), "required": []}  # every key optional: passed on as written
    return _section(
        {
            "model": schema.dataclass_schema(ModelSection),
            "quantization": schema.dataclass_schema(QuantizationSection),
            "adapter": adapter,
            "data": schema.dataclass_schema(DataSection),
            "training": training,
            "distributed": {
                "type": "object",
                "properties": {"deepspeed": {"type": ["object", "string"]}, "fsdp": fsdp},
                "additionalProperties": False,
                "maxProperties": 1,
            },
            "eval": EvalOptions.json_schema(),
        },
        required=["model", "data", "training"],
    )


@dataclass(frozen=True)
class TrainConfig:
    """A validated config. `training` holds the SFTConfig keyword arguments as written."""

    model: ModelSection
    quantization: QuantizationSection
    method: str
    adapter: MonteCLoRAConfig
    data: DataSection
    training: dict[str, Any]
    deepspeed: dict[str, Any] | None
    fsdp: dict[str, Any] | None
    eval: dict[str, Any]
    method_options: MethodOptions = MethodOptions()

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    @property
    def zero_stage(self) -> int | None:
        return None if self.deepspeed is None else int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 and FSDP keep each parameter on one rank only."""
        return self.zero_stage == 3 or self.fsdp is not None

    def to_dict(self) -> dict[str, Any]:
        """The resolved config: what `output_dir/config.json` holds; loading it reproduces the run."""
        adapter = {"method": self.method, **resolved_options(self.method, self.adapter, self.method_options)}
        distributed = {"deepspeed": self.deepspeed} if self.deepspeed else {"fsdp": self.fsdp} if self.fsdp else {}
        return {
            "model": dataclasses.asdict(self.model),
            "quantization": dataclasses.asdict(self.quantization),
            "adapter": adapter,
            "data": dataclasses.asdict(self.data),
            "training": self.training,
            "distributed": distributed,
            "eval": self.eval,
        }

    def config_hash(self) -> str:
        """Identifies the experiment: the resolved config minus where its outputs go."""
        resolved = self.to_dict()
        resolved["training"] = {k: v for k, v in resolved["training"].items() if k != "output_dir"}
        return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config file as a dict, with `--set dotted.key=value` overrides applied in order."""
    raw = _read_json_object("--config", path)
    for override in overrides:
        apply_override(raw, override)
    return raw


def _read_json_object(key: str, path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no such file: {path}", key=key) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})", key=key) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object", key=key)
    return data


def apply_override(config: dict[str, Any], override: str) -> None:
    """`a.b.c=value`: the value is parsed as JSON, or taken as a string when it is not JSON."""
    key, sep, text = override.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise UserError(f"--set {override}: expected dotted.key=value")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    node = config
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{'.'.join(parts[: depth + 1])} is not an object", key=f"--set {override}")
        node = child
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any]) -> TrainConfig:
    """Check `raw` against the schema and the rules the schema cannot say; fill the defaults."""
    training = raw.get("training")
    for key in TRAINING_OWNED.keys() & (training.keys() if isinstance(training, dict) else set()):
        raise UserError(f"not set here; {TRAINING_OWNED[key]}", key=f"training.{key}")
    full_schema = config_schema()
    adapter = raw.get("adapter")
    offered = full_schema["properties"]["adapter"]["properties"]
    for key in sorted(PEFT_LORA_CONFIG_FIELDS & set(adapter) - set(offered)) if isinstance(adapter, dict) else ():
        raise UserError(
            f"peft's LoraConfig option {key!r} is not offered with MonteCLoRA (see docs/training.md)",
            key=f"adapter.{key}",
        )
    schema.validate(raw, full_schema)
    model = ModelSection(**raw["model"])
    quantization = QuantizationSection(**raw.get("quantization", {}))
    data = DataSection(**raw["data"])
    training = dict(raw["training"])
    method, adapter, options = _adapter(dict(raw.get("adapter", {})), training)
    if adapter.task_type not in (None, "CAUSAL_LM"):
        raise UserError(
            f"monte-ds train fine-tunes causal LMs (CAUSAL_LM or null), got {adapter.task_type!r}",
            key="adapter.task_type",
        )
    adapter = dataclasses.replace(adapter, task_type="CAUSAL_LM")
    deepspeed, fsdp = _distributed(raw.get("distributed", {}), adapter)
    evaluation = dict(raw.get("eval", {}))

    _check_model_section(model, quantization)
    if data.path.startswith(BUNDLED_PREFIX):
        bundled_path(data.path)
    else:
        _check_local_path("data.path", data.path, DATA_SUFFIXES)
    if (data.format == "template") != (data.prompt_template is not None):
        raise UserError("set it exactly when data.format is 'template'", key="data.prompt_template")
    if quantization.double_quant and quantization.mode not in ("nf4", "fp4"):
        raise UserError("only applies to 4-bit modes (nf4, fp4)", key="quantization.double_quant")
    evaluates_during_training = training.get("eval_strategy", "no") != "no"
    if evaluates_during_training and data.eval_size is None:
        raise UserError(
            "needs an evaluation set: hold out rows with data.eval_size (the eval section evaluates after training)",
            key="training.eval_strategy",
        )
    if data.eval_size is not None and not evaluates_during_training:
        raise UserError('holds out rows for training.eval_strategy, which is "no"', key="data.eval_size")
    if method == "monteclora" and training.get("label_smoothing_factor", 0) > 0:
        raise UserError(
            "not supported with MonteCLoRA (TRL runs a second "
            "training forward for it, which would draw different noise)",
            key="training.label_smoothing_factor",
        )
    if fsdp is not None and quantization.enabled and quantization.quant_storage == "uint8":
        raise UserError("FSDP2 shards only floating-point storage; use bfloat16", key="quantization.quant_storage")
    config = TrainConfig(model, quantization, method, adapter, data, training, deepspeed, fsdp, evaluation, options)
    if model.gguf_file is not None and config.shards_parameters:
        raise UserError(
            "a GGUF base is loaded whole, then dequantised; ZeRO-3 and FSDP2 need a safetensors base",
            key="model.gguf_file",
        )
    if config.shards_parameters and quantization.mode == "int8":
        raise UserError(
            "bitsandbytes' 8-bit weights cannot be sharded (ZeRO-3, FSDP2); use nf4 or fp4, whose storage is then "
            "the compute dtype, or ZeRO-2",
            key="quantization.mode",
        )
    check_method_setup(method, quantization.enabled, zero_stage=config.zero_stage, fsdp=fsdp is not None)
    return config


def _adapter(section: dict[str, Any], training: dict[str, Any]) -> tuple[str, MonteCLoRAConfig, MethodOptions]:
    """The method, its LoRA/MonteCLoRA fields and its own options (see monte_ds.train.methods)."""
    method = section.pop("method", "monteclora")
    check_method_options(method, section)
    shared = {
        key: value
        for key, value in section.items()
        if key not in OPTION_FIELDS and (method == "monteclora" or key not in MONTECLORA_ONLY)
    }
    # One seed drives the whole run unless the noise gets its own.
    shared.setdefault("seed", training.get("seed", _default_training_seed()))
    try:
        adapter = MonteCLoRAConfig.from_dict(shared)
    except InputError as err:
        raise UserError(err.problem, key=err.key).under("adapter") from None
    return method, adapter, method_options(method, section, adapter)


def _default_training_seed() -> int:
    return next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "seed")


def _distributed(section: dict[str, Any], adapter: MonteCLoRAConfig) -> tuple[dict | None, dict | None]:
    if "fsdp" in section:
        return None, {"version": 2, **section["fsdp"]}
    if "deepspeed" not in section:
        return None, None
    deepspeed = section["deepspeed"]
    if isinstance(deepspeed, str):
        deepspeed = _read_json_object("distributed.deepspeed", deepspeed)
    return _checked_deepspeed(copy.deepcopy(deepspeed), adapter), None


def _checked_deepspeed(deepspeed: dict[str, Any], adapter: MonteCLoRAConfig) -> dict[str, Any]:
    """Enforce what MonteCLoRA needs from ZeRO-3 (both are adjusted, with a log line, not refused).

    - `stage3_param_persistence_threshold` >= the size of v and alpha, so that ZeRO-3 keeps them
      whole on every rank after the first step: the regulariser reads them outside the forward
      (v has one entry per rank of its layer: the largest rank counts).
    - `stage3_gather_16bit_weights_on_model_save`: checkpoints then hold the whole adapter,
      not the empty files of the well-known trl/peft + ZeRO-3 bug.
    """
    zero = deepspeed.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise UserError("must be 0, 1, 2 or 3", key="distributed.deepspeed.zero_optimization.stage")
    if "optimizer" in deepspeed:
        raise UserError(
            "leave the optimizer to training.optim (torch optimizers "
            "work everywhere; DeepSpeed's compiled ones need its ops built)",
            key="distributed.deepspeed.optimizer",
        )
    if zero.get("stage") != 3:
        return deepspeed
    needed = max(adapter.max_rank, adapter.n_components)
    threshold = zero.get("stage3_param_persistence_threshold", 100_000)
    if threshold != "auto" and (not isinstance(threshold, (int, float)) or threshold < needed):
        logger.warning(
            "distributed.deepspeed: stage3_param_persistence_threshold raised from %s to %d so that "
            "MonteCLoRA's v and alpha stay whole on every rank",
            threshold,
            needed,
        )
        zero["stage3_param_persistence_threshold"] = needed
    if zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        logger.info("distributed.deepspeed: stage3_gather_16bit_weights_on_model_save set to true (complete adapters)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return deepspeed


def _check_model_section(model: ModelSection, quantization: QuantizationSection) -> None:
    """Where the base comes from: built (build_tiny), prepared (prepare), a GGUF file or a checkpoint."""
    sources = [key for key in ("build_tiny", "prepare", "gguf_file") if getattr(model, key) not in (None, False)]
    if len(sources) > 1:
        raise UserError(f"set only one of {', '.join('model.' + key for key in sources)}", key=f"model.{sources[1]}")
    if model.prepare is not None:
        if not pretrained.is_prepared(model.path):
            pretrained.packaged_gguf(model.prepare)  # the package is needed only until the folder exists
        return
    if model.build_tiny:
        return
    _check_local_path("model.path", model.path)
    if model.gguf_file is None:
        return
    pretrained.check_gguf_reader("model.gguf_file")
    directory = Path(model.path).expanduser()
    if directory.is_dir() and not (directory / model.gguf_file).is_file():
        raise UserError(f"no such file in {model.path}", key="model.gguf_file")
    if quantization.enabled:
        raise UserError(
            "a GGUF base is dequantised on load and cannot then be quantised by bitsandbytes; convert it to a "
            "safetensors folder first (docs/real-model.md) and point model.path at it",
            key="quantization.mode",
        )


def _check_local_path(key: str, path: str, suffixes: Sequence[str] = ()) -> None:
    """A path that is clearly local must exist; anything else may be a hub id, checked on load."""
    local = path.startswith((".", "/", "~")) or Path(path).suffix in suffixes
    if local and not Path(path).expanduser().exists():
        raise UserError(f"no such file or directory: {path}", key=key)


def training_arguments(config: TrainConfig) -> SFTConfig:
    """TRL's SFTConfig from the `training` section plus what the other sections decide."""
    kwargs = copy.deepcopy(config.training)
    kwargs.setdefault("report_to", ["tensorboard"])
    # A non-finite loss ends the run (status "diverged"): log it as it is, not as the running mean.
    kwargs.setdefault("logging_nan_inf_filter", False)
    # DeepSpeed's CPU path (tests, laptops) goes through accelerate's CPU state.
    kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    if config.deepspeed is not None:
        kwargs["deepspeed"] = copy.deepcopy(config.deepspeed)
    if config.fsdp is not None:
        kwargs.update(fsdp=True, fsdp_config=dict(config.fsdp))
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(first_line(err), key="training") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    return validate_config(read_config(path, overrides))
