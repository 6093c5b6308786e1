"""Tests of experiments/summarize.py on synthetic stored results with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from run_study import expand, load_study
from summarize import (
    at_time,
    collapse_info,
    collect_cells,
    compute_rows,
    extra_rows,
    first_reaching,
    flagged_runs,
    format_extra,
    format_paired,
    format_table,
    headline,
    main,
    mean_ci,
    paired_rows,
    speed_rows,
    to_target_rows,
)

from robust_agc.errors import UserError
from robust_agc.report import Run

STUDY = {
    "study": "toy",
    "base": {"epochs": 3},
    "grid": {
        "sparse": [{"name": "r90", "sparsity": 0.9}, {"name": "r99", "sparsity": 0.99}],
        "opt": [{"name": "sgd", "optimizer": "sgd"}, {"name": "agc", "optimizer": "agc"}],
    },
    "seeds": [0, 1],
    "baseline": {"axis": "opt", "value": "sgd"},
}

# (cell, seed) -> per-epoch (val_robust_acc, wall_time_s, grad_evals)
CURVES = {
    ("r90_sgd", 0): [(0.30, 10, 100), (0.40, 20, 200), (0.50, 30, 300)],
    ("r90_sgd", 1): [(0.32, 12, 100), (0.44, 24, 200), (0.54, 36, 300)],  # target 0.52, time 33
    ("r90_agc", 0): [(0.40, 15, 120), (0.53, 30, 240), (0.55, 45, 360)],  # reaches at epoch 2
    ("r90_agc", 1): [(0.35, 14, 120), (0.45, 28, 240), (0.60, 42, 360)],  # reaches at epoch 3
    ("r99_sgd", 0): [(0.20, 10, 100), (0.25, 20, 200), (0.30, 30, 300)],  # target 0.30, time 30
    ("r99_agc", 0): [(0.10, 11, 120), (0.20, 22, 240), (0.29, 33, 360)],  # never reaches
}


def _write_results(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    results = tmp_path / "results"
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    for spec in expand(study, runs_root=tmp_path / "runs", results_root=results):
        curve = CURVES.get((spec.cell, spec.seed))
        if curve is None:
            continue
        d = spec.result_dir
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(spec.config().to_dict()))
        rows = [
            {
                "epoch": e + 1,
                "val_robust_acc": v,
                "val_clean_acc": v + 0.2,
                "test_robust_acc": v - 0.01,
                "test_clean_acc": v + 0.19,
                "cpu_time_s": float(t),
                "wall_time_s": float(t) + 100.0,  # a loaded machine: wall >> CPU time
                "grad_evals": g,
            }
            for e, (v, t, g) in enumerate(curve)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "summary.json").write_text(json.dumps({"versions": {"torch": "x"}, "machine": {}}))
        (d / "eval.json").write_text(json.dumps({"clean_acc": 0.7, "robust_acc": 0.5}))
        if spec.seed == 0:
            aa = {"clean_acc": 0.7, "robust_acc": 0.40 if spec.cell == "r90_agc" else 0.3}
            (d / "eval_autoattack.json").write_text(json.dumps(aa))
    return path, results


def _write_paired_results(tmp_path: Path) -> tuple[Path, Path]:
    """The toy results with final-evaluation robust accuracies that differ by seed: sgd 0.50 /
    0.60 on seeds 0 / 1, agc 0.53 / 0.58 in r90 (differences +3 and -2 points)."""
    path, results = _write_results(tmp_path)
    for cell, seed, acc in [
        ("r90_sgd", 0, 0.5),
        ("r90_sgd", 1, 0.6),
        ("r90_agc", 0, 0.53),
        ("r90_agc", 1, 0.58),
    ]:
        (results / "toy" / cell / f"s{seed}" / "eval.json").write_text(
            json.dumps({"clean_acc": 0.7, "robust_acc": acc})
        )
    return path, results


def test_helpers() -> None:
    run = Run(
        path=Path("."),
        config={},
        metrics=[
            {"epoch": 1, "a": 0.1, "wall_time_s": 5.0},
            {"epoch": 2, "a": 0.3, "wall_time_s": 9.0},
        ],
    )
    assert first_reaching(run, "a", 0.3)["epoch"] == 2
    assert first_reaching(run, "a", 0.05)["epoch"] == 1
    assert first_reaching(run, "a", 0.31) is None
    assert at_time(run, 4.9) is None
    assert at_time(run, 5.0)["epoch"] == 1
    assert at_time(run, 100.0)["epoch"] == 2


def test_to_target_against_hand_computed_values(tmp_path: Path) -> None:
    path, results = _write_results(tmp_path)
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    cells = collect_cells(study, results)
    assert [(c.cell, len(c.runs)) for c in cells] == [
        ("r90_sgd", 2),
        ("r90_agc", 2),
        ("r99_sgd", 1),
        ("r99_agc", 1),
    ]
    rows = {r["cell"]: r for r in to_target_rows(cells, study.baseline, "cpu_time_s")}
    wall = {r["cell"]: r for r in to_target_rows(cells, study.baseline, "wall_time_s")}
    assert wall["r90_agc"]["baseline_time_s"] == pytest.approx(133.0)
    assert sorted(wall["r90_agc"]["time_to_target_s"]) == [130.0, 142.0]
    r = rows["r90_agc"]
    assert r["baseline"] == "r90_sgd"
    assert r["target"] == pytest.approx(0.52)
    assert r["baseline_time_s"] == pytest.approx(33.0)
    assert r["reached"] == 2
    assert sorted(r["epochs_to_target"]) == [2.0, 3.0]
    assert sorted(r["time_to_target_s"]) == [30.0, 42.0]
    assert sorted(r["grad_evals_to_target"]) == [240.0, 360.0]
    # at 33 s: seed 0 finished epoch 2 (30 s), seed 1 epoch 2 (28 s)
    assert r["epoch_at_time"] == [2.0, 2.0]
    assert r["val_at_time"] == [0.53, 0.45]
    # the baseline's own row: seed 1 reaches its mean, seed 0 never does
    assert rows["r90_sgd"]["reached"] == 1 and rows["r90_sgd"]["epochs_to_target"] == [3.0]
    r99 = rows["r99_agc"]
    assert (r99["target"], r99["reached"], r99["epochs_to_target"]) == (
        pytest.approx(0.30),
        0,
        [],
    )
    assert r99["epoch_at_time"] == [2.0]  # 33 s > 30 s: only epochs 1-2 count
    # the other way round: the baseline at the cell's own budget (mean final time 43.5 s)
    assert r["cell_time_s"] == pytest.approx(43.5)
    assert r["baseline_val_at_cell_time"] == [0.50, 0.54]  # both sgd seeds finished by then
    assert r99["cell_time_s"] == pytest.approx(33.0)
    assert r99["baseline_val_at_cell_time"] == [0.30]
    # the baseline's own row: at its mean time (33 s) seed 1 (36 s) had finished epoch 2 only
    assert rows["r90_sgd"]["baseline_val_at_cell_time"] == [0.50, 0.44]
    table = format_table(cells, study.baseline, clock="cpu_time_s", extra_evals=["autoattack"])
    line = next(x for x in table.splitlines() if x.startswith("| r90_agc | 52.00"))
    assert "| 2/2 | 2.5 ± 0.7 | 36 ± 8 | 300 ± 85 | 33 |" in line
    assert "| r99_agc | 30.00 | 0/1 | - | - | - |" in table
    # final columns: mean ± sample std of the last epoch, in percent
    final = next(x for x in table.splitlines() if x.startswith("| r90_sgd | 2 |"))
    assert "| 52.00 ± 2.83 |" in final
    # the extra evaluation's columns: seed 0 only, its count given; eval.json's robust column
    agc = next(x for x in table.splitlines() if x.startswith("| r90_agc | 2 |"))
    assert "| 70.00 ± 0.00 | 50.00 ± 0.00 | 70.00 | 40.00 (1) |" in agc
    assert "autoattack robust (seeds)" in table and "train cpu_time_s" in table


def test_paired_differences_by_seed(tmp_path: Path) -> None:
    path, results = _write_paired_results(tmp_path)
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    cells = collect_cells(study, results)
    rows = {r["cell"]: r for r in paired_rows(cells, study.baseline, "cpu_time_s")}
    # the reference cells themselves are left out; agc is in two cells: a pooled row
    assert list(rows) == ["r90_agc", "r99_agc", "all agc"]
    r = rows["r90_agc"]
    assert r["reference"] == "r90_sgd" and r["seeds"] == [0, 1]
    assert r["d_eval_robust"] == pytest.approx([0.03, -0.02])
    assert r["d_eval_clean"] == pytest.approx([0.0, 0.0])
    assert r["d_val"] == pytest.approx([0.05, 0.06])
    assert r["time_ratio"] == pytest.approx([45 / 30, 42 / 36])
    # equal time: agc seed 0 finished epoch 2 (30 s) by sgd's 30 s: 0.52 - 0.49; seed 1 epoch 2
    # (28 s <= 36 s): 0.44 - 0.53 (test robust = val robust - 0.01 in both)
    assert r["d_test_at_time"] == pytest.approx([0.53 - 0.50, 0.45 - 0.54])
    # r99_agc has seed 0 only; its reference has seed 0 only: one pair
    assert rows["r99_agc"]["seeds"] == [0]
    pooled = rows["all agc"]
    assert pooled["reference"] == "all sgd" and pooled["seeds"] == [0, 1, 0]
    assert pooled["d_val"] == pytest.approx([0.05, 0.06, -0.01])
    # the other direction: agc as the reference
    back = {r["cell"]: r for r in paired_rows(cells, study.baseline, "cpu_time_s", "agc")}
    assert back["r90_sgd"]["d_eval_robust"] == pytest.approx([-0.03, 0.02])
    table = format_paired(list(rows.values()), "cpu_time_s")
    assert (
        "| r90_agc | r90_sgd | 2 | 0.50 ± 3.54 | 0.00 ± 0.00 | 5.50 ± 0.71 | -3.00 ± 8.49 | 1.33 ± 0.24 |"
        in table
    )
    with pytest.raises(UserError, match="no cell with opt=adam"):
        paired_rows(cells, study.baseline, "cpu_time_s", "adam")


def test_cli(tmp_path: Path, capsys) -> None:
    path, results = _write_results(tmp_path)
    out_json = tmp_path / "rows.json"
    assert main([str(path), "--results", str(results), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "## toy: 6 stored runs in 4 cells" in text
    assert len(json.loads(out_json.read_text())) == 4
    assert text.count("Paired by seed") == 1 and "| r90_agc | r90_sgd | 2 |" in text
    assert main([str(path), "--results", str(results), "--paired", "agc"]) == 0
    text = capsys.readouterr().out
    assert text.count("Paired by seed") == 2 and "| r90_sgd | r90_agc | 2 |" in text
    assert main([str(path), "--results", str(results), "--paired", "adam"]) == 2
    assert "no cell with opt=adam" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.yaml")]) == 2


def test_mean_ci_is_the_student_t_interval() -> None:
    # two values: t(0.975, 1 dof) = 12.7062; half-width = t * sd / sqrt(2)
    m, lo, hi = mean_ci([0.01, 0.03, None])
    assert m == pytest.approx(0.02)
    assert hi - m == pytest.approx(12.7062 * (2**0.5 * 0.01) / 2**0.5, rel=1e-4)
    assert m - lo == pytest.approx(hi - m)
    # 5 values: t(0.975, 4) = 2.7764
    vals = [0.1, 0.2, 0.3, 0.4, 0.5]
    m, lo, hi = mean_ci(vals)
    assert hi - m == pytest.approx(2.7764 * 0.158114 / 5**0.5, rel=1e-4)
    assert mean_ci([0.4]) == (0.4, float("-inf"), float("inf"))
    with pytest.raises(ValueError):
        mean_ci([None])


def test_headline_numbers_come_from_the_pooled_pairs(tmp_path: Path, capsys) -> None:
    path, results = _write_paired_results(tmp_path)
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    rows = paired_rows(collect_cells(study, results), study.baseline, "cpu_time_s")
    text = headline(
        rows, ["agc"], "cpu_time_s", {"checkpoint": "best.pt", "pgd_steps": 50, "n_examples": 1000}
    )
    # pooled eval robust differences +3, -2, 0 points; time ratios 1.5, 1.1667, 1.1
    assert text.startswith("- `agc` vs `sgd`, 3 seed pairs in 2 cells: robust accuracy of the ")
    assert "(best.pt, PGD-50, first 1000 test points) +0.33 ± 2.52 points" in text
    assert "no measurable difference" in text and "at 1.26 ± 0.21x the training CPU time" in text
    m, lo, hi = mean_ci([0.03, -0.02, 0.0])
    assert f"(95% CI {100 * lo:+.2f} to {100 * hi:+.2f}: no measurable difference; pairs" in text
    # a clear effect gets its sign as the verdict: every pair +5 +- 0.1 points
    rows[-1]["d_eval_robust"] = [0.05, 0.051, 0.049]
    assert (
        "+5.00 ± 0.10 points (95% CI +4.75 to +5.25: higher; pairs +5.0, +5.1, +4.9)"
        in headline(rows, ["agc"], "cpu_time_s")
    )
    with pytest.raises(UserError, match="no paired row"):
        headline(rows, ["adam"], "cpu_time_s")
    # few pairs: each pair's difference is listed (the r90 cell's own row: +3 and -2 points)
    r90 = headline([r for r in rows if r["cell"] == "r90_agc"], ["agc"], "cpu_time_s")
    assert "2 seed pairs in 1 cell:" in r90 and "; pairs +3.0, -2.0)" in r90
    assert main([str(path), "--results", str(results), "--headline", "agc"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("- `agc` vs `sgd`, 3 seed pairs")
    # against another reference: the sgd cells paired with agc
    assert main([str(path), "--results", str(results), "--headline", "sgd", "--paired", "agc"]) == 0
    assert capsys.readouterr().out.startswith("- `sgd` vs `agc`, 3 seed pairs in 2 cells")
    argv = [str(path), "--results", str(results), "--headline", "sgd"]
    assert main([*argv, "--paired", "agc", "--paired", "sgd"]) == 2


def test_pairs_on_two_cpu_models_leave_the_time_figures(tmp_path: Path) -> None:
    path, results = _write_paired_results(tmp_path)
    summary = {"versions": {"torch": "x"}, "machine": {"cpu": "Other CPU", "threads": 1}}
    (results / "toy" / "r90_agc" / "s1" / "summary.json").write_text(json.dumps(summary))
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    cells = collect_cells(study, results)
    rows = {r["cell"]: r for r in paired_rows(cells, study.baseline, "cpu_time_s")}
    r = rows["r90_agc"]
    assert r["cross_machine"] == [False, True]
    assert r["time_ratio"] == pytest.approx([45 / 30, None])  # seed 1's speeds differ
    assert r["d_test_at_time"][1] is None and r["d_eval_robust"] == pytest.approx([0.03, -0.02])
    assert "| r90_agc | r90_sgd | 1+1 |" in format_paired(list(rows.values()), "cpu_time_s")
    text = headline(list(rows.values()), ["agc"], "cpu_time_s")
    assert "(1 pair recorded on two CPU models left out of the time figures)." in text
    only_cross = {**r, "seeds": [1], "cross_machine": [True], "time_ratio": [None]}
    only_cross.update(d_eval_robust=[-0.02], d_test_at_time=[None])
    text = headline([only_cross], ["agc"], "cpu_time_s")
    assert "-2.00 points (one pair: no interval)" in text and "- (no pair with this value)" in text


def test_extra_evaluation_against_the_final_one_on_the_same_points(tmp_path: Path, capsys) -> None:
    """The AutoAttack rows compare with the final evaluation restricted to the extra one's first
    points (per-point flags), not with its accuracy over all of its points."""
    path, results = _write_results(tmp_path)
    # r90_sgd/s0: the final evaluation (8 points) is robust on 6 of them, but on 3 of the first 4
    d = results / "toy" / "r90_sgd" / "s0"
    flags = [True, True, False, True, True, True, False, True]
    (d / "eval.json").write_text(
        json.dumps({"clean_acc": 1.0, "robust_acc": 0.75, "per_point_robust": flags})
    )
    (d / "eval_autoattack.json").write_text(
        json.dumps(
            {
                "n_examples": 4,
                "clean_acc": 1.0,
                "robust_acc": 0.5,
                "flags": {"zero_gradients": False, "square_beats_gradient": True},
                "stages": [
                    {"name": "clean", "n_broken": 0},
                    {
                        "name": "autoattack",
                        "n_broken": 2,
                        "components": [
                            {"name": "autoattack/apgd-ce", "n_broken": 1},
                            {"name": "autoattack/square", "n_broken": 1},
                        ],
                    },
                ],
            }
        )
    )
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    rows = {r["cell"]: r for r in extra_rows(collect_cells(study, results), "autoattack")}
    assert set(rows) == {"r90_sgd", "r90_agc", "r99_sgd", "r99_agc"}  # every seed-0 run holds one
    r = rows["r90_sgd"]
    assert r["seed"] == 0 and r["final_same_points"] == pytest.approx(0.75)
    assert r["gap"] == pytest.approx(-0.25) and r["flags"] == ["square_beats_gradient"]
    assert rows["r90_agc"]["final_same_points"] is None and rows["r90_agc"]["gap"] is None
    text = format_extra(list(rows.values()), "autoattack", "PGD-50")
    row = "| r90_sgd | 0 | 4 | 100.0 | 50.0 | 75.0 | -25.0 | apgd-ce 1, square 1 |"
    assert row + " square_beats_gradient |" in text
    assert "-25.0 to -25.0 points" in text and "flags fired in 1 run." in text
    assert "broken over all runs: apgd-ce 1, square 1;" in text
    assert format_extra([], "autoattack").startswith("No run holds")
    cells = collect_cells(study, results)
    assert flagged_runs(cells, "eval_autoattack.json") == ["r90_sgd/s0 (square_beats_gradient)"]
    assert flagged_runs(cells) == []
    STUDY_EXTRA = {**STUDY, "extra_evals": [{"name": "autoattack", "seeds": [0]}], "eval": {}}
    path.write_text(yaml.safe_dump(STUDY_EXTRA, sort_keys=False))
    assert main([str(path), "--results", str(results), "--extra", "autoattack"]) == 0
    assert "| r90_agc | 0 | - | 70.0 | 40.0 | - | - | - | none |" in capsys.readouterr().out
    assert main([str(path), "--results", str(results), "--extra", "nope"]) == 2
    assert "no extra evaluation 'nope'" in capsys.readouterr().err


def test_headline_adds_the_paired_extra_evaluation(tmp_path: Path) -> None:
    """Seed 0 holds AutoAttack: r90 agc 40% vs sgd 30% (+10 points), r99 agc 30% vs 30% (0)."""
    path, results = _write_results(tmp_path)
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    cells = collect_cells(study, results)
    rows = paired_rows(cells, study.baseline, "cpu_time_s", extra=["autoattack"])
    pooled = next(r for r in rows if r["cell"] == "all agc")
    assert pooled["seeds"] == [0, 1, 0]  # r90: seeds 0 and 1, r99: seed 0
    vals = pooled["d_autoattack_robust"]
    assert vals[0] == pytest.approx(0.10) and vals[1] is None and vals[2] == pytest.approx(0.0)
    r90 = next(r for r in rows if r["cell"] == "r90_agc")
    assert r90["seeds"] == [0, 1] and r90["d_autoattack_robust"][1] is None  # seed 1 holds none
    spec = {"name": "autoattack", "seeds": [0], "n_examples": 500}
    text = headline(rows, ["agc"], "cpu_time_s", None, [spec])
    assert "; under `autoattack` (seed 0, first 500 test points), 2 pairs: +5.00 ± 7.07" in text
    assert "pairs +10.0, +0.0)." in text
    assert "under `autoattack`" not in headline(rows, ["agc"], "cpu_time_s")  # none asked for
    # no paired extra result: the sentence is left out
    bare = paired_rows(cells, study.baseline, "cpu_time_s")
    assert "autoattack" not in headline(bare, ["agc"], "cpu_time_s", None, [spec])


def _store(d: Path, cfg: dict, rows: list[dict], summary: dict, **files: dict) -> None:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"machine": {}, **summary}))
    for name, data in files.items():
        (d / f"{name}.json").write_text(json.dumps(data))


def _row(epoch: int, acc: float, t: float, g: int, **extra) -> dict:
    return {
        "epoch": epoch,
        "val_robust_acc": acc,
        "val_clean_acc": acc + 0.2,
        "test_robust_acc": acc,
        "test_clean_acc": acc + 0.2,
        "cpu_time_s": t,
        "train_time_s": t,
        "wall_time_s": t,
        "grad_evals": g,
        **extra,
    }


def test_collapse_column_counts_flagged_epochs_stops_and_rollbacks(tmp_path: Path) -> None:
    data = {
        "study": "fast",
        "base": {"epochs": 3},
        "grid": {"recipe": [{"name": "pgd"}, {"name": "fgsm", "train_attack": "fgsm-rs"}]},
        "seeds": [0, 1, 2],
        "baseline": {"axis": "recipe", "value": "pgd"},
    }
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    specs = {(s.cell, s.seed): s for s in expand(study, runs_root=tmp_path, results_root=results)}
    ok = [False, False, False]
    for seed in range(3):  # the PGD runs: not watched (no collapse key)
        spec = specs[("pgd", seed)]
        _store(
            spec.result_dir, spec.config().to_dict(), [_row(e, 0.5, e, e) for e in (1, 2, 3)], {}
        )
    runs = {  # seed -> (collapse flags per epoch, rolled back epoch 3, guard summary)
        0: (ok, {}),
        1: ([False, True, True], {"stopped": False, "rolled_back_to": None}),
        2: ([False, False, True], {"stopped": True, "rolled_back_to": 2}),
    }
    for seed, (flags, guard) in runs.items():
        spec = specs[("fgsm", seed)]
        rows = [_row(e, 0.6 - 0.5 * f, e, e, collapse=f) for e, f in enumerate(flags, 1)]
        if guard.get("rolled_back_to"):
            rows[-1]["rolled_back"] = True
        _store(spec.result_dir, spec.config().to_dict(), rows, {"collapse_guard": guard})
    cells = collect_cells(study, results)
    fgsm = cells[1]
    infos = [collapse_info(r) for r in fgsm.runs]
    assert [i["epochs"] for i in infos] == [[], [2, 3], [3]]
    assert [(i["stopped"], i["rolled_back"]) for i in infos] == [(False, False)] * 2 + [
        (False, True)
    ]
    assert all(collapse_info(r) is None for r in cells[0].runs)
    # the rolled-back epoch is not the run's final one: epoch 2 (0.6) is
    assert [r.metrics[-1]["val_robust_acc"] for r in fgsm.runs] == [0.6, pytest.approx(0.1), 0.6]
    table = format_table(cells, None, clock="cpu_time_s").splitlines()
    head = next(x for x in table if x.startswith("| cell |"))
    assert head.endswith("| grad evals | collapse |")
    by = {x.split(" | ")[0]: x for x in table if x.startswith("| ")}
    assert by["| pgd"].endswith(" | - |")
    assert by["| fgsm"].endswith(" | 2/3 (epochs 2,3; 3), 1 rolled back |")
    stop = specs[("fgsm", 2)].result_dir / "summary.json"
    stop.write_text(json.dumps({"collapse_guard": {"stopped": True, "rolled_back_to": None}}))
    rows = [json.loads(x) for x in (stop.parent / "metrics.jsonl").read_text().splitlines()]
    rows[-1].pop("rolled_back")
    (stop.parent / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        format_table(collect_cells(study, results), None)
        .splitlines()[-1]
        .endswith(" | 2/3 (epochs 2,3; 3), 1 stopped |")
    )


def test_pipeline_cells_count_the_whole_chain(tmp_path: Path, capsys) -> None:
    """A pipeline cell's per-epoch compute and clocks start from the chain's earlier cost (the
    source run's whole run and earlier stages), so to-target and compute columns compare whole
    chains with the from-scratch runs."""
    data = {
        "study": "prune",
        "base": {"epochs": 4},
        "grid": {
            "method": [
                {"name": "dense", "sparse_method": "dense", "epochs": 2},
                {"name": "rigl", "sparse_method": "rigl"},
                {
                    "name": "lwm",
                    "sparse_method": "static",
                    "epochs": 2,
                    "pipeline": {"method": "lwm", "source_cell": "dense"},
                },
            ]
        },
        "baseline": {"axis": "method", "value": "rigl"},
    }
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    dense, rigl, lwm = expand(study, runs_root=tmp_path / "runs", results_root=results)
    _store(
        dense.result_dir, {}, [_row(1, 0.3, 10, 100), _row(2, 0.4, 20, 200)], {"grad_evals": 200}
    )
    accs = (0.2, 0.3, 0.4, 0.5)
    rigl_rows = [_row(e, a, 10 * e, 100 * e) for e, a in enumerate(accs, 1)]
    _store(rigl.result_dir, {}, rigl_rows, {"grad_evals": 400})
    before = {"grad_evals_total": 200, "cpu_time_s_total": 20.0, "train_time_s_total": 20.0}
    _store(
        lwm.result_dir,
        {},
        [_row(1, 0.45, 10, 100), _row(2, 0.55, 20, 200)],
        {"grad_evals": 200, "source": before},
        pipeline={"grad_evals_total": 400, "grad_evals": 200},
    )
    cells = collect_cells(study, results)
    chain = cells[2].runs[0]
    assert [r["grad_evals"] for r in chain.metrics] == [300, 400]
    assert [r["cpu_time_s"] for r in chain.metrics] == [30.0, 40.0]
    assert [r["wall_time_s"] for r in chain.metrics] == [10, 20]  # the last stage only
    rows = {r["cell"]: r for r in to_target_rows(cells, study.baseline, "cpu_time_s")}
    # target 0.5 (RigL's final): the chain reaches it after 400 evaluations, 40 s
    assert rows["lwm"]["grad_evals_to_target"] == [400.0]
    assert rows["lwm"]["time_to_target_s"] == [40.0]
    comp = {r["cell"]: r for r in compute_rows(cells, study.baseline)}
    assert (comp["lwm"]["grad_evals"], comp["lwm"]["ratio"], comp["lwm"]["pipeline"]) == (
        400.0,
        1.0,
        True,
    )
    assert (comp["dense"]["ratio"], comp["rigl"]["pipeline"]) == (0.5, False)
    assert main([str(path), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| lwm | 1 | yes | 400 | 1.00 |" in out and "| dense | 1 | no | 200 | 0.50 |" in out


def test_speed_table_against_hand_computed_values(tmp_path: Path, capsys) -> None:
    """Fabricated speed.json records: img/s, its ratio to the dense cell and to the full width
    in the same process, FLOPs ratio; training time and its ratio to the dense cell."""
    data = {
        "study": "st",
        "base": {"epochs": 2},
        "grid": {
            "sparse": [
                {"name": "dense", "sparse_method": "dense"},
                {"name": "f50", "sparse_method": "static", "sparse_structure": "filter"},
                {"name": "u90", "sparse_method": "static"},
            ]
        },
        "seeds": [0, 1],
        "eval": {"n_examples": 10, "eps": 0.1},
        "extra_evals": [{"name": "autoattack", "seeds": [1], "n_examples": 5}],
        "speed": {"cells": ["dense", "f*"]},
        "baseline": {"axis": "sparse", "value": "dense"},
    }
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    results = tmp_path / "results"
    study = load_study(path, runs_root=tmp_path / "runs", results_root=results)
    # cell -> (cpu time per seed, (exported img/s, full-width img/s) per seed, flops ratio)
    cost = {
        "dense": ([100.0, 120.0], [(1000.0, 1000.0), (1100.0, 1000.0)], 1.0),
        "f50": ([40.0, 50.0], [(3000.0, 1000.0), (3300.0, 1100.0)], 0.25),
        "u90": ([105.0, 115.0], None, None),
    }
    for spec in expand(study, runs_root=tmp_path / "runs", results_root=results):
        times, speeds, fr = cost[spec.cell]
        t = times[spec.seed]
        files: dict = {"eval": {"clean_acc": 0.8, "robust_acc": 0.5 + 0.1 * spec.seed}}
        if spec.seed == 1:
            files["eval_autoattack"] = {"clean_acc": 0.8, "robust_acc": 0.4}
        if speeds is not None:
            e, d = speeds[spec.seed]
            files["speed"] = {
                "settings": {"threads": 1},
                "dense": {"images_per_s": d},
                "exported": {"images_per_s": e},
                "speedup": e / d,
                "flops_ratio": fr,
                "params_ratio": fr / 2,
            }
        _store(
            spec.result_dir,
            spec.config().to_dict(),
            [_row(1, 0.4, t / 2, 10), _row(2, 0.5, t, 20)],
            {},
            **files,
        )
    cells = collect_cells(study, results)
    rows = {r["cell"]: r for r in speed_rows(cells, study.baseline, "cpu_time_s", ["autoattack"])}
    f50, u90, dense = rows["f50"], rows["u90"], rows["dense"]
    assert f50["train_time"] == [40.0, 50.0]
    assert f50["time_ratio"] == pytest.approx(45.0 / 110.0)
    assert f50["images_per_s"] == [3000.0, 3300.0]
    assert f50["vs_baseline"] == pytest.approx(3150.0 / 1050.0)  # over the dense cell's img/s
    assert f50["speedup"] == pytest.approx([3.0, 3.0])  # over the full width, same process
    assert f50["flops_ratio"] == [0.25, 0.25] and f50["threads"] == [1]
    assert f50["extra"]["autoattack"] == [None, 0.4]
    assert dense["speedup"] == pytest.approx([1.0, 1.1]) and dense["vs_baseline"] == 1.0
    assert u90["images_per_s"] == [None, None] and u90["vs_baseline"] is None
    assert u90["time_ratio"] == pytest.approx(1.0)
    assert main([str(path), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "img/s × the sparse=dense cell" in out and "FLOPs ratio" in out
    line = next(x for x in out.splitlines() if x.startswith("| f50 | 2 | 80.00"))
    assert "| 45 ± 7 | 0.41 | 3150 ± 212 | 3.00 | 3.00 ± 0.00 | 0.250 ± 0.000 |" in line
    assert "| u90 | 2 |" in out and "| - | - | - | - | - |" in next(
        x for x in out.splitlines() if x.startswith("| u90 | 2 | 80")
    )
