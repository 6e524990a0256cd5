"""`kdcompose plot`: the loss composition of a run at a glance, from its `logging.jsonl`.

ms-swift appends one JSON object per logging step to `<output_dir>/v<N>-<time>/logging.jsonl`
(training rows with `loss`, evaluation rows with `eval_loss`, and a final summary). The
weighted per-term metrics (`llm_kd_loss`, `sft_loss`, `vision_kd_loss`, `<name>_loss`) add
up to what was optimized, so they are drawn as a stacked area with the logged total `loss`
as a line on top: where the line leaves the stack, something other than the terms moved
the loss. Parts such as `vision_kd_loss_aligner` are already inside their term and are drawn
as thin lines, never stacked; a scheduled term's `<metric>_weight` goes to a second panel.

Reading and classifying the log is separate from drawing, so it can be tested without a
figure; matplotlib is imported only to draw, with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG_FILE = "logging.jsonl"
EVAL_PREFIX = "eval_"
DERIVED_SUFFIXES: tuple[str, ...] = ("_weight", "_raw")
"""`<metric>_weight` (scheduled terms) and `<metric>_raw` (log_raw): not parts, not stacked."""
NOT_TERMS: frozenset[str] = frozenset({"loss", "train_loss"})
"""`loss` is the total; `train_loss` is the trainer's whole-run average in the summary row."""
_VERSION = re.compile(r"^v(\d+)-")


class PlotError(Exception):
    """The folder cannot be plotted (no log, or nothing in it to plot); the CLI exits 2."""


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed; the CLI exits 1 with the install command."""


@dataclass(frozen=True)
class RunLog:
    """Where a run's log was found and why that one."""

    path: Path
    """The `logging.jsonl` file."""
    note: str = ""
    """E.g. `newest of 3 runs under out/`; empty when the folder itself held the log."""


def find_run_log(folder: str | Path) -> RunLog:
    """The `logging.jsonl` of a run folder, or of the newest run under an ms-swift
    `output_dir` (highest `v<N>-` version, then latest write). A file path is taken as is."""
    folder = Path(folder)
    if folder.is_file():
        return RunLog(folder)
    if not folder.is_dir():
        raise PlotError(f"{folder}: no such folder")
    if (folder / LOG_FILE).is_file():
        return RunLog(folder / LOG_FILE)
    runs = [d for d in folder.iterdir() if d.is_dir() and (d / LOG_FILE).is_file()]
    if not runs:
        raise PlotError(
            f"{folder}: no {LOG_FILE} here or in its run folders (ms-swift writes "
            f"<output_dir>/v<N>-<time>/{LOG_FILE}); pass a run folder or its output_dir"
        )

    def newness(run: Path) -> tuple[int, float]:
        match = _VERSION.match(run.name)
        return (int(match.group(1)) if match else -1, (run / LOG_FILE).stat().st_mtime)

    newest = max(runs, key=newness)
    note = f"newest of {len(runs)} runs under {folder}" if len(runs) > 1 else f"the only run under {folder}"
    return RunLog(newest / LOG_FILE, note)


def read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """JSON objects of a jsonl file, and how many lines could not be read (a run killed
    mid-write leaves a truncated last line; that must not hide the rest)."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def row_step(row: Mapping[str, Any]) -> int | None:
    """The global step of a row: ms-swift's `global_step/max_steps` ("3/10"), else `step`."""
    progress = row.get("global_step/max_steps")
    if isinstance(progress, str):
        head = progress.split("/", 1)[0].strip()
        if head.isdigit():
            return int(head)
    step = row.get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class PlotData:
    """What `kdcompose plot` draws, by metric key; each series is (steps, values)."""

    total: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    terms: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """Weighted term metrics (`*_loss`), stacked."""
    parts: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """`<term>_<part>` (e.g. `vision_kd_loss_aligner`): thin lines, already inside their term."""
    weights: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """`<term>_weight`: effective weights of scheduled terms."""
    evals: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """`eval_loss` and `eval_<term>` points."""

    @property
    def empty(self) -> bool:
        return not (self.total[0] or self.terms or self.evals)

    def train_steps(self) -> list[int]:
        steps = set(self.total[0])
        for xs, _ in self.terms.values():
            steps.update(xs)
        return sorted(steps)

    def stacked(self) -> tuple[list[int], dict[str, list[float]]]:
        """Terms aligned on the training steps; a term absent from a logged row counts as 0
        there (it contributed nothing in that window)."""
        steps = self.train_steps()
        out = {}
        for key, (xs, ys) in self.terms.items():
            by_step = dict(zip(xs, ys, strict=True))
            out[key] = [by_step.get(s, 0.0) for s in steps]
        return steps, out


def _is_term(key: str) -> bool:
    return key.endswith("_loss") and key not in NOT_TERMS and not key.startswith(EVAL_PREFIX)


def _append(series: dict[str, tuple[list[int], list[float]]], key: str, step: int, value: float) -> None:
    xs, ys = series.setdefault(key, ([], []))
    xs.append(step)
    ys.append(value)


