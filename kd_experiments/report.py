"""Study reports: the runs of a study side by side, from their summary.json files.

    python -m kd_experiments.report PATH... [--out DIR]

finds every summary.json below the PATHs (run folders, sweep folders, any tree), groups the finished runs
by the config keys whose values differ between them (seeds apart: a group's runs are its seeds) and writes
three files into DIR (default: the one PATH when it is a directory, else the current directory):

- report.md: one table row per group (top-1 mean ± sample std, teacher, paper number), the figure, and the
  runs that did not finish (failed, interrupted, still running), which are never averaged;
- report.csv: the same groups, one row each: method, the differing keys (dotted names), n, top1_mean,
  top1_std, paper_top1, delta_to_paper, teacher_top1_mean, seeds;
- report.png: the number per group as bars with error bars and the paper number as a marker, or, for an
  ablation (one differing numeric key), top-1 over that key as one line per method.

The averaged number is each run's `student_top1_reported` (its config's `report` protocol), or for a
detection or multi-label study each run's `student_map_reported` (the mAP its `report_map` names; the CSV
columns are then named after it: map_mean, map_std, ...). A group's keys
come from the run's .hydra/config.yaml (or, without it, from the overrides in summary.json); keys that are
per-run by nature (seed, paths, logger, callbacks, resume, display switches) never split groups, and a key
whose value follows from the method and the keys already chosen (kd's temperature when method=ce,kd) is
left out. SweepReport, a Hydra callback (conf/hydra/default.yaml), writes the same files into a
multirun's sweep folder after its last job.
"""

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kd_experiments.errors import UserError

REPORT_FILES = ("report.md", "report.csv", "report.png")
# Keys that differ from run to run without making another experiment.
PER_RUN_KEYS = {"seed", "resume", "callbacks", "logger", "dataset.num_workers"}
# The method is a group's first column already (a run without config.yaml has `method` from `method=kd`).
METHOD_KEYS = {"method", "method.name"}
PER_RUN_PREFIXES = ("paths.", "hydra.", "logger.", "callbacks.")
DISPLAY_KEYS = {"trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps"}
# After the keys a run's command line names, these name a group best (a recipe sweep sets them all).
PREFERRED_KEYS = ("teacher.arch", "student.arch", "dataset.name")
ERROR_CHARS = 200


@dataclass
class Run:
    """One run folder: its summary.json, its flattened config and the keys its command line overrode."""

    folder: Path
    summary: dict
    config: dict = field(default_factory=dict)
    override_keys: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.config.get("method.name") or "?")

    @property
    def is_map(self) -> bool:
        """A detection or multi-label run: its number is an mAP (`report_map`), not a top-1."""
        return "student_map_reported" in self.summary

    @property
    def top1(self) -> float | None:
        """The run's reported number: its top-1, or a detection / multi-label run's reported mAP."""
        key = "student_map_reported" if self.is_map else "student_top1_reported"
        value = self.summary.get(key, None if self.is_map else self.summary.get("student_top1"))
        return float(value) if _is_number(value) else None

    @property
    def finished(self) -> bool:
        return self.summary.get("status") == "completed" and self.top1 is not None

    @property
    def paper_top1(self) -> float | None:
        """The recipe's published top-1, where it applies to this run (summary.json has gap_to_paper)."""
        paper = self.summary.get("paper")
        if "gap_to_paper" not in self.summary or not isinstance(paper, dict):
            return None
        key = self.summary.get("report_map", "map") if self.is_map else "top1"
        return float(paper[key]) if _is_number(paper.get(key)) else None


