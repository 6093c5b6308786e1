"""robust_agc.report: grouping over seeds, mean ± std, markdown and plots from fake run folders."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pytest
import yaml

from robust_agc import reporting as rp
from robust_agc.cli.report import add_report_arguments, run_report
from robust_agc.errors import UserError


def _write_run(
    root: Path, name: str, cfg: dict, accs: list[float], *, seed: int, dens=None
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": seed, "out_dir": str(d)}))
    lines = []
    for e, a in enumerate(accs, 1):
        row = {
            "epoch": e,
            "train_loss": 1.0 / e,
            "test_clean_acc": a,
            "test_robust_acc": a / 2,
            "val_robust_acc": a / 2 - 0.01,
            "wall_time_s": 10.0 * e + seed,
            "grad_evals": 100 * e,
            "agc_coef": 0.01 * e,
        }
        if dens is not None:
            row["density"] = dens
            row["grad_var"] = [
                {"step": 10 * e, "var_plain": 2.0, "var_corrected": 1.0 + seed, "ratio": 0.5}
            ]
        lines.append(json.dumps(row))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "summary.json").write_text(json.dumps({"final_test_clean_acc": accs[-1]}))
    return d


@pytest.fixture
def runs(tmp_path):
    base = {"model": "small-cnn", "optimizer": "agc", "sparsity": 0.9, "train": {"lr": 0.05}}
    other = {**base, "optimizer": "sgd"}
    dens = {"conv1.weight": 1.0, "fc.weight": 0.05}
    _write_run(tmp_path, "agc_s0", base, [0.5, 0.6, 0.70], seed=0, dens=dens)
    _write_run(tmp_path, "agc_s1", base, [0.5, 0.6, 0.74], seed=1, dens=dens)
    _write_run(tmp_path, "sgd_s0", other, [0.4, 0.5, 0.60], seed=0)
    return tmp_path


def test_probe_curve_mean_and_std_over_seeds(runs):
    groups = rp.group_runs(rp.collect([runs])[0])
    (agc,) = [g for g in groups.values() if g[0].config["optimizer"] == "agc"]
    xs, ms, ss = rp.probe_curve(agc, "var_corrected")
    assert xs == [10.0, 20.0, 30.0]
    assert ms == [1.5, 1.5, 1.5] and ss == pytest.approx([statistics.stdev([1.0, 2.0])] * 3)


def test_grouping_ignores_seed_only(runs):
    found, evals = rp.collect([runs])
    assert len(found) == 3 and evals == []
    groups = rp.group_runs(found)
    sizes = sorted(len(g) for g in groups.values())
    assert sizes == [1, 2]
    # the nested key and the optimizer distinguish groups; seed and out_dir do not
    for g in groups.values():
        assert len({r.config["optimizer"] for r in g}) == 1
        assert all("train.lr" in r.config for r in g)


def test_table_mean_std_over_seeds(runs):
    groups = rp.group_runs(rp.collect([runs])[0])
    table = rp.run_table(groups)
    m = statistics.fmean([70.0, 74.0])
    s = statistics.stdev([70.0, 74.0])
    assert f"{m:.2f} ± {s:.2f}" in table  # test clean acc of the AGC group, in percent
    assert f"{m / 2:.2f} ± {s / 2:.2f}" in table  # robust
    assert "| optimizer=agc | 2 |" in table and "| optimizer=sgd | 1 |" in table
    assert "60.00" in table  # the single-seed group, no ± part
    assert table.count("\n") == 4  # header, separator, two rows


def test_build_report_writes_markdown_and_plots(runs, tmp_path):
    ev = {
        "clean_acc": 0.8,
        "robust_acc": 0.4,
        "autoattack_acc": 0.4,
        "dataset": "fashion-mnist",
        "eps": 0.1,
        "threat_model": "Linf",
        "n_examples": 100,
        "architecture": "small-cnn",
        "flags": {"zero_gradients": True, "probability_output": False},
        "attack_config": {"units": ["clean", "autoattack/apgd-ce"]},
        "model_info": {"config": {"model": "small-cnn", "seed": 0}},
    }
    ev1 = {**ev, "clean_acc": 0.82, "model_info": {"config": {"model": "small-cnn", "seed": 1}}}
    (tmp_path / "e0.json").write_text(json.dumps(ev))
    (tmp_path / "e1.json").write_text(json.dumps(ev1))
    (runs / "agc_s0" / "eval_aa.json").write_text(json.dumps(ev))
    out = tmp_path / "report"
    args = argparse.Namespace(
        paths=[str(runs), str(tmp_path / "e0.json"), str(tmp_path / "e1.json")]
    )
    args.out = str(out)
    assert run_report(args) == 0
    md = (out / "report.md").read_text()
    assert "## Training runs" in md and "## Evaluations" in md
    assert "81.00 ± 1.41" in md  # two eval seeds grouped: clean 80 and 82
    assert "zero_gradients" in md
    assert "40.00" in md  # the eval attached to a run
    for name in ("accuracy_vs_epoch", "accuracy_vs_time", "agc_coef", "grad_variance", "density"):
        png = out / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name}.png)" in md


def test_parser_and_user_errors(tmp_path):
    p = argparse.ArgumentParser()
    add_report_arguments(p)
    args = p.parse_args([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no such file"):
        run_report(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run folder"):
        rp.build_report([tmp_path / "empty"], tmp_path / "o")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not an evaluation result"):
        rp.build_report([tmp_path / "bad.json"], tmp_path / "o")
    bad = tmp_path / "badrun"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="invalid JSON"):
        rp.build_report([bad], tmp_path / "o")


def test_time_plot_uses_training_cpu_time_when_every_run_has_it(tmp_path):
    base = {"model": "small-cnn", "optimizer": "sgd"}
    for seed in (0, 1):
        d = _write_run(tmp_path / "runs", f"s{seed}", base, [0.5, 0.6], seed=seed)
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            r["cpu_time_s"] = r.pop("wall_time_s") / 2  # no wall-clock field left
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = rp.group_runs(rp.collect([tmp_path / "runs"])[0])
    written = {p.name for p in rp.make_plots(groups, tmp_path / "out")}
    assert "accuracy_vs_time.png" in written  # drawn from cpu_time_s


def _grid(root: Path) -> Path:
    """run_study's layout: <cell>/s<seed>, two sparsities x two optimizers."""
    for sp in (0.9, 0.99):
        for opt in ("sgd", "agc"):
            cfg = {"model": "small-cnn", "optimizer": opt, "sparsity": sp}
            for seed in (0, 1):
                _write_run(
                    root / f"r{round(sp * 100)}_{opt}", f"s{seed}", cfg, [0.5, 0.6], seed=seed
                )
    return root


