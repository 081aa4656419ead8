"""monte-ds sweep: statistics against hand-computed values, grid expansion, plan-only, restart
skipping, failure accounting and plots.

The orchestration tests drive the sweep with `--launcher` pointing at a small script that obeys
`monte-ds train`'s contract (exit codes, metrics.json, config.json, report/report.json built by the
evaluation module's own `build_report`), so each run takes milliseconds; test_sweep_e2e.py runs
the real training CLI.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from scipy.stats import wilcoxon

from monte_ds.cli import main as monte_ds
from monte_ds.errors import UserError
from monte_ds.evaluation.report import build_report
from monte_ds.sweep.grid import GridAxis, Run, expand, parse_grid_axis, train_command
from monte_ds.sweep.outcomes import Metric, Outcome, read_outcome, report_scores
from monte_ds.sweep.report import build_sweep_report, pooled_bins, summarize_sweep, write_sweep_report
from monte_ds.sweep.stats import effect_size, minimum_detectable_effect, paired_test, summarize
from monte_ds.train.checkpoints import mark_complete


# --- statistics -----------------------------------------------------------------------------


def test_summary_of_an_extrinsic_metric():
    s = summarize([0.5, 0.7, 0.6, 0.9], higher_is_better=True)
    assert (s.n, s.n_failed, s.best, s.worst) == (4, 0, 0.9, 0.5)
    assert s.median == pytest.approx(0.65) and s.robustness == pytest.approx(0.65)  # eq. 3
    assert s.spread == pytest.approx(0.4)


def test_summary_of_an_intrinsic_metric_is_one_over_the_median():
    s = summarize([2.0, 5.0, 4.0], higher_is_better=False)
    assert (s.best, s.worst, s.median, s.spread) == (2.0, 5.0, 4.0, 3.0)
    assert s.robustness == pytest.approx(0.25)  # eq. 2


def test_a_failed_run_ranks_below_every_finished_run():
    s = summarize([0.5, None, 0.7], higher_is_better=True)
    assert (s.n, s.n_failed, s.best, s.median) == (3, 1, 0.7, 0.5)
    assert s.worst == -math.inf and s.spread == math.inf


def test_a_median_on_failures_makes_intrinsic_robustness_zero():
    s = summarize([2.0, 4.0, None, None], higher_is_better=False)
    assert s.best == 2.0 and s.median == math.inf and s.robustness == 0.0


def test_all_runs_failed():
    s = summarize([None, None], higher_is_better=True)
    assert s.n_failed == 2 and s.best == -math.inf and math.isnan(s.spread)


def test_wilcoxon_against_the_exact_distribution():
    # differences 1, -0.2, 2, 3, 1.5: ranks 2, 1, 4, 5, 3; W- = 1; P(T <= 1 | n=5) = 2/32, two-sided 4/32.
    test = paired_test([6, 7, 8, 9, 5.5], [5, 7.2, 6, 6, 4], higher_is_better=True)
    assert (test.n_pairs, test.a_better, test.b_better, test.ties) == (5, 4, 1, 0)
    assert test.statistic == 1.0 and test.p_value == pytest.approx(4 / 32)


def test_wilcoxon_orients_lower_is_better_metrics():
    test = paired_test([5, 7.2, 6, 6, 4], [6, 7, 8, 9, 5.5], higher_is_better=False)
    assert (test.a_better, test.b_better) == (4, 1) and test.p_value == pytest.approx(4 / 32)


def test_wilcoxon_counts_a_failure_as_the_largest_loss_and_double_failures_as_ties():
    # A failed on the first pair: rank 6 for B; A wins the other five by ranks 1..5. W- = 6:
    # 14 of the 64 sign patterns have T <= 6, two-sided p = 28/64. The last pair failed on both sides.
    test = paired_test([None, 1, 2, 3, 4, 5, None], [1, 0, 0, 0, 0, 0, None], higher_is_better=True)
    assert (test.n_pairs, test.a_better, test.b_better, test.ties) == (7, 5, 1, 1)
    assert test.statistic == 6.0 and test.p_value == pytest.approx(28 / 64)


def test_wilcoxon_is_undefined_when_every_pair_ties():
    test = paired_test([0.5, None], [0.5, None], higher_is_better=True)
    assert test.ties == 2 and test.statistic is None and test.p_value is None


# --- effect size and minimum detectable effect ------------------------------------------------


def test_the_effect_interval_covers_a_known_shift():
    rng = np.random.default_rng(7)
    b = rng.normal(0.5, 0.1, 30)
    a = b + 0.2 + rng.normal(0.0, 0.05, 30)
    effect = effect_size(list(a), list(b), higher_is_better=True)
    assert effect.ci_low < 0.2 < effect.ci_high and effect.ci_low > 0  # covers the shift, excludes no effect
    assert effect.difference == pytest.approx(float(np.median(a - b)))
    assert effect.sd_difference == pytest.approx(float(np.std(a - b, ddof=1)))
    assert effect.mde == pytest.approx(minimum_detectable_effect(30, effect.sd_difference))


def test_the_effect_is_a_minus_b_in_the_metrics_units_whatever_its_direction():
    nll_b = [1.0, 1.5, 2.0, 0.75, 1.125, 0.875]  # binary fractions: every difference is exactly -0.25
    nll_a = [x - 0.25 for x in nll_b]  # A's NLL 0.25 lower: A better
    effect = effect_size(nll_a, nll_b, higher_is_better=False)
    assert effect.difference == effect.ci_low == effect.ci_high == -0.25
    assert effect.sd_difference == 0.0 and effect.mde == 0.0
    assert paired_test(nll_a, nll_b, higher_is_better=False).a_better == 6


def test_the_bootstrap_interval_is_reproducible_with_its_seed():
    rng = np.random.default_rng(3)
    a, b = list(rng.normal(0.6, 0.2, 12)), list(rng.normal(0.5, 0.2, 12))
    assert effect_size(a, b, True) == effect_size(a, b, True)
    # With few resamples the interval's ends move with the seed (with 10,000 they land on the same
    # order statistics of the medians): the seed, not chance, fixes them.
    few = [effect_size(a, b, True, seed=seed, resamples=40) for seed in (0, 0, 1)]
    assert few[0] == few[1] and (few[2].ci_low, few[2].ci_high) != (few[0].ci_low, few[0].ci_high)
    assert few[2].difference == few[0].difference


def test_failures_are_unbounded_differences_in_the_effect():
    # Differences -inf, 1, 2, 3, 4: the median is 2; a resample of 5 pairs has its median on the
    # failure when it holds it 3 or more times (probability 5.8% > 2.5%): the lower bound is -inf.
    effect = effect_size([None, 1, 2, 3, 4], [0, 0, 0, 0, 0], higher_is_better=True)
    assert effect.difference == 2.0 and effect.ci_low == -math.inf and effect.ci_high == 4.0
    assert effect.sd_difference == pytest.approx(float(np.std([1, 2, 3, 4], ddof=1)))
    # One failure each way: no midpoint between -inf and +inf; by symmetry the median difference is 0.
    assert effect_size([None, 1.0], [1.0, None], higher_is_better=True).difference == 0.0


def test_the_minimum_detectable_effect_for_the_number_of_pairs():
    assert minimum_detectable_effect(24, 1.0) == pytest.approx(0.6112, abs=1e-4)  # 24 pairs: 0.61 SD
    assert minimum_detectable_effect(24, 0.1) == pytest.approx(0.06112, abs=1e-5)  # in the spread's units
    assert minimum_detectable_effect(5, 1.0) == math.inf  # 5 pairs: p >= 2/32 > 0.05 whatever the data
    assert math.isfinite(minimum_detectable_effect(6, 1.0))
    # It shrinks like 1/sqrt(n): sqrt(n) * MDE falls towards its normal-quantile limit.
    scaled = [math.sqrt(n) * minimum_detectable_effect(n, 1.0) for n in (8, 24, 96, 384, 1536)]
    assert scaled == sorted(scaled, reverse=True)
    assert minimum_detectable_effect(1536, 1.0) / minimum_detectable_effect(384, 1.0) == pytest.approx(0.5, rel=2e-3)


def test_the_minimum_detectable_effect_has_its_stated_power():
    # Normal differences with mean = the MDE of 24 pairs: the signed-rank test at 0.05 finds them ~80% of the time.
    rng = np.random.default_rng(0)
    shift = minimum_detectable_effect(24, 1.0)
    power = np.mean([wilcoxon(rng.normal(shift, 1.0, 24)).pvalue < 0.05 for _ in range(1000)])
    assert 0.75 <= power <= 0.85


# --- grid -----------------------------------------------------------------------------------


def test_grid_expands_every_method_point_and_seed_with_matched_pairs():
    axes = [
        parse_grid_axis("training.learning_rate=3e-4,3e-5"),
        parse_grid_axis("training.per_device_train_batch_size=8,16,32"),
    ]
    runs = expand(axes, ["lora", "monteclora"], [0, 1])
    assert len(runs) == 2 * 3 * 2 * 2 and len({run.run_id for run in runs}) == len(runs)
    assert runs[0].run_id == "lora/learning_rate=3e-4__per_device_train_batch_size=8__seed=0"
    by_method = {m: [run.match_key for run in runs if run.method == m] for m in ("lora", "monteclora")}
    assert by_method["lora"] == by_method["monteclora"]  # every lora run has its monteclora pair
    assert len(set(by_method["lora"])) == 12


def test_train_command_sets_the_point_method_seed_and_output(tmp_path):
    axes = [GridAxis("training.learning_rate", ("1e-3",)), GridAxis("adapter.r", ("4",))]
    (run,) = expand(axes, ["monteclora"], [7])
    command = train_command(
        ["monte-ds", "train"], tmp_path / "base.json", [("training.max_steps", "5")], run, tmp_path / "out"
    )
    sets = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    assert command[:4] == ["monte-ds", "train", "--config", str(tmp_path / "base.json")]
    assert sets == [
        "training.max_steps=5",
        "training.learning_rate=1e-3",
        "adapter.r=4",
        "adapter.method=monteclora",
        "training.seed=7",
        f"training.output_dir={tmp_path / 'out'}",
    ]


def test_ambiguous_axis_names_use_the_whole_key():
    axes = [GridAxis("training.seed_offset", ("1",)), GridAxis("adapter.r", ("4",)), GridAxis("model.r", ("2",))]
    (run,) = expand(axes, ["lora"], [0])
    assert run.run_id == "lora/seed_offset=1__adapter.r=4__model.r=2__seed=0"


@pytest.mark.parametrize("text", ["training.learning_rate", "=1,2", "training.learning_rate=1,,2", "a..b=1", "x=1,1"])
def test_malformed_grid_axes_are_user_errors(text):
    with pytest.raises(UserError, match="--grid"):
        parse_grid_axis(text)


# --- the command line, driven by a stand-in for `monte-ds train` ----------------------------

FAKE_TRAIN = r'''
"""Obeys monte-ds train's contract; the score is a function of the overrides."""
import json, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
out = Path(args["training.output_dir"])
with open(sys.argv[1], "a") as calls:
    calls.write(args["training.output_dir"] + "\n")
