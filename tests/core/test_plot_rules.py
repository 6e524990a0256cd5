"""`kdcompose plot`'s rules on hand-written log rows: what is a term, a part, a diagnostic, a
weight, an evaluation point; a skipped term is a gap; parts are told apart; `--log-y`.

Pure: no training run. The figure checks draw with matplotlib's Agg backend into memory.
"""

from __future__ import annotations

import math

import pytest

from kdcompose.composer import STAT_NAMES
from kdcompose.plot import (
    PlotError,
    build_figure,
    child_kind,
    classify,
    find_run_log,
    load_plot_data,
    read_rows,
    render,
    styles,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(step: int, total: int = 4, **values: float) -> dict:
    return {**values, "global_step/max_steps": f"{step}/{total}"}


ROWS = [
    _row(
        1,
        loss=3.0,
        llm_kd_loss=1.0,
        llm_kd_loss_topk_mass=0.93,
        aux_ce_loss=0.5,
        vision_kd_loss=1.5,
        vision_kd_loss_vit=0.5,
        vision_kd_loss_aligner=1.0,
        vision_kd_loss_weight=0.3,
        vision_kd_loss_raw=5.0,
        grad_norm=2.0,
        learning_rate=1e-4,
    ),
    _row(2, loss=2.0, llm_kd_loss=2.0, llm_kd_loss_topk_mass=0.9),  # other terms skipped on step 2
    _row(2, loss=2.5, llm_kd_loss=2.5, llm_kd_loss_topk_mass=0.91),  # a resumed run logs step 2 again
    _row(2, eval_loss=1.8, eval_llm_kd_loss=1.8, eval_runtime=3.0, eval_vision_kd_loss_weight=0.3),
    _row(
        3,
        loss=2.9,
        llm_kd_loss=0.9,
        llm_kd_loss_topk_mass=0.95,
        aux_ce_loss=0.4,
        vision_kd_loss=1.6,
        vision_kd_loss_vit=0.6,
        vision_kd_loss_aligner=1.0,
        vision_kd_loss_weight=0.3,
    ),
    {"train_loss": 2.4, "train_runtime": 9.0, "global_step/max_steps": "3/3"},
    {"global_step": 3, "log_history": [{"loss": 9.0, "step": 1}]},
]


def test_rows_are_sorted_into_terms_parts_diagnostics_weights_and_eval_points():
    data = classify(ROWS)
    assert set(data.terms) == {"llm_kd_loss", "aux_ce_loss", "vision_kd_loss"}
    assert set(data.parts) == {"vision_kd_loss_vit", "vision_kd_loss_aligner"}
    assert set(data.stats) == {"llm_kd_loss_topk_mass"}
    assert set(data.weights) == {"vision_kd_loss_weight"}
    assert set(data.evals) == {"eval_loss", "eval_llm_kd_loss"}
    assert data.total == ([1, 2, 3], [3.0, 2.5, 2.9])
    assert data.stats["llm_kd_loss_topk_mass"] == ([1, 2, 3], [0.93, 0.91, 0.95])


@pytest.mark.parametrize("stat", sorted(STAT_NAMES))
def test_a_diagnostic_is_never_a_part_whatever_the_term_is_called(stat):
    """The rule reads the suffix the composer publishes, not the term's name: a plug-in term
    `my_term_loss` with `my_term_loss_<stat>` gets the same treatment as lm_jsd."""
    rows = [_row(1, loss=1.0, my_term_loss=1.0, **{f"my_term_loss_{stat}": 0.5, "my_term_loss_a": 0.4})]
    data = classify(rows)
    assert set(data.stats) == {f"my_term_loss_{stat}"}
    assert set(data.parts) == {"my_term_loss_a"}
    assert child_kind(f"my_term_loss_{stat}", "my_term_loss") == "stat"
    assert child_kind("my_term_loss_a", "my_term_loss") == "part"


def test_a_part_named_like_a_term_stays_inside_its_term():
    """`hidden_kd_loss_extra_loss` ends in `_loss` but belongs to `hidden_kd_loss`: stacking it
    as a term would count it twice."""
    rows = [_row(1, loss=1.0, hidden_kd_loss=1.0, hidden_kd_loss_extra_loss=0.4, hidden_kd_loss_0=0.6)]
    data = classify(rows)
    assert set(data.terms) == {"hidden_kd_loss"}
    assert set(data.parts) == {"hidden_kd_loss_extra_loss", "hidden_kd_loss_0"}


def test_a_skipped_term_is_a_gap_in_its_panel_and_zero_only_in_the_stack():
    data = classify(ROWS)
    steps, ce = data.on_steps("aux_ce_loss")
    assert steps == [1, 2, 3]
    assert ce[0] == 0.5 and math.isnan(ce[1]) and ce[2] == 0.4
    _, vit = data.on_steps("vision_kd_loss_vit")
    assert math.isnan(vit[1]), "a part of a skipped term is a gap too"
    assert data.skipped("aux_ce_loss") == [2]
    assert data.skipped("llm_kd_loss") == []
    stack_steps, stacked = data.stacked()
    assert stack_steps == [1, 2, 3]
    assert stacked["aux_ce_loss"] == [0.5, 0.0, 0.4], "in the stack it put nothing into step 2's total"
    assert stacked["llm_kd_loss"] == [1.0, 2.5, 0.9]


def test_every_part_has_its_own_style_and_none_takes_its_terms_colour():
    rows = [
        _row(
            1,
            loss=1.0,
            vision_kd_loss=1.0,
            vision_kd_loss_vit=0.2,
            vision_kd_loss_aligner=0.3,
            vision_kd_loss_deepstack=0.5,
            hidden_kd_loss=1.0,
            hidden_kd_loss_0=0.5,
            hidden_kd_loss_1=0.5,
        )
    ]
    data = classify(rows)
    style = styles(data)
    parts = sorted(data.parts)
    assert len({(style[p].color, str(style[p].dash)) for p in parts}) == len(parts)
    assert len({style[p].color for p in parts}) == len(parts)
    assert all(style[p].dash != "-" for p in parts), "parts are dashed"
    term_colors = {style[t].color for t in data.terms}
    assert not term_colors & {style[p].color for p in parts}
    assert style["vision_kd_loss_vit"] != style["vision_kd_loss_aligner"]


def _panel(fig, title):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def test_the_figure_has_a_stack_one_panel_per_term_and_a_weights_panel():
    data = classify(ROWS)
    fig = build_figure(data, "t")
    titles = {a.get_title() for a in fig.axes}
    assert {"t", "llm_kd_loss", "aux_ce_loss", "vision_kd_loss"} <= titles
    vision = _panel(fig, "vision_kd_loss")
    labels = [line.get_label() for line in vision.get_lines()]
    assert labels == ["vision_kd_loss", "aligner", "vit"], "the term, then its parts (dashed)"
    dashes = {line.get_label(): line.get_linestyle() for line in vision.get_lines()}
    assert dashes["vision_kd_loss"] == "-" and dashes["vit"] != "-" and dashes["aligner"] != "-"
    assert dashes["vit"] != dashes["aligner"]
    ce_line = _panel(fig, "aux_ce_loss").get_lines()[0]
    assert math.isnan(ce_line.get_ydata()[1]), "the panel's line has a gap at the skipped step"
    llm = _panel(fig, "llm_kd_loss")
    legend = [t.get_text() for t in llm.get_legend().get_texts()]
    assert "topk_mass (diagnostic, right axis)" in legend
    assert all(line.get_label() != "llm_kd_loss_topk_mass" for line in llm.get_lines()), (
        "not on the loss axis"
    )
    assert len(llm.collections) == 1, "the eval point of llm_kd_loss"
    assert any(a.get_ylabel() == "effective weight" for a in fig.axes)


@pytest.mark.parametrize("log_y", [False, True])
def test_log_y_sets_every_loss_axis_to_log(log_y):
    fig = build_figure(classify(ROWS), "t", log_y=log_y)
    loss_axes = [
        a for a in fig.axes if a.get_title() in {"t", "llm_kd_loss", "aux_ce_loss", "vision_kd_loss"}
    ]
    assert len(loss_axes) == 4
    assert {a.get_yscale() for a in loss_axes} == {"log" if log_y else "linear"}


def test_render_writes_a_png(tmp_path):
    out = render(classify(ROWS), tmp_path / "sub" / "p.png", log_y=True)
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_stock_log_without_terms_still_plots_the_total(tmp_path):
    data = classify([_row(1, loss=2.0), _row(2, loss=1.5)])
    assert not data.terms and data.total == ([1, 2], [2.0, 1.5])
    fig = build_figure(data)
    assert "stock ms-swift GKD logs only the total" in fig.axes[0].get_title()


def test_a_truncated_last_line_does_not_hide_the_rest(tmp_path):
    log = tmp_path / "logging.jsonl"
    log.write_text('{"loss": 1.0, "global_step/max_steps": "1/2"}\n{"loss": 1.2, "global_step/max_')
    rows, bad = read_rows(log)
    assert bad == 1
    assert classify(rows).total == ([1], [1.0])


def test_newest_run_under_an_output_dir_is_chosen_by_version(tmp_path):
    out = tmp_path / "out"
    for name in ("v10-20250101-000000", "v9-20250101-000000", "v2-20990101-000000"):
        (out / name).mkdir(parents=True)
        (out / name / "logging.jsonl").write_text('{"loss": 1.0, "global_step/max_steps": "1/1"}\n')
    run = find_run_log(out)
    assert run.path == out / "v10-20250101-000000" / "logging.jsonl"
    assert "newest of 3 runs" in run.note


def test_a_log_without_plottable_rows_names_the_file(tmp_path):
    (tmp_path / "logging.jsonl").write_text('{"grad_norm": 1.0, "global_step/max_steps": "1/4"}\n')
    with pytest.raises(PlotError, match="no plottable rows"):
        load_plot_data(tmp_path)


def _write_run(folder, rows) -> None:
    import json

    folder.mkdir(parents=True)
    (folder / "logging.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_plot_writes_into_the_run_folder_and_names_the_log(tmp_path, capsys):
    from kdcompose.cli import main

    run = tmp_path / "out" / "v0-20250101-000000"
    _write_run(run, ROWS)
    assert main(["plot", str(tmp_path / "out"), "--log-y"]) == 0
    out = capsys.readouterr().out
    assert f"read {run / 'logging.jsonl'} (the only run under {tmp_path / 'out'})" in out
    assert (run / "loss_composition.png").read_bytes()[:8] == PNG_SIGNATURE
    target = tmp_path / "elsewhere" / "p.png"
    assert main(["plot", str(run), "-o", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out and target.is_file()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such folder"),
        (lambda p: (p / "checkpoint-1").mkdir(parents=True), "no logging.jsonl here or in its run folders"),
        (lambda p: _write_run(p, [{"grad_norm": 1.0, "global_step/max_steps": "1/4"}]), "no plottable rows"),
    ],
)
def test_cli_plot_exits_2_naming_the_folder_when_there_is_nothing_to_plot(tmp_path, capsys, make, message):
    from kdcompose.cli import main

    folder = tmp_path / "run"
    make(folder)
    assert main(["plot", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(folder) in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.png"))