@dataclass
class Group:
    """The finished runs that share a method and the values of the study's keys (their seeds)."""

    method: str
    values: tuple
    runs: list[Run]

    @property
    def top1s(self) -> list[float]:
        return [run.top1 for run in self.runs]

    @property
    def top1_mean(self) -> float:
        return statistics.fmean(self.top1s)

    @property
    def top1_std(self) -> float | None:
        """Sample standard deviation (n - 1); none for a single run."""
        return statistics.stdev(self.top1s) if len(self.runs) > 1 else None

    @property
    def teacher_top1_mean(self) -> float | None:
        values = [
            r.summary.get(f"teacher_{r.summary.get('report_map', 'map')}" if r.is_map else "teacher_top1")
            for r in self.runs
        ]
        values = [float(v) for v in values if _is_number(v)]
        return statistics.fmean(values) if values else None

    @property
    def paper_top1(self) -> float | None:
        """The paper number all runs of the group carry, if they carry one and the same."""
        papers = {run.paper_top1 for run in self.runs}
        return papers.pop() if len(papers) == 1 else None

    @property
    def delta_to_paper(self) -> float | None:
        paper = self.paper_top1
        return None if paper is None else self.top1_mean - paper

    @property
    def seeds(self) -> list:
        return sorted((r.summary.get("seed") for r in self.runs), key=_sort_token)


@dataclass
class Study:
    """The groups of the finished runs, keyed by method and `keys`, and the runs that did not finish."""

    keys: list[str]
    groups: list[Group]
    unfinished: list[Run]

    @property
    def n_runs(self) -> int:
        return sum(len(g.runs) for g in self.groups) + len(self.unfinished)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _sort_token(value) -> tuple:
    """Orders numbers numerically, then strings, then missing values."""
    if _is_number(value):
        return (0, float(value), "")
    return (1, 0.0, str(value)) if value is not None else (2, 0.0, "")


# ---- finding and reading runs ----


def find_summaries(paths: list[str | Path]) -> list[Path]:
    """Every summary.json below `paths` (files or trees), once each; a path that does not exist or holds
    none is a UserError."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path} does not exist")
        is_summary = path.is_file() and path.name == "summary.json"
        matches = [path] if is_summary else sorted(path.rglob("summary.json"))
        if not matches:
            raise UserError(f"no summary.json under {path}: give run or sweep folders")
        found.update((match.resolve(), None) for match in matches)
    return list(found)


def load_run(summary_path: Path) -> Run:
    """A run from its summary.json and .hydra/ files; an unreadable summary is a run that did not finish."""
    folder = summary_path.parent
    try:
        summary = json.loads(summary_path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        return Run(folder, {"status": "unreadable", "error": f"summary.json: {error}"})
    overrides = [str(o) for o in summary.get("overrides") or []]
    config = _config_file(folder) or _overrides_as_config(overrides)
    return Run(folder, summary, config, tuple(_override_key(o) for o in overrides))


def _config_file(folder: Path) -> dict:
    """The run's .hydra/config.yaml, flattened to dotted keys, interpolations unresolved ({} if none)."""
    path = folder / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # a damaged file: fall back to the overrides, as without one
        return {}
    return flatten(container) if isinstance(container, dict) else {}


def flatten(mapping: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}: dotted keys, hashable leaves."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, dict | list):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = value
    return flat


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _overrides_as_config(overrides: list[str]) -> dict:
    """`key=value` overrides as a flat config (for a run without .hydra/config.yaml)."""
    config = {}
    for override in overrides:
        if "=" in override and not override.startswith("~"):
            key, value = override.split("=", 1)
            config[key.lstrip("+")] = _parse_scalar(value)
    return config


def _parse_scalar(text: str):
    special = {"true": True, "false": False, "null": None}
    if text.lower() in special:
        return special[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ---- grouping ----


def is_per_run_key(key: str) -> bool:
    return key in PER_RUN_KEYS or key in DISPLAY_KEYS or key.startswith(PER_RUN_PREFIXES)


def _natural_order(run: Run) -> list:
    """Folder names with their numbers as numbers: job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(run.folder))]


def differing_keys(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between `runs` (per-run keys aside), the keys the runs' command
    lines name first, then PREFERRED_KEYS, then the rest alphabetically."""
    all_keys = set().union(*(run.config for run in runs)) if runs else set()
    differing = {
        key
        for key in all_keys
        if not is_per_run_key(key)
        and key not in METHOD_KEYS
        and len({_hashable(run.config.get(key)) for run in runs}) > 1
    }
    named = {key for run in runs for key in run.override_keys}
    return sorted(differing, key=lambda k: (k not in named, k not in PREFERRED_KEYS, k))


def _hashable(value):
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict | list) else value


