"""`kdcompose plot`: the loss composition of a run at a glance, from its `logging.jsonl`.

ms-swift appends one JSON object per logging step to `<output_dir>/v<N>-<time>/logging.jsonl`
(training rows with `loss`, evaluation rows with `eval_loss`, and a final summary). The
weighted per-term metrics (`llm_kd_loss`, `sft_loss`, `vision_kd_loss`, `<name>_loss`) add up
to what was optimized, so the first panel stacks them, with the logged total `loss` as a line
on top: where the line leaves the stack, something other than the terms moved the loss.

A stack shows the total, not the terms: a term 500 times smaller than another is a sliver.
So each term also gets a small panel of its own, on its own y scale, with its parts (e.g.
`vision_kd_loss_vit`, `vision_kd_loss_aligner`, already inside the term) dashed, each in its
own colour and dash, and its evaluation points. What a log row holds is classified by rules
(`classify`), without knowing any term by name:

- `<term>_<part>`: a part of the term, unless `<part>` is a diagnostic the composer publishes
  (`kdcompose.composer.STAT_NAMES`, e.g. `llm_kd_loss_topk_mass`): diagnostics are drawn on
  the term panel's right axis, never as parts; `<term>_weight` (a scheduled term's effective
  weight) goes to a panel of its own; `<term>_raw` (the unweighted value) is not drawn.
- A term missing from a training row was skipped on that step (e.g. `ce` on completions the
  student generated): its panel shows a gap there, not a drop to zero, and the stacked panel
  marks the step under the axis (the term put nothing into that step's total).

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

from kdcompose.composer import RAW_SUFFIX, STAT_NAMES, WEIGHT_SUFFIX

LOG_FILE = "logging.jsonl"
EVAL_PREFIX = "eval_"
DERIVED_SUFFIXES: tuple[str, ...] = (WEIGHT_SUFFIX, RAW_SUFFIX)
"""`<metric>_weight` (scheduled terms) and `<metric>_raw` (log_raw): not parts, not stacked."""
NOT_TERMS: frozenset[str] = frozenset({"loss", "train_loss"})
"""`loss` is the total; `train_loss` is the trainer's whole-run average in the summary row."""
PART_DASHES: tuple[str, ...] = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
"""Line styles of a term's parts, in order: each part of a term gets its own."""
_VERSION = re.compile(r"^v(\d+)-")

Series = tuple[list[int], list[float]]


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

    total: Series = field(default_factory=lambda: ([], []))
    terms: dict[str, Series] = field(default_factory=dict)
    """Weighted term metrics (`*_loss`), stacked."""
    parts: dict[str, Series] = field(default_factory=dict)
    """`<term>_<part>` (e.g. `vision_kd_loss_aligner`): already inside their term."""
    stats: dict[str, Series] = field(default_factory=dict)
    """`<term>_<diagnostic>` (e.g. `llm_kd_loss_topk_mass`): not in the loss, never a part."""
    weights: dict[str, Series] = field(default_factory=dict)
    """`<term>_weight`: effective weights of scheduled terms."""
    evals: dict[str, Series] = field(default_factory=dict)
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
        """Terms aligned on the training steps for the stack. A term absent from a logged row
        put nothing into that step's total, so it is 0 *in the stack*; `skipped` lists those
        steps so the figure can say so, and `on_steps` gives the gap for the term's own panel."""
        steps = self.train_steps()
        out = {}
        for key, (xs, ys) in self.terms.items():
            by_step = dict(zip(xs, ys, strict=True))
            out[key] = [by_step.get(s, 0.0) for s in steps]
        return steps, out

    def skipped(self, term: str) -> list[int]:
        """Training steps whose row has no value for `term` (it was skipped on that step)."""
        logged = set(self.terms.get(term, ([], []))[0])
        return [s for s in self.train_steps() if s not in logged]

    def on_steps(self, key: str) -> tuple[list[int], list[float]]:
        """A term, part or diagnostic over every training step, NaN where it was not logged:
        a line drawn from it has a gap there instead of a fall to zero."""
        xs, ys = self.series(key)
        by_step = dict(zip(xs, ys, strict=True))
        steps = sorted(set(self.train_steps()) | set(xs))
        return steps, [by_step.get(s, math.nan) for s in steps]

    def series(self, key: str) -> Series:
        for group in (self.terms, self.parts, self.stats, self.weights, self.evals):
            if key in group:
                return group[key]
        raise KeyError(key)

    def term_of(self, key: str) -> str | None:
        """The term a part, diagnostic or weight key belongs to (the longest term prefix)."""
        owners = [t for t in self.terms if key.startswith(f"{t}_")]
        return max(owners, key=len) if owners else None

    def children(self, term: str, group: Mapping[str, Series]) -> list[str]:
        """Keys of `group` (parts, stats) that belong to `term`, sorted."""
        return sorted(k for k in group if self.term_of(k) == term)