lr = args["training.learning_rate"]
if lr == "reject":
    print("monte-ds: error: training.learning_rate: must be a number", file=sys.stderr); sys.exit(2)
if lr == "crash":
    sys.exit(1)
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({"eval": {"suites": ["gsm8k"]}}))
if lr == "nan":
    (out / "metrics.json").write_text(json.dumps({"status": "diverged", "global_step": 3}))
    sys.exit(3)
bs = int(args["training.per_device_train_batch_size"])
score = float(lr) * bs
if args["adapter.method"] == "monteclora":  # better by a margin distinct for every pair: no ties in the test
    score += 0.5 * score + 0.01 * bs
report = json.loads(Path(sys.argv[2]).read_text())
report["lm_eval"]["results"]["gsm8k"]["exact_match,strict-match"] = score
(out / "report").mkdir()
(out / "report" / "report.json").write_text(json.dumps(report))
(out / "metrics.json").write_text(json.dumps({"status": "completed", "global_step": 5, "train_loss": 1.0}))
'''


@pytest.fixture
def fake_train(tmp_path) -> tuple[str, Path]:
    """(--launcher value, file listing every launched output dir)."""
    script, calls, template = tmp_path / "fake_train.py", tmp_path / "calls.txt", tmp_path / "report.json"
    script.write_text(FAKE_TRAIN)
    template.write_text(
        json.dumps(
            build_report(
                {
                    "results": {
                        "gsm8k": {
                            "alias": "gsm8k",
                            "exact_match,strict-match": 0.0,
                            "exact_match_stderr,strict-match": 0.0,
                        }
                    },
                    "higher_is_better": {"gsm8k": {"exact_match": True}},
                },
                calibration={},
                predictive=None,
                options={},
                metadata={},
                figure_files=[],
                suites={},
                generation={},
            )
        )
    )
    calls.touch()
    return shlex.join([sys.executable, str(script), str(calls), str(template)]), calls


@pytest.fixture
def base_config(tmp_path) -> Path:
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"training": {"max_steps": 5}}))
    return path


def sweep_args(config: Path, output: Path, launcher: str, lrs: str = "0.1,0.2,crash,nan") -> list[str]:
    return [
        "sweep",
        "--config",
        str(config),
        "--grid",
        f"training.learning_rate={lrs}",
        "--grid",
        "training.per_device_train_batch_size=1,2",
        "--output",
        str(output),
        "--launcher",
        launcher,
    ]


def test_plan_only_prints_one_command_per_run_and_runs_nothing(tmp_path, base_config, fake_train, capsys):
    launcher, calls = fake_train
    output = tmp_path / "sweep"
    assert monte_ds([*sweep_args(base_config, output, launcher), "--seeds", "0,1", "--plan-only"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 4 * 2 * 2 * 2
    assert all(command[: len(shlex.split(launcher))] == shlex.split(launcher) for command in commands)
    run_dir = output / "runs" / "monteclora" / "learning_rate=nan__per_device_train_batch_size=2__seed=1"
    (command,) = [c for c in commands if f"training.output_dir={run_dir}" in c]
    assert command[-10:-2] == [
        "--set",
        "training.learning_rate=nan",
        "--set",
        "training.per_device_train_batch_size=2",
        "--set",
        "adapter.method=monteclora",
        "--set",
        "training.seed=1",
    ]
    assert command[command.index("--config") + 1] == str(base_config)
    assert not output.exists() and calls.read_text() == ""


def test_an_interrupted_run_with_a_checkpoint_is_resumed(tmp_path, base_config, fake_train, capsys):
    launcher, _ = fake_train
    output = tmp_path / "sweep"
    interrupted = output / "runs" / "lora" / "learning_rate=0.1__per_device_train_batch_size=2__seed=0"
    mark_complete(interrupted / "checkpoint-4", global_step=4)
    (interrupted / "checkpoint-6").mkdir()  # a save killed half-way: not a checkpoint to resume from
    assert monte_ds([*sweep_args(base_config, output, launcher, lrs="0.1"), "--methods", "lora", "--plan-only"]) == 0
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" --resume")]
    assert len(resumed) == 1 and f"training.output_dir={interrupted}" in resumed[0]


def test_sweep_records_failures_writes_the_report_and_restarts_only_unfinished_runs(tmp_path, base_config, fake_train):
    launcher, calls = fake_train
    output = tmp_path / "sweep"
    assert monte_ds(sweep_args(base_config, output, launcher)) == 0
    assert len(calls.read_text().splitlines()) == 16

    report = json.loads((output / "sweep.json").read_text())
    assert report["counts"] == {
        m: {"completed": 4, "diverged": 2, "failed": 2, "pending": 0} for m in ("lora", "monteclora")
    }
    (section,) = report["metrics"]
    assert (section["task"], section["metric"], section["higher_is_better"]) == (
        "gsm8k",
        "exact_match,strict-match",
        True,
    )
    lora = section["methods"]["lora"]
    # Finished scores lr*bs: 0.1, 0.2, 0.2, 0.4; four failed runs rank below them.
    assert (lora["n"], lora["n_failed"], lora["best"]) == (8, 4, pytest.approx(0.4))
    assert lora["worst"] is None and lora["spread"] is None and lora["median"] is None  # -inf / inf in JSON
    assert section["methods"]["monteclora"]["best"] == pytest.approx(0.62)
    (comparison,) = section["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["n_pairs"]) == ("monteclora", "lora", 8)
    assert (comparison["a_better"], comparison["b_better"], comparison["ties"]) == (4, 0, 4)
    assert comparison["p_value"] == pytest.approx(2 / 16)  # all four untied pairs favour A: exact 2 * (1/2)^4

    statuses = {run["run_id"]: run["status"] for run in report["runs"]}
    assert statuses["lora/learning_rate=crash__per_device_train_batch_size=1__seed=0"] == "failed"
    assert statuses["monteclora/learning_rate=nan__per_device_train_batch_size=2__seed=0"] == "diverged"
    plot = output / section["plot"]
    assert matplotlib.image.imread(plot).ndim == 3
    markdown = (output / "sweep.md").read_text()
    assert "| lora | 8 | 4 | 0.4 | failed | failed | ∞ |" in markdown and section["plot"] in markdown
    # Point by point: LoRA's score lr * bs at each (lr, bs), the failures counted apart.
    by_point = {tuple(row["point"].values()): row["methods"]["lora"] for row in section["by_point"]}
    assert by_point[("0.2", "2")] == {"mean": pytest.approx(0.4), "n": 1, "n_failed": 0}
    assert by_point[("nan", "1")] == {"mean": None, "n": 0, "n_failed": 1}
    assert "| method | 0.1 / 1 | 0.1 / 2 | 0.2 / 1 | 0.2 / 2 | crash / 1 | crash / 2 | nan / 1 | nan / 2 |" in markdown
    assert "| lora | 0.1 (1) | 0.2 (1) | 0.2 (1) | 0.4 (1) | —, 1 failed |" in markdown

    # A restart trains only the crashed runs: completed and diverged runs are results.
    calls.write_text("")
    assert monte_ds(sweep_args(base_config, output, launcher)) == 0
    relaunched = [str(Path(line).relative_to(output / "runs")) for line in calls.read_text().splitlines()]
    assert relaunched == [
        f"{method}/learning_rate=crash__per_device_train_batch_size={bs}__seed=0"
        for method in ("lora", "monteclora")
        for bs in (1, 2)
    ]


@pytest.mark.parametrize(
    ("methods", "pairs"),
    [
        ("lora,dora,adalora,monteclora", [("monteclora", "lora"), ("monteclora", "dora"), ("monteclora", "adalora")]),
        ("full,ia3,lora", [("full", "ia3"), ("full", "lora"), ("ia3", "lora")]),  # no MonteCLoRA: every pair
    ],
)
def test_wilcoxon_compares_monteclora_with_each_other_method(tmp_path, base_config, fake_train, methods, pairs):
    launcher, _ = fake_train
    output = tmp_path / "sweep"
    assert monte_ds([*sweep_args(base_config, output, launcher, lrs="0.1,0.2"), "--methods", methods]) == 0
    (section,) = json.loads((output / "sweep.json").read_text())["metrics"]
    assert [(c["a"], c["b"]) for c in section["comparisons"]] == pairs
    assert all(c["n_pairs"] == 4 for c in section["comparisons"])


def test_each_paired_test_reports_its_effect_size_and_detectable_effect(tmp_path, base_config, fake_train):
    launcher, _ = fake_train
    output = tmp_path / "sweep"
    assert monte_ds([*sweep_args(base_config, output, launcher, lrs="0.1,0.2"), "--seeds", "0,1,2"]) == 0
    report = json.loads((output / "sweep.json").read_text())
    ((comparison,),) = [section["comparisons"] for section in report["metrics"]]
    # MonteCLoRA - LoRA = 0.5 lr bs + 0.01 bs: 0.06, 0.12, 0.11, 0.22 at the four points, each for 3 seeds.
    differences = np.repeat([0.06, 0.12, 0.11, 0.22], 3)
    assert comparison["n_pairs"] == 12 and comparison["difference"] == pytest.approx(0.115)
    assert 0.06 <= comparison["ci_low"] <= 0.115 <= comparison["ci_high"] <= 0.22
    assert comparison["sd_difference"] == pytest.approx(float(np.std(differences, ddof=1)))
    assert comparison["mde"] == pytest.approx(minimum_detectable_effect(12, float(np.std(differences, ddof=1))))
    assert report["effect_assumptions"]["alpha"] == 0.05 and report["effect_assumptions"]["power"] == 0.8
    markdown = (output / "sweep.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| A=monteclora vs B=lora |"))
    assert row.split(" | ")[7].startswith("0.115 [") and "MDE" in markdown and "power 0.8 at α = 0.05" in markdown


def test_set_for_overrides_one_methods_runs_only(tmp_path, base_config, fake_train, capsys):
    launcher, _ = fake_train
    output = tmp_path / "sweep"
    args = [*sweep_args(base_config, output, launcher, lrs="0.1"), "--set-for", "monteclora:eval.predictive_samples=10"]
    assert monte_ds([*args, "--plan-only"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 4
    for command in commands:
        assert ("eval.predictive_samples=10" in command) == ("adapter.method=monteclora" in command)
    assert monte_ds(args) == 0  # the runs still pair: one comparison over both grid points
    report = json.loads((output / "sweep.json").read_text())
    assert report["set_for"] == {"monteclora": {"eval.predictive_samples": "10"}}
    assert report["metrics"][0]["comparisons"][0]["n_pairs"] == 2
    # The same output with other per-method overrides would mix incomparable runs.
    assert monte_ds([*sweep_args(base_config, output, launcher, lrs="0.1"), "--methods", "lora"]) == 2
    assert "--output" in capsys.readouterr().err
    assert monte_ds([*args[:-2], "--set-for", "monteclora:eval.predictive_samples=10", "--methods", "lora"]) == 0


def test_pairs_first_trains_every_method_of_a_point_before_the_next(tmp_path, base_config, fake_train, capsys):
    launcher, calls = fake_train
    output = tmp_path / "sweep"
    args = [*sweep_args(base_config, output, launcher, lrs="0.1,0.2"), "--seeds", "0,1", "--pairs-first"]
    assert monte_ds([*args, "--plan-only"]) == 0
    planned = [
        next(a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("training.output_dir="))
        for line in capsys.readouterr().out.splitlines()
    ]
    assert monte_ds(args) == 0
    trained = calls.read_text().splitlines()
    assert trained == planned and len(trained) == 16
    names = [str(Path(line).relative_to(output / "runs")) for line in trained]
    expected = [
        f"{method}/learning_rate={lr}__per_device_train_batch_size={bs}__seed={seed}"
        for seed in (0, 1)
        for lr in ("0.1", "0.2")
        for bs in (1, 2)
        for method in ("lora", "monteclora")
    ]
    assert names == expected
    report = json.loads((output / "sweep.json").read_text())
    assert [run["run_id"] for run in report["runs"]][:2] == [  # the report keeps the method-by-method order
        "lora/learning_rate=0.1__per_device_train_batch_size=1__seed=0",
        "lora/learning_rate=0.1__per_device_train_batch_size=1__seed=1",
    ]


def test_report_only_leaves_unfinished_runs_pending(tmp_path, base_config, fake_train):
    launcher, calls = fake_train
    output = tmp_path / "sweep"
    assert monte_ds([*sweep_args(base_config, output, launcher, lrs="0.1,0.2"), "--methods", "lora"]) == 0
    calls.write_text("")
    assert (
        monte_ds([*sweep_args(base_config, output, launcher, lrs="0.1,0.2,0.3"), "--methods", "lora", "--report-only"])
        == 0
    )
    report = json.loads((output / "sweep.json").read_text())
    assert calls.read_text() == ""
    assert report["counts"]["lora"] == {"completed": 4, "diverged": 0, "failed": 0, "pending": 2}
    assert report["metrics"][0]["methods"]["lora"]["n"] == 4


def test_a_config_the_trainer_rejects_stops_the_sweep(tmp_path, base_config, fake_train, capsys):
    launcher, _ = fake_train
    assert monte_ds(sweep_args(base_config, tmp_path / "sweep", launcher, lrs="reject")) == 2
    assert "training.learning_rate: must be a number" in capsys.readouterr().err


def test_a_restart_with_another_base_config_is_refused(tmp_path, base_config, fake_train, capsys):
    launcher, _ = fake_train
    output = tmp_path / "sweep"
    assert monte_ds([*sweep_args(base_config, output, launcher, lrs="0.1"), "--methods", "lora"]) == 0
    assert (
        monte_ds(
            [
                *sweep_args(base_config, output, launcher, lrs="0.1"),
                "--methods",
                "lora",
                "--set",
                "training.max_steps=9",
            ]
        )
        == 2
    )
    assert "--output" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--grid", "training.seed=1,2"], "--grid: training.seed is set by the sweep"),
        (["--set", "training.learning_rate=1"], "training.learning_rate is given more than once"),
        (["--seeds", "0,x"], "--seeds"),
        (["--methods", "lora,,monteclora"], "--methods"),
        (["--methods", "lora,qlora"], "--methods: unknown method 'qlora' (choose from monteclora, full, lora"),
        (["--plan-only", "--report-only"], "not allowed with"),
        (["--set-for", "qlora:eval.limit=3"], "--set-for: expected METHOD:key.path=value with METHOD one of"),
        (["--set-for", "monteclora:eval.limit"], "--set-for: expected key.path=value"),
        (["--set-for", "lora:training.seed=3"], "--set-for: training.seed is set by the sweep"),
        (["--set-for", "lora:training.learning_rate=1"], "--set-for: training.learning_rate is given more than once"),
        (
            ["--set-for", "lora:eval.limit=1", "--set-for", "lora:eval.limit=2"],
            "eval.limit is given more than once for lora",
        ),
    ],
)
def test_bad_flags_are_one_line_user_errors(tmp_path, base_config, fake_train, capsys, extra, message):
    launcher, _ = fake_train
    assert monte_ds([*sweep_args(base_config, tmp_path / "sweep", launcher, lrs="0.1"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_config_is_a_user_error(tmp_path, capsys):
    assert monte_ds(["sweep", "--config", str(tmp_path / "nope.json"), "--output", str(tmp_path)]) == 2
    assert "--config: no such file" in capsys.readouterr().err


# --- the record: finished runs kept outside the output dir (a fresh checkout has no outputs/) ---


def _record_files(record: Path) -> set[str]:
    return {str(path.relative_to(record)) for path in record.rglob("*") if path.is_file()}


def test_a_record_keeps_the_small_files_of_finished_runs_and_survives_a_lost_output(
    tmp_path, base_config, fake_train, capsys
):
    launcher, calls = fake_train
    output, record = tmp_path / "outputs" / "sweep", tmp_path / "docs" / "record"
    args = [*sweep_args(base_config, output, launcher, lrs="0.1,crash,nan"), "--record", str(record)]
    assert monte_ds(args) == 0
    before = json.loads((output / "sweep.json").read_text())
    done = "lora/learning_rate=0.1__per_device_train_batch_size=2__seed=0"
    (output / "runs" / done / "adapter").mkdir()
    (output / "runs" / done / "adapter" / "weights.bin").write_bytes(b"\0" * 64)  # never recorded

    files = _record_files(record)
    assert "settings.json" in files and not any("adapter" in name for name in files)
    for method in ("lora", "monteclora"):
        for bs in (1, 2):
            point = f"runs/{method}/learning_rate={{}}__per_device_train_batch_size={bs}__seed=0"
            assert {
                f"{point.format('0.1')}/{name}" for name in ("config.json", "metrics.json", "report/report.json")
            } <= files
            assert {f"{point.format('nan')}/{name}" for name in ("config.json", "metrics.json")} <= files  # diverged
            assert not any(name.startswith(point.format("crash")) for name in files)  # crashed: tried again
    assert json.loads((record / "settings.json").read_text()) == json.loads((output / "settings.json").read_text())
    timing = json.loads((record / "runs" / done / "timing.json").read_text())
    assert timing["wall_s"] >= 0 and len(timing["load_average"]) == 3

    # A fresh checkout: the outputs are gone, the record is there. Only the crashed runs are left to do.
    import shutil

    shutil.rmtree(tmp_path / "outputs")
    assert monte_ds([*args, "--plan-only"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert len(planned) == 4 and all("learning_rate=crash" in line for line in planned)
    assert monte_ds([*args, "--report-only"]) == 0
    after = json.loads((output / "sweep.json").read_text())
    # Crashes are not recorded (a restart tries them again): pending until then; every finished
    # run is reported with its recorded status and scores.
    assert after["counts"] == {
        m: {"completed": 2, "diverged": 2, "failed": 0, "pending": 2} for m in ("lora", "monteclora")
    }
    finished = {run["run_id"]: (run["status"], run["scores"]) for run in before["runs"] if run["status"] != "failed"}
    assert {
        run["run_id"]: (run["status"], run["scores"]) for run in after["runs"] if run["status"] != "pending"
    } == finished
    assert {run["run_id"]: run["output_dir"] for run in after["runs"]}[done] == str(record / "runs" / done)
    assert after["record"] == str(record)
    calls.write_text("")
    assert monte_ds(args) == 0  # trains the crashed runs only; the recorded ones are skipped
    relaunched = sorted(str(Path(line).relative_to(output / "runs")) for line in calls.read_text().splitlines())
    assert relaunched == sorted(
        f"{m}/learning_rate=crash__per_device_train_batch_size={bs}__seed=0"
        for m in ("lora", "monteclora")
        for bs in (1, 2)
    )
    assert json.loads((output / "sweep.json").read_text())["counts"]["lora"] == {
        "completed": 2,
        "diverged": 2,
        "failed": 2,
        "pending": 0,
    }


def test_runs_finished_before_the_record_existed_are_recorded_without_training(tmp_path, base_config, fake_train):
    launcher, calls = fake_train
    output, record = tmp_path / "sweep", tmp_path / "record"
    args = sweep_args(base_config, output, launcher, lrs="0.1,0.2")
    assert monte_ds(args) == 0
    calls.write_text("")
    assert monte_ds([*args, "--record", str(record)]) == 0
    assert calls.read_text() == ""
    recorded = {path.parent.relative_to(record / "runs").as_posix() for path in record.rglob("metrics.json")}
    assert len(recorded) == 8 and "monteclora/learning_rate=0.2__per_device_train_batch_size=1__seed=0" in recorded


def test_a_record_of_other_settings_is_refused(tmp_path, base_config, fake_train, capsys):
    launcher, calls = fake_train
    record = tmp_path / "record"
    assert monte_ds([*sweep_args(base_config, tmp_path / "a", launcher, lrs="0.1"), "--record", str(record)]) == 0
    other = [*sweep_args(base_config, tmp_path / "b", launcher, lrs="0.1"), "--set", "training.max_steps=9"]
    calls.write_text("")
    assert monte_ds([*other, "--record", str(record)]) == 2
    err = capsys.readouterr().err
    assert "use a new --record" in err and len(err.strip().splitlines()) == 1 and calls.read_text() == ""
    for mode in ("--plan-only", "--report-only"):  # nor are its runs planned around or reported
        assert monte_ds([*other, "--record", str(record), mode]) == 2
        assert "use a new --record" in capsys.readouterr().err


def test_a_record_that_is_a_file_is_a_user_error(tmp_path, base_config, fake_train, capsys):
    launcher, _ = fake_train
    (tmp_path / "record").write_text("")
    assert monte_ds([*sweep_args(base_config, tmp_path / "sweep", launcher), "--record", str(tmp_path / "record")]) == 2
    err = capsys.readouterr().err
    assert "--record" in err and "is not a folder" in err and len(err.strip().splitlines()) == 1


# --- reading a run ---------------------------------------------------------------------------


def test_report_scores_reads_lm_eval_metrics_and_calibration():
    report = build_report(
        {
            "results": {
                "arc_easy": {"alias": "arc_easy", "acc,none": 0.6, "acc_stderr,none": 0.01, "acc_norm,none": 0.62},
                "gsm8k": {"exact_match,strict-match": 0.3, "exact_match,flexible-extract": 0.35},
            },
            "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, "gsm8k": {"exact_match": True}},
        },
        calibration={"arc_easy": {"nll": 0.9, "nll_stderr": 0.02, "ece": 0.05}},
        predictive=None,
        options={},
        metadata={},
        figure_files=[],
        suites={},
        generation={},
    )
    scores = report_scores(report)
    assert scores == {
        Metric("arc_easy", "acc,none", True): 0.6,
        Metric("arc_easy", "acc_norm,none", True): 0.62,
        Metric("gsm8k", "exact_match,strict-match", True): 0.3,
        Metric("gsm8k", "exact_match,flexible-extract", True): 0.35,
        Metric("arc_easy", "nll", False): 0.9,
        Metric("arc_easy", "ece", False): 0.05,
    }
    assert Metric("gsm8k", "exact_match,strict-match", True).label == "exact_match (strict-match)"
    assert Metric("arc_easy", "acc,none", True).label == "acc"


def test_a_completed_run_without_its_configured_report_is_not_finished(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eval": {"suites": ["gsm8k"]}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert read_outcome(tmp_path).status == "pending"
    (tmp_path / "config.json").write_text(json.dumps({"eval": {"suites": []}}))
    assert read_outcome(tmp_path).status == "completed"


def test_a_run_whose_evaluation_was_interrupted_is_not_finished(tmp_path):
    """A killed generative suite leaves a report with that suite partial: not a result yet."""
    (tmp_path / "config.json").write_text(json.dumps({"eval": {"suites": ["gsm8k"]}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "report").mkdir()
    report = {"suites": {"gsm8k": {"status": "partial", "tasks": ["gsm8k"]}}, "lm_eval": {"results": {}}}
    (tmp_path / "report" / "report.json").write_text(json.dumps(report))
    outcome = read_outcome(tmp_path)
    assert outcome.status == "pending" and "gsm8k" in outcome.detail
    report["suites"]["gsm8k"]["status"] = "completed"
    (tmp_path / "report" / "report.json").write_text(json.dumps(report))
    assert read_outcome(tmp_path).status == "completed"


def test_report_scores_reads_the_brier_score_and_the_posterior_predictive_metrics():
    calibration = {"piqa": {"acc": 0.6, "nll": 0.9, "nll_stderr": 0.02, "ece": 0.05, "brier": 0.4}}
    report = build_report(
        {"results": {"piqa": {"acc,none": 0.6}}, "higher_is_better": {"piqa": {"acc": True}}},
        calibration=calibration,
        predictive={"piqa": {"acc": 0.65, "nll": 0.8, "ece": 0.03, "brier": 0.35}},
        options={"predictive_samples": 10},
        metadata={},
        figure_files=[],
        suites={},
        generation={},
    )
    assert report_scores(report) == {
        Metric("piqa", "acc,none", True): 0.6,
        Metric("piqa", "nll", False): 0.9,
        Metric("piqa", "ece", False): 0.05,
        Metric("piqa", "brier", False): 0.4,
        Metric("piqa", "acc,predictive", True): 0.65,
        Metric("piqa", "nll,predictive", False): 0.8,
        Metric("piqa", "ece,predictive", False): 0.03,
        Metric("piqa", "brier,predictive", False): 0.35,
    }
    assert Metric("piqa", "brier,predictive", False).label == "brier (predictive)"
    assert Metric("piqa", "acc,predictive", True).point == Metric("piqa", "acc,none", True)
    assert Metric("piqa", "nll,predictive", False).point == Metric("piqa", "nll", False)


def test_methods_without_a_posterior_enter_predictive_metrics_with_their_one_prediction():
    runs = [Run(method, seed, (), f"{method}/seed={seed}") for method in ("lora", "monteclora") for seed in (0, 1)]
    nll, predictive = Metric("piqa", "nll", False), Metric("piqa", "nll,predictive", False)
    outcomes = {
        "lora/seed=0": Outcome("completed", {nll: 1.0}),
        "lora/seed=1": Outcome("completed", {nll: 1.2}),
        "monteclora/seed=0": Outcome("completed", {nll: 0.9, predictive: 0.8}),
        "monteclora/seed=1": Outcome("completed", {nll: 1.3, predictive: 1.1}),
    }
    sections = {s["metric"]: s for s in summarize_sweep(runs, outcomes, ["lora", "monteclora"])}
    assert sections["nll,predictive"]["methods"]["lora"]["scores"] == [1.0, 1.2]  # LoRA's point prediction
    assert sections["nll,predictive"]["methods"]["monteclora"]["scores"] == [0.8, 1.1]
    (comparison,) = sections["nll,predictive"]["comparisons"]
    assert (comparison["a_better"], comparison["difference"]) == (2, pytest.approx(-0.15))
    assert sections["nll"]["comparisons"][0]["a_better"] == 1


def _bins(*cells: tuple[int, float, float]) -> list[dict]:
    """Two equal-width bins from (count, accuracy, confidence)."""
    return [
        {"lower": lo, "upper": lo + 0.5, "count": n, "accuracy": a if n else None, "confidence": c if n else None}
        for lo, (n, a, c) in zip((0.0, 0.5), cells)
    ]


def test_the_reliability_bins_are_pooled_over_runs_by_count():
    pooled = pooled_bins([_bins((2, 0.5, 0.4), (2, 1.0, 0.8)), _bins((0, 0, 0), (4, 0.5, 0.9))])
    assert [b["count"] for b in pooled] == [2, 6]
    assert pooled[0]["accuracy"] == pytest.approx(0.5) and pooled[0]["confidence"] == pytest.approx(0.4)
    assert pooled[1]["accuracy"] == pytest.approx(4 / 6) and pooled[1]["confidence"] == pytest.approx(5.2 / 6)
    assert pooled_bins([_bins((0, 0, 0), (0, 0, 0))])[0]["accuracy"] is None


def test_the_report_has_a_calibration_table_and_a_pooled_reliability_diagram_per_task(tmp_path):
    runs = [Run(method, seed, (), f"{method}/seed={seed}") for method in ("lora", "monteclora") for seed in (0, 1)]
    acc, nll, ece, brier = (
        Metric("mc", "acc,none", True),
        Metric("mc", "nll", False),
        Metric("mc", "ece", False),
        Metric("mc", "brier", False),
    )
    predictive = Metric("mc", "ece,predictive", False)
    outcomes = {
        "lora/seed=0": Outcome(
            "completed",
            {acc: 0.5, nll: 1.0, ece: 0.1, brier: 0.6},
            bins={("mc", False): _bins((2, 0.5, 0.4), (2, 1.0, 0.8))},
        ),
        "lora/seed=1": Outcome(
            "completed",
            {acc: 0.5, nll: 1.2, ece: 0.2, brier: 0.7},
            bins={("mc", False): _bins((0, 0, 0), (4, 0.5, 0.9))},
        ),
        "monteclora/seed=0": Outcome(
            "completed",
            {acc: 0.75, nll: 0.9, ece: 0.05, brier: 0.5, predictive: 0.04},
            bins={("mc", False): _bins((4, 0.75, 0.7), (0, 0, 0)), ("mc", True): _bins((4, 0.75, 0.72), (0, 0, 0))},
        ),
        "monteclora/seed=1": Outcome("failed", detail="exit code 1"),
    }
    report = build_sweep_report(
        {"command": "monte-ds sweep"}, runs, outcomes, ["lora", "monteclora"], {run.run_id: tmp_path for run in runs}
    )
    (section,) = report["calibration"]
    series = {entry["label"]: entry for entry in section["series"]}
    assert list(series) == ["lora", "monteclora", "monteclora (predictive)"]
    assert (series["lora"]["runs"], series["lora"]["items"]) == (2, 8)
    assert series["lora"]["pooled_ece"] == pytest.approx(2 / 8 * 0.1 + 6 / 8 * abs(4 / 6 - 5.2 / 6))
    assert series["lora"]["medians"] == {
        "acc": 0.5,
        "NLL": pytest.approx(1.1),
        "ECE": pytest.approx(0.15),
        "Brier": pytest.approx(0.65),
    }
    # MonteCLoRA's failed run has no bins but counts in the medians: half failed, the median is a failure.
    assert series["monteclora"]["runs"] == 1 and series["monteclora"]["medians"]["acc"] == -math.inf
    assert series["monteclora (predictive)"]["pooled_ece"] == pytest.approx(0.03)
    write_sweep_report(tmp_path, report)
    assert matplotlib.image.imread(tmp_path / section["plot"]).ndim == 3
    markdown = (tmp_path / "sweep.md").read_text()
    assert "## Calibration: mc" in markdown and section["plot"] in markdown
    assert "| lora | 2 | 8 | 0.5 | 1.1 | 0.15 | 0.65 | 0.175 |" in markdown
    assert "| monteclora | 1 | 4 | failed |" in markdown