def group_keys(runs: list[Run]) -> list[str]:
    """The differing keys that split the runs further than the method and the keys before them do: a key
    that follows from those (kd's temperature when method=ce,kd) adds no column. A key the command lines
    sweep and that varies within one method is always a column: an Optuna study's trials each have their
    own temperature, and their KD weights must show too."""
    chosen: list[str] = []
    n_groups = len({run.method for run in runs})
    named = {key for run in runs for key in run.override_keys}
    for key in differing_keys(runs):
        split = len({(run.method, *(_hashable(run.config.get(k)) for k in [*chosen, key])) for run in runs})
        if split > n_groups or (key in named and _varies_within_a_method(runs, key)):
            chosen.append(key)
            n_groups = split
    return chosen


def _varies_within_a_method(runs: list[Run], key: str) -> bool:
    values: dict[str, set] = {}
    for run in runs:
        values.setdefault(run.method, set()).add(_hashable(run.config.get(key)))
    return any(len(seen) > 1 for seen in values.values())


def build_study(summary_paths: list[Path]) -> Study:
    """Read the runs, choose the group keys among the finished ones and group them."""
    runs = [load_run(path) for path in summary_paths]
    finished = [run for run in runs if run.finished]
    keys = group_keys(finished)
    by_values: dict[tuple, list[Run]] = {}
    for run in finished:
        values = (run.method, *(_hashable(run.config.get(key)) for key in keys))
        by_values.setdefault(values, []).append(run)
    groups = [Group(values[0], values[1:], members) for values, members in by_values.items()]
    groups.sort(key=lambda g: [_sort_token(v) for v in (g.method, *g.values)])
    unfinished = sorted((run for run in runs if not run.finished), key=_natural_order)
    return Study(keys, groups, unfinished)


# ---- report.csv ----


def score_names(study: Study) -> tuple[str, str]:
    """The study's number, as a column prefix and a label: `top1`, or for detection / multi-label runs
    their `report_map` (`map`, `map50`, `voc07_map50`)."""
    runs = [run for group in study.groups for run in group.runs]
    if runs and all(run.is_map for run in runs):
        metric = "/".join(sorted({str(run.summary.get("report_map", "map")) for run in runs}))
        return metric, {"map": "mAP@[.5:.95]", "map50": "mAP@.5", "voc07_map50": "VOC07 mAP@.5"}.get(
            metric, metric
        )
    return "top1", "top-1"


def csv_columns(study: Study) -> list[str]:
    name = score_names(study)[0]
    return [
        "method", *study.keys, "n", f"{name}_mean", f"{name}_std", f"paper_{name}", "delta_to_paper",
        f"teacher_{name}_mean", "seeds",
    ]  # fmt: skip


def csv_rows(study: Study) -> list[dict]:
    """One row per group; numbers rounded to 4 decimals, an absent value empty."""
    rows = []
    for group in study.groups:
        name = score_names(study)[0]
        numbers = {
            "n": len(group.runs),
            f"{name}_mean": group.top1_mean,
            f"{name}_std": group.top1_std,
            f"paper_{name}": group.paper_top1,
            "delta_to_paper": group.delta_to_paper,
            f"teacher_{name}_mean": group.teacher_top1_mean,
        }
        row = {"method": group.method, **dict(zip(study.keys, group.values, strict=True)), **numbers}
        row["seeds"] = " ".join(_cell(seed) for seed in group.seeds)
        rows.append({column: _cell(row[column]) for column in csv_columns(study)})
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(round(value, 4))
    return str(value)