def test_labels_are_study_cells_in_run_study_layout(tmp_path, runs):
    groups = rp.group_runs(rp.collect([_grid(tmp_path / "study")])[0])
    assert sorted(rp.group_labels(groups).values()) == ["r90_agc", "r90_sgd", "r99_agc", "r99_sgd"]
    # other layouts: the differing config keys
    flat = rp.group_runs(rp.collect([runs])[0])
    assert sorted(rp.group_labels(flat).values()) == ["optimizer=agc", "optimizer=sgd"]


def test_pipeline_cells_group_by_cell_and_start_at_their_sources_cost(tmp_path):
    """A pruning stage's config names its source checkpoint (a path per seed): in run_study's
    layout it still forms one group per cell, and its time axis starts at the source chain's
    total (``summary.json``'s ``source``), so equal compute lines up."""
    root = tmp_path / "pruning"
    for seed in (0, 1):
        cfg = {"model": "small-cnn", "init_from": f"runs/dense/s{seed}/best.pt", "prune": "lwm"}
        d = _write_run(root / "lwm_90", f"s{seed}", cfg, [0.5, 0.6], seed=seed)
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            r["cpu_time_s"] = 10.0 * r["epoch"]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        src = {"path": cfg["init_from"], "cpu_time_s_total": 100.0 + seed, "grad_evals_total": 7}
        (d / "summary.json").write_text(json.dumps({"source": src}))
    _write_run(
        root / "rigl90", "s0", {"model": "small-cnn", "sparse_method": "rigl"}, [0.4], seed=0
    )
    groups = rp.group_runs(rp.collect([root])[0])
    assert sorted(rp.group_labels(groups).values()) == ["lwm_90", "rigl90"]
    lwm = next(rs for k, rs in groups.items() if json.loads(k)["cell"] == "pruning/lwm_90")
    xs, ms, _ = rp.mean_curve(lwm, "test_clean_acc", "cpu_time_s")
    assert xs == [110.5, 120.5] and ms == pytest.approx([0.5, 0.6])
    assert rp.mean_curve(lwm, "test_clean_acc", "grad_evals")[0] == [107.0, 207.0]
    assert rp.mean_curve(lwm, "test_clean_acc")[0] == [1.0, 2.0]  # epochs: no offset


