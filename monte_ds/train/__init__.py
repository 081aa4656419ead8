"""Training: the JSON config, data loading, the TRL-based MonteCLoRA trainer and the run recipe
(`monte-ds train`, `launch/train.py`)."""

from monte_ds.train.trainer import MonteCLoRATrainer


__all__ = ["MonteCLoRATrainer"]