def write_csv(study: Study, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(study))
        writer.writeheader()
        writer.writerows(csv_rows(study))


# ---- report.md ----


def markdown(study: Study, out_dir: Path, figure: bool = True) -> str:
    """The report: what was averaged, the group table, the figure (when `figure`), the runs that did not
    finish."""
    protocols = sorted({str(run.summary.get("report", "last")) for g in study.groups for run in g.runs})
    lines = [
        "# Study report",
        "",
        f"{study.n_runs} runs: {sum(len(g.runs) for g in study.groups)} finished in {len(study.groups)} "
        f"group(s), {len(study.unfinished)} not finished. {_averaged(study)} "
        f"(report: {', '.join(protocols) or '-'}) in %, mean ± sample std over a group's runs (seeds).",
        "",
        *group_table(study),
    ]
    repeated = repeated_seeds(study)
    if repeated:
        lines += [
            "",
            "**Repeated seeds** (the same config and seed in several folders, each counted): " + repeated,
        ]
    if figure:
        lines += ["", f"![student {score_names(study)[1]} per group](report.png)"]
    if study.unfinished:
        lines += ["", "## Not finished (not averaged)", "", *unfinished_table(study, out_dir)]
    return "\n".join(lines) + "\n"


def _averaged(study: Study) -> str:
    name, label = score_names(study)
    if name == "top1":
        return "top-1: the student's `student_top1_reported`"
    return f"{label}: the student's `student_map_reported` (report_map: {name})"


def repeated_seeds(study: Study) -> str:
    """The groups in which a seed occurs more than once (e.g. two sweeps of one command given together),
    as `method key=value...: seed 0 x2`; empty when every seed is there once."""
    notes = []
    for group in study.groups:
        seeds = [_cell(seed) for seed in group.seeds]
        twice = sorted({seed for seed in seeds if seeds.count(seed) > 1}, key=seeds.index)
        if twice:
            pairs = zip(study.keys, group.values, strict=True)
            values = " ".join(f"{k}={_md_value(v)}" for k, v in pairs if v is not None)
            counts = ", ".join(f"seed {seed} x{seeds.count(seed)}" for seed in twice)
            notes.append(f"{' '.join(filter(None, [group.method, values]))}: {counts}")
    return "; ".join(notes)


def group_table(study: Study) -> list[str]:
    if not study.groups:
        return ["No finished runs."]
    with_paper = any(group.paper_top1 is not None for group in study.groups)
    label = score_names(study)[1]
    numbers = ["n", f"{label} (%)", f"teacher {label} (%)", *(["paper", "Δ paper"] if with_paper else [])]
    header = ["method", *study.keys, *numbers, "seeds"]
    lines = [_md_row(header), "|" + "---|" * (len(study.keys) + 1) + "---:|" * len(numbers) + "---|"]
    for group in study.groups:
        cells = [group.method, *(_md_value(v) for v in group.values), str(len(group.runs)), _top1_text(group)]
        cells.append(_md_number(group.teacher_top1_mean))
        if with_paper:
            cells += [_md_number(group.paper_top1), _md_number(group.delta_to_paper, signed=True)]
        lines.append(_md_row([*cells, " ".join(map(_cell, group.seeds))]))
    return lines


def _top1_text(group: Group) -> str:
    std = group.top1_std
    return f"{group.top1_mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def unfinished_table(study: Study, out_dir: Path) -> list[str]:
    lines = [_md_row(["run", "status", "error"]), "|---|---|---|"]
    for run in study.unfinished:
        status = str(run.summary.get("status", "unknown"))
        if status == "completed":  # finished training but has no reported top-1 (no validation)
            status = "completed, no student_top1_reported"
        error = " ".join(str(run.summary.get("error") or "").split())
        error = error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 3] + "..."
        lines.append(_md_row([_relative(run.folder, out_dir), status, error]))
    return lines