def test_facets_split_plots_into_rows(tmp_path):
    import matplotlib.pyplot as plt

    groups = rp.group_runs(rp.collect([_grid(tmp_path / "study")])[0])
    facets = rp.facet_groups(groups, ["sparsity"])
    assert [t for t, _ in facets] == ["sparsity=0.9", "sparsity=0.99"]
    assert [sorted(rp.group_labels(g)[k] for k in g) for _, g in facets] == [
        ["r90_agc", "r90_sgd"],
        ["r99_agc", "r99_sgd"],
    ]
    assert rp.facet_groups(groups, []) == [("", groups)]
    with pytest.raises(UserError, match="no config key 'sparse_method'"):
        rp.facet_groups(groups, ["sparse_method"])
    plain = rp.make_plots(groups, tmp_path / "plain")
    split = rp.make_plots(groups, tmp_path / "split", facet=["sparsity"])
    assert [p.name for p in plain] == [p.name for p in split]
    for name in ("accuracy_vs_epoch.png", "agc_coef.png"):  # one row of panels per facet
        h_plain = plt.imread(tmp_path / "plain" / name).shape[0]
        assert plt.imread(tmp_path / "split" / name).shape[0] == 2 * h_plain
    args = argparse.Namespace(
        paths=[str(tmp_path / "study")], out=str(tmp_path / "cli"), facet="sparsity"
    )
    assert run_report(args) == 0
    assert plt.imread(tmp_path / "cli" / "accuracy_vs_epoch.png").shape[0] == 2 * h_plain


def test_old_import_path_reexports_the_public_names():
    from robust_agc import report

    for name in report.__all__:
        assert getattr(report, name) is not None, name
    assert report.mean_std is rp.mean_std and report.Run is rp.Run
    assert report.run_report.__module__ == "robust_agc.cli.report"


def test_eval_robust_acc_is_the_worst_case_over_every_stage():
    # a square stage after AutoAttack broke one more point: robust_acc, not autoattack_acc
    assert rp.eval_robust_acc({"autoattack_acc": 0.5, "robust_acc": 0.4}) == 0.4
    assert rp.eval_robust_acc({"autoattack_acc": 0.5}) == 0.5  # another tool's record
    assert rp.eval_robust_acc({"robust_acc": True}) is None
    assert rp.eval_robust_acc({}) is None


def test_grouping_ignores_execution_keys_but_not_settings():
    from robust_agc.config import EXECUTION_KEYS

    base = {"lr": 0.1, "seed": 0}
    key = rp.config_group_key(base)
    for k in EXECUTION_KEYS:
        assert rp.config_group_key({**base, k: "x", "seed": 3}) == key, k
    assert rp.config_group_key({**base, "lr": 0.2}) != key
    assert rp.config_group_key({**base, "nested.out": "y"}) == key  # dotted keys: last part


