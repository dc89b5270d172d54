"""Markdown report and plots comparing continual-learning runs from their results summaries.

A workdir holds one run (`results/summary.json`), or several methods side by side: the demo's
`summary.json` (`{"methods": {name: summary}}`) and/or one `<method>/results/summary.json` per method.
`write_report` renders `report.md` next to them, with its plots under `plots/`. SFT and RFT rerun with other
training seeds (`cpt-jax demo --seeds N`: `seeds/<seed>/<method>/results/summary.json`) add a table per seed.
"""

import json
import math
import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cpt_jax.eval.metrics import as_accuracy_matrix

_RESULTS = pathlib.Path("results", "summary.json")
_COMBINED = "summary.json"
_PLOTS = "plots"
_REQUIRED_KEYS = ("method", "tasks", "accuracy_matrix", "AA", "FM", "FM_max", "BWT", "plasticity", "general")


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _check_summary(summary, source):
    """`summary` if it has every key of the results schema, else an error naming `source` and the missing keys."""
    if not isinstance(summary, dict):
        raise ValueError(f"{source} is not a results summary (a JSON object); got {type(summary).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in summary]
    if missing:
        raise ValueError(
            f"{source} lacks {missing}; write it with cpt_jax.eval.metrics.summarize (rerun `cpt-jax eval`)"
        )
    as_accuracy_matrix(summary["accuracy_matrix"])
    reward_var, risk_ratio = _series(summary, "reward_var"), _series(summary, "risk_ratio")
    if reward_var is not None and risk_ratio is not None and len(reward_var) != len(risk_ratio):
        raise ValueError(
            f"{source}: diagnostics reward_var has {len(reward_var)} steps but risk_ratio has {len(risk_ratio)}; "
            "record both at the same steps (None where one is unavailable)"
        )
    return summary


def load_summaries(workdir):
    """{method name: summary} of every results summary found in `workdir`, in a stable order.

    A method's own `<method>/results/summary.json` takes precedence over its entry in the combined
    `summary.json`, since it is rewritten whenever that method alone is rerun.
    """
    workdir = pathlib.Path(workdir)
    summaries = {}
    combined = workdir / _COMBINED
    if combined.is_file():
        contents = _read_json(combined)
        methods = contents.get("methods") if isinstance(contents, dict) else None
        if not isinstance(methods, dict):
            raise ValueError(f'{combined} has no "methods" object; expected {{"methods": {{name: summary}}}}')
        for name, summary in methods.items():
            summaries[name] = _check_summary(summary, f"{combined} methods[{name!r}]")
    for path in sorted(workdir.glob(f"*/{_RESULTS}")):
        summaries[path.parents[1].name] = _check_summary(_read_json(path), path)
    single = workdir / _RESULTS
    if single.is_file():
        summary = _check_summary(_read_json(single), single)
        summaries[summary["method"]] = summary
    if not summaries:
        raise FileNotFoundError(
            f"no results in {workdir}: looked for {_RESULTS}, {_COMBINED} and */{_RESULTS}; "
            "run `cpt-jax train`/`cpt-jax eval` or `cpt-jax demo` with this --workdir first"
        )
    return summaries


def _pct(value):
    """A fraction as a percentage with one decimal, or a dash when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _series(summary, key):
    """Per-step diagnostics series `key` as a float array (None -> NaN), or None when the run has none."""
    values = summary.get("diagnostics", {}).get(key)
    if not isinstance(values, list) or not values:
        return None
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        return None
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _summary_table(summaries):
    benchmarks = []
    for summary in summaries.values():
        for phase in ("before", "after"):
            benchmarks += [b for b in summary["general"].get(phase, {}) if b not in benchmarks]
    header = ["method", "AA", "FM", "FM_max", "BWT", "plasticity (mean)", "gain (mean)"]
    header += [f"{benchmark} before → after" for benchmark in benchmarks]
    rows = []
    for name, summary in summaries.items():
        row = [name] + [_pct(summary[key]) for key in ("AA", "FM", "FM_max", "BWT")]
        row.append(_pct(float(np.mean(summary["plasticity"]))))
        row.append(_pct(mean_gain(summary)))
        general = summary["general"]
        for benchmark in benchmarks:
            before = general.get("before", {}).get(benchmark)
            after = general.get("after", {}).get(benchmark)
            row.append(f"{_pct(before)} → {_pct(after)}")
        rows.append(row)
    return _table(header, rows)


def _matrix_table(summary):
    tasks = summary["tasks"]
    rows = [
        [f"after {t + 1}: {task}"] + [_pct(value) for value in row]
        for t, (task, row) in enumerate(zip(tasks, summary["accuracy_matrix"], strict=True))
    ]
    return _table(["trained \\ evaluated"] + list(tasks), rows)


def _diagnostics_table(summaries):
    """Scalar diagnostics and the mean of each per-step series, one row per method that has any."""
    keys, rows = [], {}
    for name, summary in summaries.items():
        values = {}
        for key, value in summary.get("diagnostics", {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float, list)):
                continue
            if isinstance(value, list):
                series = _series(summary, key)
                if series is None or not np.isfinite(series).any():
                    continue
                key, value = f"mean {key}", float(np.nanmean(series))
            values[key] = value
            if key not in keys:
                keys.append(key)
        if values:
            rows[name] = values
    if not rows:
        return None
    return _table(
        ["method"] + keys,
        [[name] + [f"{values[k]:.4g}" if k in values else "–" for k in keys] for name, values in rows.items()],
    )


def task_gains(summary):
    """{task: A[k][k] minus the initial model's accuracy on task k}: what a method learned of each task. None when
    the summary has no initial accuracies (runs before they were recorded)."""
    initial = summary.get("initial") or {}
    if not all(task in initial for task in summary["tasks"]):
        return None
    return {task: p - initial[task] for p, task in zip(summary["plasticity"], summary["tasks"])}


def mean_gain(summary):
    """The mean of `task_gains` over the sequence (None without initial accuracies)."""
    gains = task_gains(summary)
    return None if gains is None else float(np.mean(list(gains.values())))


def _gain_table(summaries):
    """A[k][k] and its gain over the initial model, per task and method: a mean can hide a task not learned."""
    rows = {name: task_gains(summary) for name, summary in summaries.items()}
    rows = {name: gains for name, gains in rows.items() if gains is not None}
    if not rows:
        return None
    tasks = list(next(iter(summaries.values()))["tasks"])
    cells = []
    for name, gains in rows.items():
        plasticity = dict(zip(summaries[name]["tasks"], summaries[name]["plasticity"]))
        cells.append([name] + [f"{_pct(plasticity[t])} ({'+' if gains[t] >= 0 else ''}{_pct(gains[t])})"
                               if t in gains else "–" for t in tasks])
    return _table(["method"] + tasks, cells)


# Mean gains further apart than this make the forgetting comparison one between methods that learned unequally.
# A gain below MIN_GAIN means not learned: a method's mean (it has little to forget) or one task's (the verdict
# names it, since forgetting on it is a loss of the initial model's accuracy).
GAIN_GAP = 0.05
MIN_GAIN = 0.05


def _comparison_sentence(summaries):
    """The plain-language SFT vs RFT forgetting comparison, whichever way it came out, and whether the two learned
    their new tasks comparably (forgetting less is no merit in a method that learned less)."""
    if "sft" not in summaries or "rft" not in summaries:
        return None
    fm_rft, fm_sft = summaries["rft"]["FM"], summaries["sft"]["FM"]
    if math.isclose(fm_rft, fm_sft, abs_tol=1e-12):
        verdict = "as much as"
    else:
        # FM is signed: closer to zero, or positive, means earlier tasks kept more of their accuracy.
        verdict = "less than" if fm_rft > fm_sft else "more than"
    sentence = f"In this run RFT forgot {verdict} SFT (FM {_pct(fm_rft)} vs {_pct(fm_sft)})."
    gain_rft, gain_sft = mean_gain(summaries["rft"]), mean_gain(summaries["sft"])
    if gain_rft is None or gain_sft is None:
        return sentence + " The runs did not record the initial accuracies, so how much each learned is unknown."
    learned = f"On their new tasks RFT gained {_pct(gain_rft)} points and SFT {_pct(gain_sft)} over the initial model"
    if max(gain_rft, gain_sft) < MIN_GAIN:
        return (f"{sentence} {learned}: neither learned its new tasks (mean gain under {_pct(MIN_GAIN)} points), so "
                "this run cannot say which method forgets less.")
    if abs(gain_rft - gain_sft) > GAIN_GAP:
        more = "RFT" if gain_rft > gain_sft else "SFT"
        return (f"{sentence} {learned}: {more} learned more, so the methods are not equally plastic here and the "
                "forgetting comparison is not a fair verdict.")
    verdict = f"{sentence} {learned}, comparable plasticity (within {_pct(GAIN_GAP)} points)."
    unlearned = {name: [t for t, g in task_gains(summaries[name]).items() if g < MIN_GAIN] for name in ("sft", "rft")}
    if any(unlearned.values()):
        listed = "; ".join(f"{name.upper()}: {', '.join(tasks) if tasks else 'none'}"
                           for name, tasks in unlearned.items())
        verdict += (f" Not every task was learned, though (gain under {_pct(MIN_GAIN)} points: {listed}): on those "
                    "tasks forgetting measures the loss of the initial model's accuracy, not of anything learned.")
    return verdict


def load_seed_summaries(workdir, summaries):
    """{seed: {method: summary}} of the SFT and RFT runs repeated with other training seeds, seed "0" being the
    main runs in `summaries`; empty when `workdir` has no `seeds/<seed>/<method>/results/summary.json`."""
    found = {}
    for path in sorted(pathlib.Path(workdir).glob(f"seeds/*/*/{_RESULTS.as_posix()}")):
        seed, method = path.parents[2].name, path.parents[1].name
        if not seed.isdigit():
            raise ValueError(f"{path}: {seed!r} is not a training seed; the demo writes seeds/<seed>/<method>")
        found.setdefault(seed, {})[method] = _check_summary(_read_json(path), path)
    if not found:
        return {}
    main = {name: summaries[name] for name in ("sft", "rft") if name in summaries}
    return {"0": main, **{seed: found[seed] for seed in sorted(found, key=int)}}


def _seed_section(seeds):
    """The per-seed table of SFT's and RFT's mean gain and FM, and a sentence on how often RFT forgot less: a
    single run's verdict moves with the training seed by more than the gap between the methods."""
    pairs = {seed: (runs["sft"], runs["rft"]) for seed, runs in seeds.items() if "sft" in runs and "rft" in runs}
    if len(pairs) < 2:
        return None
    gains = {seed: (mean_gain(sft), mean_gain(rft)) for seed, (sft, rft) in pairs.items()}
    fms = {seed: (sft["FM"], rft["FM"]) for seed, (sft, rft) in pairs.items()}
    rows = [[seed, _pct(gains[seed][0]), _pct(gains[seed][1]), _pct(fms[seed][0]), _pct(fms[seed][1]),
             "yes" if fms[seed][1] > fms[seed][0] else "no"] for seed in pairs]
    mean_fm = np.mean(list(fms.values()), axis=0)
    # Gains need every run's initial accuracies; a mean over some seeds only would not match the FM beside it.
    known = all(None not in g for g in gains.values())
    mean_gains = np.mean(list(gains.values()), axis=0) if known else (None, None)
    fewer = sum(rft > sft for sft, rft in fms.values())
    rows.append(["mean", _pct(mean_gains[0]), _pct(mean_gains[1]), _pct(mean_fm[0]), _pct(mean_fm[1]),
                 f"{fewer} of {len(pairs)}"])
    sentence = (f"Over {len(pairs)} training seeds (seed 0 is the run above; the same base model and data) RFT "
                f"forgot less than SFT in {fewer} (mean FM {_pct(mean_fm[1])} vs {_pct(mean_fm[0])}).")
    if known:
        fair = sum(abs(sft - rft) <= GAIN_GAP for sft, rft in gains.values())
        sentence += (f" Mean gain over the initial model: RFT {_pct(mean_gains[1])}, SFT {_pct(mean_gains[0])}; "
                     f"comparable (within {_pct(GAIN_GAP)} points) in {fair} of the {len(pairs)} seeds.")
    table = _table(["seed", "SFT gain", "RFT gain", "SFT FM", "RFT FM", "RFT forgot less"], rows)
    return f"## Across training seeds\n\n{sentence}\n\n{table}"


def _save(fig, path):
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _plot_matrices(summaries, path):
    fig = Figure(figsize=(4.5 * len(summaries), 4.2), layout="constrained")
    axes = fig.subplots(1, len(summaries), squeeze=False)[0]
    for ax, (name, summary) in zip(axes, summaries.items(), strict=True):
        matrix_TxT = as_accuracy_matrix(summary["accuracy_matrix"])
        image = ax.imshow(np.ma.masked_invalid(matrix_TxT), vmin=0.0, vmax=1.0, cmap="viridis")
        for (t, i), value in np.ndenumerate(matrix_TxT):
            if not math.isnan(value):
                colour = "black" if value > 0.6 else "white"  # readable on viridis' light and dark ends
                ax.text(i, t, _pct(value), ha="center", va="center", fontsize=8, color=colour)
        ticks = range(len(summary["tasks"]))
        ax.set_xticks(ticks, summary["tasks"], rotation=45, ha="right")
        ax.set_yticks(ticks, summary["tasks"])
        ax.set(title=name, xlabel="evaluated on", ylabel="after training")
    fig.colorbar(image, ax=list(axes), label="accuracy", shrink=0.8)
    return _save(fig, path)


def _plot_task_curves(summaries, path):
    """One panel per task: its accuracy after each stage of the sequence, a line per method."""
    tasks = []
    for summary in summaries.values():
        tasks += [task for task in summary["tasks"] if task not in tasks]
    cols = min(len(tasks), 4)
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    stage_ticks = np.arange(1, max(len(summary["tasks"]) for summary in summaries.values()) + 1)
    for ax, task in zip(axes, tasks, strict=False):
        for name, summary in summaries.items():
            if task not in summary["tasks"]:
                continue
            column = as_accuracy_matrix(summary["accuracy_matrix"])[:, summary["tasks"].index(task)]
            ax.plot(np.arange(1, len(column) + 1), column, marker="o", label=name)
        ax.set(title=task, xlabel="after training task #", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.set_xticks(stage_ticks)
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def _plot_training_variance(summaries, path):
    """Reward variance and the fraction of zero-variance groups over training steps, a line per method."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax_var, ax_zero = fig.subplots(1, 2)
    for name, summary in summaries.items():
        for ax, key in ((ax_var, "reward_var"), (ax_zero, "zero_var_frac")):
            series = _series(summary, key)
            if series is not None:
                # Steps without a value (None) are skipped rather than breaking the line.
                steps = np.flatnonzero(np.isfinite(series))
                ax.plot(steps, series[steps], marker="." if len(steps) < 50 else None, label=name)
    ax_var.set(title="reward variance", xlabel="training step", ylabel="mean Var[r] per prompt group")
    ax_zero.set(
        title="zero-variance groups", xlabel="training step", ylabel="fraction of groups", ylim=(-0.02, 1.02)
    )
    for ax in (ax_var, ax_zero):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_risk_scatter(summaries, path):
    """Forgetting-risk ratio R(g_RFT) / R(g_SFT) against reward variance, one point per step."""
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    for name, summary in summaries.items():
        reward_var, risk_ratio = _series(summary, "reward_var"), _series(summary, "risk_ratio")
        if reward_var is None or risk_ratio is None:
            continue
        ax.scatter(reward_var, risk_ratio, s=12, alpha=0.7, label=name)
    ax.set(title="forgetting risk vs reward variance", xlabel="reward variance")
    ax.set_ylabel("risk ratio R(g_RFT) / R(g_SFT)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _has_series(summaries, *keys):
    """Whether any method recorded every one of the per-step diagnostics series `keys`."""
    return any(all(_series(summary, key) is not None for key in keys) for summary in summaries.values())


def _plots(summaries, plots_dir):
    """[(title, path)] of the plots the summaries support, written into `plots_dir`."""
    plots = [
        ("Accuracy matrices", _plot_matrices(summaries, plots_dir / "accuracy_matrix.png")),
        ("Accuracy of each task over the sequence", _plot_task_curves(summaries, plots_dir / "task_accuracy.png")),
    ]
    if _has_series(summaries, "reward_var") or _has_series(summaries, "zero_var_frac"):
        path = _plot_training_variance(summaries, plots_dir / "reward_variance.png")
        plots.append(("Reward variance and zero-variance groups over training", path))
    if _has_series(summaries, "reward_var", "risk_ratio"):
        path = _plot_risk_scatter(summaries, plots_dir / "risk_vs_variance.png")
        plots.append(("Forgetting-risk ratio vs reward variance", path))
    return plots


def write_report(workdir):
    """Writes `workdir/report.md` (tables and plots of every results summary found there); returns its path."""
    workdir = pathlib.Path(workdir)
    summaries = load_summaries(workdir)
    plots_dir = workdir / _PLOTS
    plots_dir.mkdir(exist_ok=True)

    sections = [
        "# Continual post-training report",
        "Accuracies in %. FM, FM_max and BWT are signed: negative means earlier tasks lost accuracy.",
    ]
    sentence = _comparison_sentence(summaries)
    if sentence:
        sections.append(sentence)
    sections += ["## Summary", _summary_table(summaries)]
    seeds = _seed_section(load_seed_summaries(workdir, summaries))
    if seeds:
        sections.append(seeds)
    gains = _gain_table(summaries)
    if gains:
        sections += ["## Plasticity per task\n\nA[k][k] after training task k, and in brackets its gain over the "
                     "initial model.", gains]
    diagnostics = _diagnostics_table(summaries)
    if diagnostics:
        sections += ["## Training diagnostics", diagnostics]
    sections.append("## Accuracy matrices\n\nRow t: after training task t; column i: evaluated on task i.")
    for name, summary in summaries.items():
        sections += [f"### {name}", _matrix_table(summary)]
    sections.append("## Plots")
    for title, path in _plots(summaries, plots_dir):
        sections.append(f"![{title}]({path.relative_to(workdir).as_posix()})")

    report = workdir / "report.md"
    report.write_text("\n\n".join(sections) + "\n")
    return report
