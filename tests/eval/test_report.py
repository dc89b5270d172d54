"""The markdown report and plots rendered from synthetic results summaries."""

import json

import PIL.Image
import pytest

from cpt_jax import cli
from cpt_jax.eval.metrics import summarize
from cpt_jax.eval.report import load_summaries, write_report

TASKS = ["count", "colour", "shape"]
# SFT forgets: FM = ((0.3 - 0.8) + (0.6 - 0.9)) / 2 = -0.4; AA = (0.3 + 0.6 + 0.7) / 3.
SFT_MATRIX = [[0.8, None, None], [0.5, 0.9, None], [0.3, 0.6, 0.7]]
# RFT keeps: FM = ((0.7 - 0.75) + (0.8 - 0.85)) / 2 = -0.05; AA = (0.7 + 0.8 + 0.65) / 3.
RFT_MATRIX = [[0.75, None, None], [0.72, 0.85, None], [0.7, 0.8, 0.65]]
RFT_DIAGNOSTICS = {
    "reward_var": [0.2, 0.15, None, 0.05],
    "zero_var_frac": [0.1, 0.3, 0.5, 0.7],
    "risk_ratio": [0.8, 0.6, 0.4, None],
    "kept_fraction": 0.625,
}


# The initial model's accuracies: SFT's mean gain is (0.8 + 0.9 + 0.7)/3 - 0.3 = 50 points, RFT's 45.
INITIAL = {"count": 0.2, "colour": 0.4, "shape": 0.3}


def _sft(initial=INITIAL):
    return summarize("sft", TASKS, SFT_MATRIX, {"mmmu": 0.52}, {"mmmu": 0.401}, initial=initial)


def _rft(matrix=RFT_MATRIX, diagnostics=RFT_DIAGNOSTICS, initial=INITIAL):
    return summarize("rft", TASKS, matrix, {"mmmu": 0.52}, {"mmmu": 0.542}, diagnostics, initial=initial)


def _write(path, contents):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(contents))


def _assert_png(path):
    assert path.stat().st_size > 1000
    with PIL.Image.open(path) as image:
        image.verify()
    with PIL.Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) > 100


def test_per_method_runs_render_tables_plots_and_the_comparison(tmp_path):
    _write(tmp_path / "sft" / "results" / "summary.json", _sft())
    _write(tmp_path / "rft" / "results" / "summary.json", _rft())

    report = write_report(tmp_path)

    assert report == tmp_path / "report.md"
    text = report.read_text()
    assert ("In this run RFT forgot less than SFT (FM -5.0 vs -40.0). On their new tasks RFT gained 45.0 points "
            "and SFT 50.0 over the initial model, comparable plasticity (within 5.0 points).") in text
    # Summary rows: AA, FM, FM_max, BWT, mean plasticity, mean gain, general before -> after (in %).
    assert "| sft | 53.3 | -40.0 | -40.0 | -40.0 | 80.0 | 50.0 | 52.0 → 40.1 |" in text
    assert "| rft | 71.7 | -5.0 | -5.0 | -5.0 | 75.0 | 45.0 | 52.0 → 54.2 |" in text
    # Plasticity per task: A[k][k] and, in brackets, its gain over the initial model.
    assert "| sft | 80.0 (+60.0) | 90.0 (+50.0) | 70.0 (+40.0) |" in text
    assert "| rft | 75.0 (+55.0) | 85.0 (+45.0) | 65.0 (+35.0) |" in text
    assert "Not every task was learned" not in text
    # Diagnostics: scalars as recorded, per-step series as their mean over the recorded steps.
    assert "| rft | 0.1333 | 0.4 | 0.6 | 0.625 |" in text
    # Accuracy matrix rows, untrained entries as dashes.
    assert "| after 2: colour | 50.0 | 90.0 | – |" in text
    assert "| after 3: shape | 70.0 | 80.0 | 65.0 |" in text
    plots = ["accuracy_matrix.png", "task_accuracy.png", "reward_variance.png", "risk_vs_variance.png"]
    for name in plots:
        assert f"(plots/{name})" in text
        _assert_png(tmp_path / "plots" / name)


