"""Posterior-predictive evaluation of a MonteCLoRA adapter on multiple-choice tasks.

Instead of the mean adapter, K sampled adapters (draws 0..K-1 of
`monte_ds.predictive_sampling`, deterministic per draw) each score every choice; the
per-document choice probabilities are averaged over the draws (Bayesian model averaging).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lm_eval.api.task import Task
from torch import nn

from monte_ds import monteclora_layers, predictive_sampling
from monte_ds.errors import UserError
from monte_ds.evaluation.calibration import ChoiceScores, average_draws, choice_scores


def require_monteclora(model: nn.Module) -> None:
    """Predictive mode needs a posterior to sample: a MonteCLoRA adapter."""
    if next(monteclora_layers(model), None) is None:
        raise UserError(
            "the model has no MonteCLoRA layers (a base model or plain LoRA adapter has no posterior to "
            "sample); set predictive_samples=0",
            key="predictive_samples",
        )


def predictive_scores(
    model: nn.Module,
    tasks: dict[str, Task],
    draws: int,
    run: Callable[[dict[str, Task]], dict[str, Any]],
) -> dict[str, ChoiceScores]:
    """Choice probabilities averaged over `draws` posterior draws; `run` is one lm-eval pass."""
    per_draw: dict[str, list[ChoiceScores]] = {name: [] for name in tasks}
    for draw in range(draws):
        with predictive_sampling(model, draw=draw):
            samples = run(tasks)["samples"]
        for name, task in tasks.items():
            per_draw[name].append(choice_scores(task, samples[name]))
    return {name: average_draws(scores) for name, scores in per_draw.items()}