def test_mean_std_and_as_percent():
    assert rp.as_percent(0.5) == 50.0 and rp.as_percent(42.0) == 42.0
    assert rp.mean_std([0.5, None, 0.7], pct=True) == "60.00 ± 14.14"
    assert rp.mean_std([3.0], digits=1) == "3.0" and rp.mean_std([None]) == "-"


def _curve_record(path: Path, cfg: dict, curve: list, *, aa: float | None, seed: int) -> Path:
    """An evaluation record with an ``fmn`` block (and AutoAttack's stage when ``aa``)."""
    stages = [{"name": "clean", "robust_acc": curve[0][1]}]
    if aa is not None:
        stages.append({"name": "autoattack", "robust_acc": aa})
    stages.append({"name": "fmn", "robust_acc": min(a for _, a in curve)})
    d = {
        "clean_acc": curve[0][1],
        "robust_acc": 0.3,
        "dataset": "fashion-mnist",
        "threat_model": "Linf",
        "eps": 0.1,
        "n_examples": 10,
        "architecture": "small-cnn",
        "stages": stages,
        "attack_config": {"units": [s["name"] for s in stages]},
        "model_info": {"config": {**cfg, "seed": seed}},
        "fmn": {"radii": [], "security_curve": [list(p) for p in curve]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))
    return path