def _term_candidates(keys: Iterable[str]) -> set[str]:
    """`*_loss` keys that are weighted terms: not the total, not eval, and not `<term>_<x>_loss`
    of another candidate (a part whose name happens to end in `_loss`)."""
    loss_keys = {
        k for k in keys if k.endswith("_loss") and k not in NOT_TERMS and not k.startswith(EVAL_PREFIX)
    }
    return {k for k in loss_keys if not any(k != o and k.startswith(f"{o}_") for o in loss_keys)}


def _append(series: dict[str, Series], key: str, step: int, value: float) -> None:
    xs, ys = series.setdefault(key, ([], []))
    xs.append(step)
    ys.append(value)


def child_kind(key: str, term: str) -> str:
    """What `<term>_<rest>` is: `weight`, `raw`, `stat` (a diagnostic the composer publishes)
    or `part`. Decided from the suffix alone, never from the term's name."""
    rest = key[len(term) + 1 :]
    if f"_{rest}" == WEIGHT_SUFFIX:
        return "weight"
    if f"_{rest}" == RAW_SUFFIX:
        return "raw"
    if rest in STAT_NAMES:
        return "stat"
    return "part"


def classify(rows: Iterable[Mapping[str, Any]]) -> PlotData:
    """Sort logged values into total, terms, parts, diagnostics, weights and eval points."""
    rows = [r for r in rows if row_step(r) is not None]
    train_rows = [r for r in rows if not any(k.startswith(EVAL_PREFIX) for k in r)]
    term_keys = _term_candidates(k for r in train_rows for k in r if _number(r[k]) is not None)
    data = PlotData()
    data.terms = {k: ([], []) for k in term_keys}
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
                if name == "loss" or name in term_keys or (name and name in _term_candidates([name])):
                    _append(data.evals, key, step, value)
                continue
            if key == "loss":
                data.total[0].append(step)
                data.total[1].append(value)
            elif key in term_keys:
                _append(data.terms, key, step, value)
            elif (term := data.term_of(key)) is not None:
                kind = child_kind(key, term)
                group = {"weight": data.weights, "stat": data.stats, "part": data.parts}.get(kind)
                if group is not None:
                    _append(group, key, step, value)
    return _by_step(data)


def _sorted_last(xs: list[int], ys: list[float]) -> Series:
    by_step = dict(zip(xs, ys, strict=True))  # a step logged twice (a resumed run): the later row wins
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _by_step(data: PlotData) -> PlotData:
    """Every series sorted by step, one value per step."""
    data.total = _sorted_last(*data.total)
    for series in (data.terms, data.parts, data.stats, data.weights, data.evals):
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


@dataclass(frozen=True)
class Style:
    """How one series is drawn."""

    color: str
    dash: Any = "-"


_TERM_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:olive", "tab:cyan")
_PART_PALETTE = ("tab:brown", "tab:pink", "tab:gray", "darkgoldenrod", "teal", "navy", "crimson")


def styles(data: PlotData) -> dict[str, Style]:
    """A colour per term and, for parts, a colour and a dash of their own: no two parts share
    both, and no part shares its term's colour (so `vit` and `aligner` are told apart)."""
    out = {key: Style(_TERM_PALETTE[i % len(_TERM_PALETTE)]) for i, key in enumerate(sorted(data.terms))}
    for i, key in enumerate(sorted(data.parts)):
        out[key] = Style(_PART_PALETTE[i % len(_PART_PALETTE)], PART_DASHES[i % len(PART_DASHES)])
    return out


