import pytest

from monte_ds import MonteCLoRAConfig
from monte_ds.errors import InputError


def test_defaults_follow_the_paper():
    config = MonteCLoRAConfig()
    assert (config.n_components, config.sample_scaler, config.kl_weight, config.dirichlet_prior) == (4, 5e-3, 1e-5, 1.0)
    assert config.wishart_df is None  # each layer's nu is its own rank (Appendix E.1; test_monteclora_layer)


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("n_components", 0, "must be >= 1, got 0"),
        ("r", 0, "must be >= 1, got 0"),
        ("r", 2.5, "must be >= 1, got 2.5"),
        ("lora_dropout", 1.0, "must be in [0, 1), got 1.0"),
        ("sample_scaler", -1.0, "must be >= 0, got -1.0"),
        ("kl_weight", float("nan"), "must be >= 0, got nan"),
        ("dirichlet_prior", 0.0, "must be > 0, got 0.0"),
        ("dirichlet_init", "random", "must be 'ones' or 'uniform', got 'random'"),
        ("wishart_df", 3, "must be null or >= the largest rank (8), got 3"),
        ("sampler", "fast", "must be 'auto', 'async' or 'sync', got 'fast'"),
        ("seed", -1, "must be an integer >= 0, got -1"),
        ("target_modules", [1, 2], "must be a module name, a list of names, or null, got [1, 2]"),
    ],
)
def test_invalid_values_name_the_field(field, value, problem):
    """A ValueError (for library callers) that carries the field as its key (for the CLI's one line)."""
    with pytest.raises(InputError) as caught:
        MonteCLoRAConfig(**{field: value})
    assert isinstance(caught.value, ValueError)
    assert (caught.value.key, caught.value.problem) == (field, problem)
    assert str(caught.value) == f"{field}: {problem}"


def test_json_round_trip():
    config = MonteCLoRAConfig(r=16, lora_alpha=32, target_modules=["q_proj"], dirichlet_init="uniform", wishart_df=20)
    assert MonteCLoRAConfig.from_dict(config.to_dict()) == config


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="unknown MonteCLoRAConfig field.*rank"):
        MonteCLoRAConfig.from_dict({"rank": 8})