def _relative(folder: Path, base: Path) -> str:
    relative = os.path.relpath(folder, base.resolve())
    return str(folder) if relative.startswith(os.pardir * 3) else relative


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_value(value) -> str:
    return "-" if value is None else (f"{value:g}" if isinstance(value, float) else _cell(value))


def _md_number(value: float | None, signed: bool = False) -> str:
    return "" if value is None else (f"{value:+.2f}" if signed else f"{value:.2f}")


# ---- report.png ----


def ablation_key(study: Study) -> str | None:
    """The study's one key when its values are two or more numbers: an ablation, drawn as a line over the
    key per method (a group without the key, such as ce beside a kd temperature sweep, as a level line)."""
    if len(study.keys) != 1:
        return None
    values = {g.values[0] for g in study.groups if g.values[0] is not None}
    return study.keys[0] if len(values) > 1 and all(_is_number(v) for v in values) else None


def plot_report(study: Study, path: Path) -> None:
    """report.png with matplotlib's Agg renderer (a Figure, no pyplot state, no display needed)."""
    from matplotlib.figure import Figure

    key = ablation_key(study)
    width = 7.0 if key else min(20.0, max(6.4, 1.1 * len(study.groups) + 2))
    figure = Figure(figsize=(width, 4.8), layout="constrained")
    axes = figure.add_subplot()
    if not study.groups:
        axes.text(0.5, 0.5, "no finished runs", ha="center", va="center", fontsize=14)
        axes.set_axis_off()
    elif key:
        _plot_lines(axes, study, key)
    else:
        _plot_bars(axes, study)
    n_runs = sum(len(g.runs) for g in study.groups)
    axes.set_title(f"Student {score_names(study)[1]}, mean ± sample std ({n_runs} finished runs)")
    figure.savefig(path, dpi=110)


def _plot_lines(axes, study: Study, key: str) -> None:
    """An ablation: top-1 over the key's values, one line with error bars per method."""
    paper_points = []
    for index, method in enumerate(dict.fromkeys(g.method for g in study.groups)):
        color = f"C{index % 10}"
        groups = [g for g in study.groups if g.method == method]  # sorted by value, no value last
        swept = [g for g in groups if g.values[0] is not None]
        if swept:
            xs, means = [g.values[0] for g in swept], [g.top1_mean for g in swept]
            errors = [_error_bar(g) for g in swept]
            axes.errorbar(xs, means, yerr=errors, marker="o", capsize=4, color=color, label=method)
        for group in groups[len(swept) :]:
            axes.axhline(group.top1_mean, linestyle="--", color=color, label=f"{method} (no {key})")
        paper_points += [(g.values[0], g.paper_top1) for g in swept if g.paper_top1 is not None]
    if paper_points:
        xs, ys = zip(*paper_points, strict=True)
        axes.scatter(xs, ys, marker="*", s=140, color="black", zorder=3, label="paper")
    axes.set_xticks(sorted({g.values[0] for g in study.groups if g.values[0] is not None}))
    axes.set_xlabel(key)
    axes.set_ylabel(f"student {score_names(study)[1]} (%)")
    axes.grid(alpha=0.3)
    axes.legend()


def _plot_bars(axes, study: Study) -> None:
    """One bar per group (coloured by method) with its sample std and, where given, the paper number."""
    colors = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(g.method for g in study.groups))}
    positions = range(len(study.groups))
    axes.bar(
        positions, [g.top1_mean for g in study.groups], yerr=[_error_bar(g) for g in study.groups],
        capsize=4, color=[colors[g.method] for g in study.groups], alpha=0.85,
    )  # fmt: skip
    papers = [(i, g.paper_top1) for i, g in enumerate(study.groups) if g.paper_top1 is not None]
    if papers:  # a dashed line across the bar, clear of its error bar
        xs, ys = zip(*papers, strict=True)
        starts, ends = [x - 0.4 for x in xs], [x + 0.4 for x in xs]
        axes.hlines(ys, starts, ends, colors="black", linestyles="--", zorder=3, label="paper")
        axes.legend()
    axes.set_xticks(list(positions), [_bar_label(study, g) for g in study.groups])
    if len(study.groups) > 16:  # past the widest figure, the labels no longer fit side by side
        for label in axes.get_xticklabels():
            label.set(rotation=35, ha="right", rotation_mode="anchor")
    axes.set_ylim(*_zoomed_limits(study))
    axes.set_ylabel(f"student {score_names(study)[1]} (%)")
    axes.grid(axis="y", alpha=0.3)