def test_comparison_reports_the_outcome_whichever_way_it_goes(tmp_path):
    forgetful_rft = [[0.9, None, None], [0.2, 0.9, None], [0.1, 0.2, 0.9]]  # FM = ((0.1-0.9) + (0.2-0.9)) / 2
    _write(tmp_path / "summary.json", {"methods": {"sft": _sft(), "rft": _rft(forgetful_rft, None)}})

    text = write_report(tmp_path).read_text()

    assert ("In this run RFT forgot more than SFT (FM -75.0 vs -40.0). On their new tasks RFT gained 60.0 points "
            "and SFT 50.0 over the initial model: RFT learned more, so the methods are not equally plastic here and "
            "the forgetting comparison is not a fair verdict.") in text
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy_matrix.png", "task_accuracy.png"]
    assert "Training diagnostics" not in text


def _report_with_initial(tmp_path, sft_initial, rft_initial):
    """The report of the SFT and RFT summaries with these initial accuracies."""
    _write(tmp_path / "summary.json", {"methods": {"sft": _sft(sft_initial), "rft": _rft(initial=rft_initial)}})
    return write_report(tmp_path).read_text()


def test_when_neither_method_learned_the_comparison_says_so(tmp_path):
    # Initial accuracies a little under each diagonal entry: mean gains of 3 (SFT) and 2 (RFT) points.
    text = _report_with_initial(tmp_path, {"count": 0.77, "colour": 0.87, "shape": 0.67},
                                {"count": 0.73, "colour": 0.83, "shape": 0.63})

    assert ("In this run RFT forgot less than SFT (FM -5.0 vs -40.0). On their new tasks RFT gained 2.0 points and "
            "SFT 3.0 over the initial model: neither learned its new tasks (mean gain under 5.0 points), so this run "
            "cannot say which method forgets less.") in text


def test_a_task_one_method_did_not_learn_is_named_even_when_the_mean_gains_match(tmp_path):
    # SFT gains 60, 50 and 2 points (mean 37.3); RFT 55, 45 and 15 (mean 38.3): comparable means, but SFT did not
    # learn shape.
    text = _report_with_initial(tmp_path, {"count": 0.2, "colour": 0.4, "shape": 0.68},
                                {"count": 0.2, "colour": 0.4, "shape": 0.5})

    assert ("comparable plasticity (within 5.0 points). Not every task was learned, though (gain under 5.0 points: "
            "SFT: shape; RFT: none): on those tasks forgetting measures the loss of the initial model's accuracy, not "
            "of anything learned.") in text
    assert "| sft | 80.0 (+60.0) | 90.0 (+50.0) | 70.0 (+2.0) |" in text


def test_runs_with_other_training_seeds_add_a_table_and_how_often_rft_forgot_less(tmp_path):
    forgetful_rft = [[0.9, None, None], [0.2, 0.9, None], [0.1, 0.2, 0.9]]  # FM -75, gain 60
    _write(tmp_path / "summary.json", {"methods": {"sft": _sft(), "rft": _rft()}})
    _write(tmp_path / "seeds" / "1" / "sft" / "results" / "summary.json", _sft())
    _write(tmp_path / "seeds" / "1" / "rft" / "results" / "summary.json", _rft(forgetful_rft, None))
    _write(tmp_path / "seeds" / "2" / "sft" / "results" / "summary.json", _sft())  # no RFT run: not a pair

    text = write_report(tmp_path).read_text()

    assert ("Over 2 training seeds (seed 0 is the run above; the same base model and data) RFT forgot less than SFT "
            "in 1 (mean FM -40.0 vs -40.0). Mean gain over the initial model: RFT 52.5, SFT 50.0; comparable (within "
            "5.0 points) in 1 of the 2 seeds.") in text
    assert "| 0 | 50.0 | 45.0 | -40.0 | -5.0 | yes |" in text
    assert "| 1 | 50.0 | 60.0 | -40.0 | -75.0 | no |" in text
    assert "| mean | 50.0 | 52.5 | -40.0 | -40.0 | 1 of 2 |" in text
    assert "| 2 |" not in text
    # The main comparison still speaks of seed 0's run alone.
    assert "In this run RFT forgot less than SFT (FM -5.0 vs -40.0)." in text