def classify(rows: Iterable[Mapping[str, Any]]) -> PlotData:
    """Sort logged values into total, terms, parts, weights and eval points."""
    rows = [r for r in rows if row_step(r) is not None]
    term_keys = {k for r in rows for k in r if _is_term(k) and _number(r[k]) is not None}
    data = PlotData()
    for row in rows:
        step = row_step(row)
        assert step is not None
        is_eval = any(k.startswith(EVAL_PREFIX) for k in row)
        for key, raw in row.items():
            value = _number(raw)
            if value is None:
                continue
            if is_eval:
                name = key[len(EVAL_PREFIX) :] if key.startswith(EVAL_PREFIX) else None
                if name == "loss" or name in term_keys or (name and _is_term(name)):
                    _append(data.evals, key, step, value)
                continue
            if key == "loss":
                data.total[0].append(step)
                data.total[1].append(value)
            elif key in term_keys:
                _append(data.terms, key, step, value)
            elif key.endswith(DERIVED_SUFFIXES[0]) and key[: -len(DERIVED_SUFFIXES[0])] in term_keys:
                _append(data.weights, key, step, value)
            elif key.endswith(DERIVED_SUFFIXES):
                continue
            elif any(key.startswith(f"{term}_") for term in term_keys):
                _append(data.parts, key, step, value)
    return _by_step(data)


def _sorted_last(xs: list[int], ys: list[float]) -> tuple[list[int], list[float]]:
    by_step = dict(zip(xs, ys, strict=True))  # a step logged twice (a resumed run): the later row wins
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _by_step(data: PlotData) -> PlotData:
    """Every series sorted by step, one value per step."""
    data.total = _sorted_last(*data.total)
    for series in (data.terms, data.parts, data.weights, data.evals):
        for key, (xs, ys) in series.items():
            series[key] = _sorted_last(xs, ys)
    return data


def load_plot_data(folder: str | Path) -> tuple[RunLog, PlotData]:
    """Find the run's log and classify it; PlotError naming the folder if nothing to plot."""
    run = find_run_log(folder)
    rows, _bad = read_rows(run.path)
    data = classify(rows)
    if data.empty:
        raise PlotError(
            f"{run.path}: no plottable rows (no `loss`, `*_loss` or `eval_loss` value with a step); "
            "has the run logged a step yet?"
        )
    return run, data


def render(data: PlotData, out: str | Path, title: str = "") -> Path:
    """Draw `data` to a PNG at `out`."""
    try:
        import matplotlib
    except ImportError as exc:
        message = f"kdcompose plot needs matplotlib: pip install matplotlib ({exc})"
        raise PlotUnavailableError(message) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    has_weights = bool(data.weights)
    fig, axes = plt.subplots(
        2 if has_weights else 1,
        1,
        figsize=(12, 7.5 if has_weights else 5.5),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]} if has_weights else None,
    )
    ax = axes[0][0]
    colors = plt.get_cmap("tab10").colors
    term_color = {key: colors[i % len(colors)] for i, key in enumerate(sorted(data.terms))}

    steps, stacked = data.stacked()
    if stacked:
        keys = sorted(stacked)
        ax.stackplot(
            steps,
            [stacked[k] for k in keys],
            labels=keys,
            colors=[term_color[k] for k in keys],
            alpha=0.55,
            linewidth=0.5,
            edgecolor="white",
        )
    for key, (xs, ys) in sorted(data.parts.items()):
        parent = max((t for t in data.terms if key.startswith(f"{t}_")), key=len)
        label = f"{key} (inside {parent})"
        ax.plot(xs, ys, linestyle="--", linewidth=0.9, color=term_color[parent], label=label)
    if data.total[0]:
        ax.plot(*data.total, color="black", linewidth=1.8, marker="o", markersize=2.5, label="loss (total)")
    for key, (xs, ys) in sorted(data.evals.items(), key=lambda item: (item[0] != "eval_loss", item[0])):
        name = key[len(EVAL_PREFIX) :]
        color = "black" if name == "loss" else term_color.get(name, "grey")
        marker = "D" if name == "loss" else "^"
        ax.scatter(
            xs, ys, marker=marker, s=40, color=color, edgecolors="black", linewidths=0.6, zorder=5, label=key
        )
    title = title or "loss composition"
    if not data.terms:
        title += "\n(no per-term metrics in this log: stock ms-swift GKD logs only the total)"
    ax.set_ylabel("loss (weighted terms stacked)")
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]) if data.terms else None)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    if has_weights:
        wax = axes[1][0]
        for key, (xs, ys) in sorted(data.weights.items()):
            term = key[: -len(DERIVED_SUFFIXES[0])]
            wax.plot(xs, ys, color=term_color.get(term, "grey"), linewidth=1.5, label=key)
        wax.set_ylabel("effective weight")
        wax.set_ylim(bottom=0.0)
        wax.grid(alpha=0.3)
        wax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1][0].set_xlabel("global step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(folder: str | Path, out: str | Path | None = None) -> tuple[RunLog, Path]:
    """Plot a run folder (or the newest run under an output_dir); default output is
    `<run folder>/loss_composition.png`."""
    run, data = load_plot_data(folder)
    target = Path(out) if out is not None else run.path.parent / "loss_composition.png"
    render(data, target, title=f"loss composition: {run.path.parent.name}")
    return run, target