def _error_bar(group: Group) -> float:
    """The group's sample std; NaN (no bar drawn) for a single run."""
    return math.nan if group.top1_std is None else group.top1_std


def _bar_label(study: Study, group: Group) -> str:
    """The method, `key=value` lines (short key names: the table has the full ones), the top-1."""
    pairs = zip(short_key_names(study.keys), group.values, strict=True)
    parts = [f"{key}={_md_value(value)}" for key, value in pairs]
    return "\n".join([group.method, *parts, _top1_text(group)])


def short_key_names(keys: list[str]) -> list[str]:
    """Each dotted key by its last part, or its last two where the last parts clash (student.arch and
    teacher.arch): method.objectives.kd.temperature -> temperature."""
    names = [key.rsplit(".", 1)[-1] for key in keys]
    clashing = {name for name in names if names.count(name) > 1}
    return [
        ".".join(key.split(".")[-2:]) if name in clashing else name
        for key, name in zip(keys, names, strict=True)
    ]


def _zoomed_limits(study: Study) -> tuple[float, float]:
    """A y range around the means, their error bars and the paper numbers: KD results a point apart
    would look equal on bars from 0."""
    lows = [g.top1_mean - (g.top1_std or 0.0) for g in study.groups]
    highs = [g.top1_mean + (g.top1_std or 0.0) for g in study.groups]
    papers = [g.paper_top1 for g in study.groups if g.paper_top1 is not None]
    low, high = min(lows + papers), max(highs + papers)
    margin = max(1.0, 0.25 * (high - low))
    return max(0.0, low - margin), high + margin


# ---- writing, the command and the sweep callback ----


def write_report(study: Study, out_dir: Path) -> None:
    """report.md, report.csv and report.png in `out_dir`."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(markdown(study, out_dir))
        write_csv(study, out_dir / "report.csv")
        plot_report(study, out_dir / "report.png")
    except OSError as error:
        raise UserError(f"cannot write the report into {out_dir}: {error.strerror or error}") from None


def report_folders(paths: list[str | Path], out_dir: Path) -> None:
    """Find, group, write and print: the command's work, and the sweep callback's."""
    study = build_study(find_summaries(paths))
    write_report(study, out_dir)
    print(markdown(study, out_dir, figure=False), end="")
    print(f"report: {out_dir / REPORT_FILES[0]}, {', '.join(REPORT_FILES[1:])}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kd_experiments.report",
        description="Group the runs below PATHs by the config keys that differ (seeds apart) and write "
        "report.md, report.csv and report.png.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run folders, sweep folders or any tree")
    parser.add_argument(
        "--out", type=Path, help="where the report goes (default: the one PATH if a folder, else here)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    single = Path(args.paths[0]) if len(args.paths) == 1 else None
    out_dir = args.out or (single if single is not None and single.is_dir() else Path.cwd())
    try:
        report_folders(args.paths, out_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


class SweepReport(Callback):
    """Hydra callback (conf/hydra/default.yaml): after a multirun's last job, the study report of its sweep
    folder. A report that cannot be made is one warning line: it never fails the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not any(sweep_dir.rglob("summary.json")):  # every job refused before it began: nothing to say
                return
            report_folders([sweep_dir], sweep_dir)
        except Exception as error:  # the report is a courtesy; the sweep's own result stands
            print(f"warning: no sweep report: {error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