def build_figure(data: PlotData, title: str = "", *, log_y: bool = False):  # -> matplotlib Figure
    """The figure: the stacked panel, one panel per term, and the weights panel if any."""
    try:
        import matplotlib
    except ImportError as exc:
        message = f"kdcompose plot needs matplotlib: pip install matplotlib ({exc})"
        raise PlotUnavailableError(message) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    terms = sorted(data.terms)
    columns = min(3, max(1, len(terms)))
    term_rows = math.ceil(len(terms) / columns) if terms else 0
    heights = [3.0] + [1.7] * term_rows + ([1.0] if data.weights else [])
    fig = plt.figure(figsize=(13, 1.0 + 1.25 * sum(heights)))
    grid = GridSpec(len(heights), columns, figure=fig, height_ratios=heights, hspace=0.45, wspace=0.3)
    style = styles(data)

    stack_ax = fig.add_subplot(grid[0, :])
    _draw_stack(stack_ax, data, style, title, log_y)
    for i, term in enumerate(terms):
        ax = fig.add_subplot(grid[1 + i // columns, i % columns], sharex=stack_ax)
        _draw_term(ax, data, term, style, log_y)
    if data.weights:
        wax = fig.add_subplot(grid[len(heights) - 1, :], sharex=stack_ax)
        for key in sorted(data.weights):
            term = data.term_of(key)
            color = style[term].color if term else "grey"
            wax.plot(*data.on_steps(key), color=color, linewidth=1.5, marker=".", markersize=3, label=key)
        wax.set_ylabel("effective weight")
        wax.set_ylim(bottom=0.0)
        wax.grid(alpha=0.3)
        wax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        wax.set_xlabel("global step")
    fig.subplots_adjust(left=0.06, right=0.8, top=0.94, bottom=0.06)
    return fig


def _draw_stack(ax: Any, data: PlotData, style: Mapping[str, Style], title: str, log_y: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    steps, stacked = data.stacked()
    if stacked:
        keys = sorted(stacked)
        ax.stackplot(
            steps,
            [stacked[k] for k in keys],
            labels=keys,
            colors=[style[k].color for k in keys],
            alpha=0.55,
            linewidth=0.5,
            edgecolor="white",
        )
        for key in keys:  # skipped steps: a mark under the axis, not a silent zero
            gaps = data.skipped(key)
            if gaps:
                ax.plot(
                    gaps,
                    [0.0] * len(gaps),
                    linestyle="none",
                    marker="|",
                    markersize=9,
                    color=style[key].color,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    label=f"{key} skipped on this step",
                )
    if data.total[0]:
        ax.plot(*data.total, color="black", linewidth=1.8, marker="o", markersize=2.5, label="loss (total)")
    if "eval_loss" in data.evals:
        xs, ys = data.evals["eval_loss"]
        ax.scatter(xs, ys, marker="D", s=40, color="black", edgecolors="black", zorder=5, label="eval_loss")
    title = title or "loss composition"
    if not data.terms:
        title += "\n(no per-term metrics in this log: stock ms-swift GKD logs only the total)"
    ax.set_ylabel("loss (weighted terms stacked)")
    if log_y:
        ax.set_yscale("log", nonpositive="mask")
    elif data.terms:
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_term(ax: Any, data: PlotData, term: str, style: Mapping[str, Style], log_y: bool) -> None:
    xs, ys = data.on_steps(term)
    ax.plot(xs, ys, color=style[term].color, linewidth=1.6, marker="o", markersize=2.5, label=term)
    for part in data.children(term, data.parts):
        pxs, pys = data.on_steps(part)
        short = part[len(term) + 1 :]
        ax.plot(
            pxs,
            pys,
            color=style[part].color,
            linestyle=style[part].dash,
            linewidth=1.2,
            marker=".",
            markersize=3,
            label=short,
        )
    if f"{EVAL_PREFIX}{term}" in data.evals:
        exs, eys = data.evals[f"{EVAL_PREFIX}{term}"]
        ax.scatter(
            exs, eys, marker="^", s=36, color=style[term].color, edgecolors="black", zorder=5, label="eval"
        )
    if log_y:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_title(term, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    stats = data.children(term, data.stats)
    if stats:  # diagnostics: their own (right) axis, grey, never mixed with the loss scale
        twin = ax.twinx()
        for i, key in enumerate(stats):
            sxs, sys_ = data.on_steps(key)
            twin.plot(sxs, sys_, color="grey", linestyle=PART_DASHES[i % len(PART_DASHES)], linewidth=1.0)
            handles.append(twin.lines[-1])
            labels.append(f"{key[len(term) + 1 :]} (diagnostic, right axis)")
        twin.tick_params(labelsize=7, colors="grey")
    ax.legend(handles, labels, fontsize=7, frameon=False, loc="best")


def render(data: PlotData, out: str | Path, title: str = "", *, log_y: bool = False) -> Path:
    """Draw `data` to a PNG at `out`."""
    fig = build_figure(data, title, log_y=log_y)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(
    folder: str | Path, out: str | Path | None = None, *, log_y: bool = False
) -> tuple[RunLog, Path]:
    """Plot a run folder (or the newest run under an output_dir); default output is
    `<run folder>/loss_composition.png`."""
    run, data = load_plot_data(folder)
    target = Path(out) if out is not None else run.path.parent / "loss_composition.png"
    render(data, target, title=f"loss composition: {run.path.parent.name}", log_y=log_y)
    return run, target
