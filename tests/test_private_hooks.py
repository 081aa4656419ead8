"""The private Trainer/TRL names `MonteCLoRATrainer` relies on (see its module docstring) still
exist, with the signatures it overrides or reads, in the installed transformers and TRL: an
upgrade that renames or reshapes one fails here, not in a user's run."""

from __future__ import annotations

import inspect

from transformers import Trainer, trainer_utils
from trl import SFTTrainer

from monte_ds.train.trainer import MonteCLoRATrainer


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_overridden_private_methods_keep_their_signatures():
    assert parameters(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert parameters(Trainer._save) == ["self", "output_dir", "state_dict"]
    assert parameters(Trainer._get_output_dir) == ["self", "trial"]
    for name in ("_save_checkpoint", "_save"):
        assert parameters(getattr(MonteCLoRATrainer, name)) == parameters(getattr(Trainer, name))


def test_the_trainer_still_reaches_them_where_the_overrides_expect():
    """Checkpoints go through `_save_checkpoint`, which saves through `save_model` (and `_save`),
    then rotates by `args.save_total_limit` (None in the trainer's copy: it rotates once complete)."""
    source = inspect.getsource(Trainer)
    assert "self._save_checkpoint(model, trial)" in source
    save_checkpoint = inspect.getsource(Trainer._save_checkpoint)
    assert "self.save_model(output_dir, _internal_call=True)" in save_checkpoint
    assert "save_total_limit=self.args.save_total_limit" in save_checkpoint
    assert "self._save(output_dir" in inspect.getsource(Trainer.save_model)
    assert parameters(trainer_utils.rotate_checkpoints)[:4] == [
        "output_dir",
        "save_total_limit",
        "best_model_checkpoint",
        "use_mtime",
    ]


def test_trl_still_counts_the_trained_tokens_in_total_train_tokens():
    """Set on resume from the checkpoint marker, read when one is marked complete."""
    assert "self._total_train_tokens = 0" in inspect.getsource(SFTTrainer.__init__)
    compute_loss = inspect.getsource(SFTTrainer.compute_loss)
    assert "self._total_train_tokens +=" in compute_loss
    assert '["num_tokens"] = [self._total_train_tokens]' in compute_loss
