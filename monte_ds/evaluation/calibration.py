"""Calibration of multiple-choice answers: NLL of the gold choice, expected calibration
error, the Brier score and the reliability-diagram bins, from lm-eval's per-sample
log-likelihoods (the metrics of Bayesian-LoRA papers, BLoB and Laplace-LoRA: accuracy, ECE
and NLL on the softmax over the choices; the Brier score beside them).

A document's choice probabilities are the softmax of the choices' summed
log-likelihoods (the scores `acc` ranks), i.e. the model's distribution restricted to
the offered answers. Its confidence is the top probability; it is correct when the top
choice is the gold one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from lm_eval.api.metrics import mean_stderr
from lm_eval.api.task import Task
from scipy.special import softmax


N_BINS = 10


@dataclass(frozen=True)
class ChoiceScores:
    """Per-document choice probabilities and gold indices of one task (documents in doc_id order)."""

    doc_ids: list[int]
    probabilities: list[np.ndarray]
    gold: list[int]


def gold_index(task: Task, doc: dict[str, Any]) -> int:
    """The gold choice's index, as lm-eval's multiple-choice scoring defines it."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return int(gold)


def choice_scores(task: Task, samples: Sequence[dict[str, Any]]) -> ChoiceScores:
    """Choice probabilities of a multiple-choice task from its lm-eval samples (`log_samples=True`)."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return ChoiceScores(
        doc_ids=[sample["doc_id"] for sample in ordered],
        probabilities=[softmax([ll for ll, _ in sample["filtered_resps"]]) for sample in ordered],
        gold=[gold_index(task, sample["doc"]) for sample in ordered],
    )


def average_draws(draws: Sequence[ChoiceScores]) -> ChoiceScores:
    """Posterior-predictive scores: each document's choice probabilities averaged over draws."""
    first = draws[0]
    if any(draw.doc_ids != first.doc_ids or draw.gold != first.gold for draw in draws):
        raise ValueError("draws were scored on different documents")
    probabilities = [np.mean(per_doc, axis=0) for per_doc in zip(*(d.probabilities for d in draws))]
    return ChoiceScores(first.doc_ids, probabilities, first.gold)


def calibration(scores: ChoiceScores, n_bins: int = N_BINS) -> dict[str, Any]:
    """Accuracy, gold NLL and Brier score (with standard errors), ECE and the equal-width
    confidence bins. The Brier score is the multi-class one (Brier 1950): the squared distance
    between the choice probabilities and the one-hot gold answer, summed over the choices
    (0 is perfect, 2 the worst; a uniform guess over k choices scores 1 - 1/k)."""
    gold_probability = np.array([p[g] for p, g in zip(scores.probabilities, scores.gold)])
    confidence = np.array([p.max() for p in scores.probabilities])
    correct = np.array([float(np.argmax(p) == g) for p, g in zip(scores.probabilities, scores.gold)])
    nll = -np.log(np.clip(gold_probability, np.finfo(float).tiny, None))
    brier = np.array([np.sum(p**2) - 2 * p[g] + 1 for p, g in zip(scores.probabilities, scores.gold)])
    bins = reliability_bins(confidence, correct, n_bins)
    n = len(correct)
    ece = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    return {
        "n": n,
        "acc": float(correct.mean()),
        "acc_stderr": _stderr(correct),
        "nll": float(nll.mean()),
        "nll_stderr": _stderr(nll),
        "ece": float(ece),
        "brier": float(brier.mean()),
        "brier_stderr": _stderr(brier),
        "bins": bins,
    }


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, Any]]:
    """Equal-width bins over [0, 1] (right-closed, the first also holds 0): count, accuracy, mean confidence."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = which == b
        count = int(members.sum())
        bins.append(
            {
                "lower": round(float(edges[b]), 6),
                "upper": round(float(edges[b + 1]), 6),
                "count": count,
                "accuracy": float(correct[members].mean()) if count else None,
                "confidence": float(confidence[members].mean()) if count else None,
            }
        )
    return bins


def _stderr(values: np.ndarray) -> float | None:
    """Standard error of a mean (lm-eval's formula); undefined for fewer than two values."""
    return float(mean_stderr(values.tolist())) if len(values) > 1 else None