def test_security_curves_one_line_per_model_mean_over_seeds(tmp_path, runs):
    rigl = {"model": "small-cnn", "sparse_method": "rigl", "sparsity": 0.9}
    setm = {**rigl, "sparse_method": "set"}
    c0 = [(0.0, 0.8), (0.1, 0.5), (0.2, 0.1)]
    c1 = [(0.0, 0.9), (0.1, 0.6), (0.2, 0.3)]
    c2 = [(0.0, 0.7), (0.1, 0.2), (0.2, 0.0)]
    p0 = _curve_record(tmp_path / "e" / "r0.json", rigl, c0, aa=0.55, seed=0)
    p1 = _curve_record(tmp_path / "e" / "r1.json", rigl, c1, aa=0.65, seed=1)
    p2 = _curve_record(tmp_path / "e" / "s0.json", setm, c2, aa=None, seed=0)
    # a record without an fmn block draws nothing, one attached to a run folder is drawn
    (tmp_path / "e" / "plain.json").write_text(json.dumps({"clean_acc": 0.5, "robust_acc": 0.1}))
    attached = _curve_record(
        runs / "agc_s0" / "eval_fmn.json", {**rigl, "sparsity": 0.5}, c0, aa=0.4, seed=0
    )
    evals = [rp.load_eval_result(p) for p in (p0, p1, p2)]
    curves = rp.security_curves(evals)
    assert [c.label for c in curves] == ["sparse_method=rigl", "sparse_method=set"]
    rc, sc = curves
    assert rc.eps_grid == (0.0, 0.1, 0.2) and rc.paths == (str(p0), str(p1))
    assert rc.robust_acc == pytest.approx([0.85, 0.55, 0.2])
    assert rc.std == pytest.approx([statistics.stdev([a, b]) for (_, a), (_, b) in zip(c0, c1)])
    assert rc.eps == 0.1 and rc.eps_attack == "autoattack"
    assert rc.eps_attack_acc == pytest.approx(0.6)
    assert sc.robust_acc == tuple(a for _, a in c2) and sc.std == (0.0, 0.0, 0.0)
    assert sc.eps_attack is None and sc.eps_attack_acc is None
    # a different grid is another curve, even for the same model
    other = _curve_record(tmp_path / "g.json", setm, [(0.0, 0.7), (0.3, 0.0)], aa=None, seed=1)
    assert len(rp.security_curves([*evals, rp.load_eval_result(other)])) == 3
    other.unlink()

    out = tmp_path / "report"
    md = rp.build_report([runs, *(tmp_path / "e").iterdir()], out).read_text()
    png = out / "security_curve.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Security curves" in md and "(security_curve.png)" in md
    table = md[md.index("## Security curves") :]
    assert (
        "| sparse_method=rigl, sparsity=0.9 | fashion-mnist | Linf | 2 | 0.1 | 55.00 | 60.00 (autoattack) |"
        in table
    )
    assert (
        "| sparse_method=set, sparsity=0.9 | fashion-mnist | Linf | 1 | 0.1 | 20.00 | - |" in table
    )
    assert (
        "| sparse_method=rigl, sparsity=0.5 | fashion-mnist | Linf | 1 | 0.1 | 50.00 | 40.00 (autoattack) |"
        in table
    )  # the run's
    everything = [rp.load_eval_result(p) for p in (p0, p1, p2, attached)]
    assert len(rp.security_curves(everything)) == 3  # the run's record is its own model
    assert rp.security_curve_plot(evals[:0], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_security_curve_labels_are_study_cells_and_never_run_locations(tmp_path):
    base = {"model": "small-cnn", "sparse_method": "rigl", "sparsity": 0.9}
    c = [(0.0, 0.8), (0.1, 0.5)]

    def rec(study, cell, opt):
        method = "dense" if cell == "dense" else "rigl"
        cfg = {**base, "sparse_method": method, "optimizer": opt, "out": f"runs/{study}/{cell}"}
        return _curve_record(tmp_path / study / cell / "s0" / "eval.json", cfg, c, aa=None, seed=0)

    one = [rec("sc", "rigl90", "sgd"), rec("sc", "dense", "sgd")]
    two = [*one, rec("sc_agc", "rigl90", "agc")]
    labels = [c.label for c in rp.security_curves([rp.load_eval_result(p) for p in one])]
    assert labels == ["rigl90", "dense"]  # run_study's layout: the cell names
    labels = [c.label for c in rp.security_curves([rp.load_eval_result(p) for p in two])]
    assert labels == ["sc/rigl90", "sc/dense", "sc_agc/rigl90"]  # cells shared by two studies
    # outside that layout: the settings that differ, never where the runs were written
    flat = [tmp_path / "flat" / f"{o}.json" for o in ("sgd", "agc")]
    for p, src in zip(flat, two[1:]):
        p.parent.mkdir(exist_ok=True)
        p.write_text(src.read_text())
    labels = [c.label for c in rp.security_curves([rp.load_eval_result(p) for p in flat])]
    assert labels == ["optimizer=sgd, sparse_method=dense", "optimizer=agc, sparse_method=rigl"]


def test_security_table_counts_the_points_each_attack_alone_broke(tmp_path):
    cfg = {"model": "small-cnn", "sparse_method": "rigl", "sparsity": 0.9}
    c = [(0.0, 0.8), (0.1, 0.5)]
    paths = []
    for seed, (fmn_only, att_only) in enumerate([(3, 1), (6, 0)]):
        p = _curve_record(tmp_path / f"r{seed}.json", cfg, c, aa=0.6, seed=seed)
        d = json.loads(p.read_text())
        d["fmn"]["n_disagree"] = {"fmn_only": fmn_only, "eps_attack_only": att_only}
        p.write_text(json.dumps(d))
        paths.append(p)
    (curve,) = rp.security_curves([rp.load_eval_result(p) for p in paths])
    assert curve.disagree == {"fmn_only": 4.5, "eps_attack_only": 0.5}
    assert "| 60.00 (autoattack) | 4.5 / 0.5 | 0 to 0.1 (2 radii) |" in rp.security_table([curve])
    # a record without the counts: no column value rather than a mean over some records
    no_counts = _curve_record(tmp_path / "r9.json", cfg, c, aa=0.6, seed=9)
    (curve,) = rp.security_curves([rp.load_eval_result(p) for p in [*paths, no_counts]])
    assert curve.disagree is None and "| 60.00 (autoattack) | - |" in rp.security_table([curve])


def test_report_without_fmn_records_draws_no_security_curve(runs, tmp_path):
    md = rp.build_report([runs], tmp_path / "o").read_text()
    assert "Security curves" not in md and not (tmp_path / "o" / "security_curve.png").exists()
