import pytest

from monte_ds import MonteCLoRAConfig


def test_defaults_follow_the_paper():
    config = MonteCLoRAConfig()
    assert (config.n_components, config.sample_scaler, config.kl_weight, config.dirichlet_prior) == (4, 5e-3, 1e-5, 1.0)
    assert config.degrees_of_freedom == config.r  # nu defaults to r (Appendix E.1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_components", 0, "n_components must be >= 1, got 0"),
        ("r", 0, "r must be >= 1"),
        ("r", 2.5, "r must be >= 1"),
        ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
        ("sample_scaler", -1.0, "sample_scaler must be >= 0"),
        ("kl_weight", float("nan"), "kl_weight must be >= 0"),
        ("dirichlet_prior", 0.0, "dirichlet_prior must be > 0"),
        ("dirichlet_init", "random", "dirichlet_init must be 'ones' or 'uniform'"),
        ("wishart_df", 3, "wishart_df must be null or >= the largest rank (8)"),
        ("sampler", "fast", "sampler must be 'auto', 'async' or 'sync'"),
        ("seed", -1, "seed must be an integer >= 0"),
        ("target_modules", [1, 2], "target_modules must be"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        MonteCLoRAConfig(**{field: value})


def test_json_round_trip():
    config = MonteCLoRAConfig(r=16, lora_alpha=32, target_modules=["q_proj"], dirichlet_init="uniform", wishart_df=20)
    assert MonteCLoRAConfig.from_dict(config.to_dict()) == config


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="unknown MonteCLoRAConfig field.*rank"):
        MonteCLoRAConfig.from_dict({"rank": 8})