def test_seed_gains_are_averaged_only_when_every_run_has_initial_accuracies(tmp_path):
    _write(tmp_path / "summary.json", {"methods": {"sft": _sft(), "rft": _rft()}})
    _write(tmp_path / "seeds" / "1" / "sft" / "results" / "summary.json", _sft())
    _write(tmp_path / "seeds" / "1" / "rft" / "results" / "summary.json", _rft(initial=None))

    text = write_report(tmp_path).read_text()

    assert "| 1 | 50.0 | – | -40.0 | -5.0 | yes |" in text
    assert "| mean | – | – | -40.0 | -5.0 | 2 of 2 |" in text
    assert "RFT forgot less than SFT in 2 (mean FM -5.0 vs -40.0).\n" in text  # no gain sentence


def test_a_seed_folder_that_is_not_a_number_is_an_error(tmp_path):
    _write(tmp_path / "summary.json", {"methods": {"sft": _sft(), "rft": _rft()}})
    _write(tmp_path / "seeds" / "best" / "rft" / "results" / "summary.json", _rft())

    with pytest.raises(ValueError, match="'best' is not a training seed"):
        write_report(tmp_path)


def test_without_initial_accuracies_the_comparison_says_learning_is_unknown(tmp_path):
    text = _report_with_initial(tmp_path, None, None)

    assert ("In this run RFT forgot less than SFT (FM -5.0 vs -40.0). The runs did not record the initial "
            "accuracies, so how much each learned is unknown.") in text
    assert "| sft | 53.3 | -40.0 | -40.0 | -40.0 | 80.0 | – | 52.0 → 40.1 |" in text
    assert "Plasticity per task" not in text


def test_single_run_workdir(tmp_path):
    _write(tmp_path / "results" / "summary.json", _rft())

    text = write_report(tmp_path).read_text()

    assert "| rft | 71.7 | -5.0 |" in text
    assert "forgot" not in text  # no SFT run to compare with
    _assert_png(tmp_path / "plots" / "risk_vs_variance.png")


def test_a_methods_own_results_override_the_combined_summary(tmp_path):
    stale = _rft([[0.1, None, None], [0.1, 0.1, None], [0.1, 0.1, 0.1]], None)
    _write(tmp_path / "summary.json", {"methods": {"sft": _sft(), "rft": stale}})
    _write(tmp_path / "rft" / "results" / "summary.json", _rft())

    summaries = load_summaries(tmp_path)

    assert list(summaries) == ["sft", "rft"]
    assert summaries["rft"]["accuracy_matrix"] == RFT_MATRIX


def test_missing_or_malformed_results_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results in"):
        write_report(tmp_path)
    summary = _sft()
    del summary["FM"]
    _write(tmp_path / "sft" / "results" / "summary.json", summary)
    with pytest.raises(ValueError, match=r"sft/results/summary.json lacks \['FM'\]"):
        write_report(tmp_path)
    _write(tmp_path / "summary.json", {"sft": _sft()})
    with pytest.raises(ValueError, match='has no "methods" object'):
        write_report(tmp_path)


def test_mismatched_diagnostics_series_are_rejected(tmp_path):
    diagnostics = {"reward_var": [0.1, 0.2], "risk_ratio": [0.5]}
    _write(tmp_path / "results" / "summary.json", _rft(diagnostics=diagnostics))
    with pytest.raises(ValueError, match="reward_var has 2 steps but risk_ratio has 1"):
        write_report(tmp_path)


def test_cli_report_prints_the_report_path(tmp_path, capsys):
    _write(tmp_path / "sft" / "results" / "summary.json", _sft())

    assert cli.main(["report", "--workdir", str(tmp_path)]) == 0

    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    assert "| sft | 53.3 | -40.0 |" in (tmp_path / "report.md").read_text()
