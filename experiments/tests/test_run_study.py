"""Tests of experiments/run_study.py: study parsing, expansion, status, resume, result copies."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from run_study import (
    EVAL_FILE,
    RESULT_FILES,
    differing_keys,
    eval_argv,
    execute,
    expand,
    load_study,
    main,
    reusable_source,
    run_status,
    same_cpu_kind,
    source_spec,
)

import robust_agc.train as train_mod
from robust_agc.config import TrainConfig
from robust_agc.errors import UserError
from robust_agc.train import TIMING_FIELDS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TIMING = set(TIMING_FIELDS)

TINY_BASE = {
    "train_subset": 64,
    "val_size": 32,
    "batch_size": 32,
    "epochs": 2,
    "attack_steps": 1,
    "eval_subset": 16,
    "eval_steps": 1,
    "sparse_method": "rigl",
    "sparsity": 0.9,
    "update_interval": 1,
    "lr": 0.05,
}


_PIPE = {"method": "lwm", "source_cell": "dense"}


def _write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _load(tmp_path: Path, data: dict):
    return load_study(
        _write(tmp_path, data), runs_root=tmp_path / "runs", results_root=tmp_path / "results"
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ({"bogus": 1}, r"unknown key"),
        ({"base": {"not_a_setting": 1}}, r"unknown setting 'not_a_setting'"),
        ({"base": {"seed": 3}}, r"chosen by the driver"),
        ({"base": {"out": "x"}}, r"chosen by the driver"),
        ({"grid": [1, 2]}, r"Invalid grid value"),
        ({"grid": {"lr": []}}, r"Invalid grid value: axis 'lr'"),
        ({"grid": {"opt": [{"optimizer": "agc"}]}}, r"has no name"),
        ({"grid": {"opt": [{"name": "a/b", "optimizer": "agc"}]}}, r"not a folder name"),
        ({"grid": {"opt": [{"name": "a"}, {"name": "a"}]}}, r"duplicate labels"),
        ({"grid": {"opt": [{"name": "a", "bogus": 1}]}}, r"unknown setting 'bogus'"),
        ({"seeds": []}, r"Invalid seeds value"),
        ({"seeds": [0, 0]}, r"Invalid seeds value"),
        ({"seeds": ["0"]}, r"Invalid seeds value"),
        ({"eval": {"n_exemples": 3}}, r"Invalid eval value"),
        ({"grid": {"lr": [0.1]}, "baseline": {"axis": "opt", "value": "x"}}, r"Invalid baseline"),
        ({"grid": {"lr": [0.1]}, "baseline": {"axis": "lr", "value": 0.5}}, r"Invalid baseline"),
        (
            {"grid": {"lr": [0.1]}, "baseline": {"axis": "lr", "value": 0.1, "metric": "loss"}},
            r"Invalid baseline",
        ),
        ({"grid": {"lr": [0.1, -1.0]}}, r"Invalid lr value: -1.0"),
        ({"base": {"optimizer": "lion"}}, r"Invalid optimizer value"),
        ({"grid": {"lr": [0.1]}, "exclude": {"lr": 0.1}}, r"Invalid exclude value"),
        ({"grid": {"lr": [0.1]}, "exclude": [{"lr": "lr0.2"}]}, r"Invalid exclude value"),
        ({"grid": {"lr": [0.1]}, "exclude": [{"opt": "lr0.1"}]}, r"Invalid exclude value"),
        ({"extra_evals": [{"name": "aa"}]}, r"needs an eval"),
        ({"eval": {}, "extra_evals": [{"n_examples": 5}]}, r"Invalid extra_evals value"),
        ({"eval": {}, "extra_evals": [{"name": "a/b"}]}, r"Invalid extra_evals value: name"),
        ({"eval": {}, "extra_evals": [{"name": "a"}, {"name": "a"}]}, r"name 'a'"),
        ({"eval": {}, "extra_evals": [{"name": "a", "seeds": 0}]}, r"seeds 0"),
        ({"eval": {}, "extra_evals": [{"name": "a", "bogus": 1}]}, r"Invalid extra_evals"),
        ({"reuse": "other"}, r"Invalid reuse value"),
        ({"eval": {}, "extra_evals": [{"name": "a", "cells": "r*"}]}, r"cells 'r\*'"),
        ({"grid": {"m": [{"name": "p", "pipeline": {"method": "lwm"}}]}}, r"source_cell required"),
        ({"grid": {"m": [{"name": "p", "pipeline": {**_PIPE, "method": "snip"}}]}}, r"'snip'"),
        ({"grid": {"m": [{"name": "p", "pipeline": {**_PIPE, "rounds": 0}}]}}, r"rounds 0"),
        ({"grid": {"m": [{"name": "p", "pipeline": {**_PIPE, "bogus": 1}}]}}, r"keys: method"),
        ({"grid": {"m": [{"name": "p", "pipeline": _PIPE}]}}, r"'dense' of 'p' is not a cell"),
        (
            {
                "grid": {
                    "m": [
                        {"name": "dense", "pipeline": {**_PIPE, "source_cell": "p"}},
                        {"name": "p", "pipeline": _PIPE},
                    ]
                }
            },
            r"is itself a pipeline cell",
        ),
        (
            {
                "grid": {
                    "m": [{"name": "dense"}, {"name": "p", "init_from": "x", "pipeline": _PIPE}]
                }
            },
            r"sets 'init_from', which the pipeline sets",
        ),
        (
            {
                "grid": {
                    "m": [
                        {"name": "dense"},
                        {"name": "p", "pipeline": {**_PIPE, "rewind_epoch": 1}},
                    ]
                }
            },
            r"needs save_epochs \[1\] in its source cell 'dense'",
        ),
        (
            {
                "grid": {
                    "a": [{"name": "dense"}, {"name": "p", "pipeline": _PIPE}],
                    "b": [{"name": "q", "pipeline": {**_PIPE, "source_cell": "dense_q"}}],
                }
            },
            r"two axes give cell",
        ),
    ],
)
def test_load_study_rejects(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _load(tmp_path, data)


def test_missing_file_and_cli_exit_status(tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match="study file not found"):
        load_study(tmp_path / "none.yaml")
    assert main([str(tmp_path / "none.yaml"), "--dry-run"]) == 2
    assert "study file not found" in capsys.readouterr().err


def test_expand_is_the_product_with_overrides(tmp_path: Path) -> None:
    study = _load(
        tmp_path,
        {
            "base": {"lr": 0.05, "optimizer": "sgd", "epochs": 3},
            "grid": {
                "sparse": [
                    {"name": "r90", "sparse_method": "rigl", "sparsity": 0.9},
                    {"name": "s99", "sparse_method": "static", "sparsity": 0.99},
                ],
                "lr": [0.01, 0.1],
                "opt": [{"name": "sgd"}, {"name": "agc", "optimizer": "agc"}],
            },
            "seeds": [0, 5],
            "baseline": {"axis": "opt", "value": "sgd"},
        },
    )
    assert study.baseline == {"axis": "opt", "value": "sgd", "metric": "val_robust_acc"}
    specs = expand(study, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    assert len(specs) == 2 * 2 * 2 * 2
    assert len({(s.cell, s.seed) for s in specs}) == len(specs)
    assert [s.seed for s in specs] == [0] * 8 + [5] * 8  # seed-major
    by = {(s.cell, s.seed): s for s in specs}
    s = by[("s99_lr0.1_agc", 5)]
    assert s.labels == {"sparse": "s99", "lr": "lr0.1", "opt": "agc"}
    assert s.settings == {
        "lr": 0.1,
        "optimizer": "agc",
        "epochs": 3,
        "sparse_method": "static",
        "sparsity": 0.99,
        "seed": 5,
    }
    assert by[("r90_lr0.01_sgd", 0)].settings["optimizer"] == "sgd"
    assert s.run_dir == tmp_path / "runs" / "study" / "s99_lr0.1_agc" / "s5"
    assert s.result_dir == tmp_path / "results" / "study" / "s99_lr0.1_agc" / "s5"
    cfg = s.config(threads=1)
    assert (cfg.out, cfg.threads, cfg.seed, cfg.lr) == (str(s.run_dir), 1, 5, 0.1)


def test_exclude_drops_matching_cells(tmp_path: Path) -> None:
    study = _load(
        tmp_path,
        {
            "grid": {
                "sparse": [{"name": "rigl90"}, {"name": "bsr90"}, {"name": "bsr99"}],
                "opt": [{"name": "sgd"}, {"name": "agc"}, {"name": "svrg"}],
            },
            "exclude": [{"sparse": ["bsr90", "bsr99"], "opt": "svrg"}],
        },
    )
    cells = [s.cell for s in expand(study)]
    assert cells == [
        "rigl90_sgd",
        "rigl90_agc",
        "rigl90_svrg",
        "bsr90_sgd",
        "bsr90_agc",
        "bsr99_sgd",
        "bsr99_agc",
    ]


def test_extra_evals_status_and_arguments(tmp_path: Path) -> None:
    study = _load(
        tmp_path,
        {
            "base": {"epochs": 1},
            "seeds": [0, 1],
            "eval": {"n_examples": 10, "eps": 0.1},
            "extra_evals": [
                {"name": "autoattack", "seeds": [0], "attacks": "clean,autoattack", "n_examples": 7}
            ],
        },
    )
    s0, s1 = expand(study, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    (extra,) = study.extra_evals_for(0)
    assert study.extra_evals_for(1) == []
    # an extra evaluation inherits the final evaluation's options and overrides some
    assert (extra["n_examples"], extra["eps"], extra["pgd_steps"]) == (7, 0.1, 50)
    argv = eval_argv(s0, extra, "eval_autoattack.json", "state_final_autoattack.json")
    assert argv[argv.index("--attacks") + 1] == "clean,autoattack"
    assert argv[argv.index("--version") + 1] == "standard"
    assert argv[argv.index("--out") + 1].endswith("eval_autoattack.json")
    assert "--version" not in eval_argv(s0, study.eval)  # no AutoAttack stage, no version
    assert "--fmn-steps" not in argv
    fmn = {**extra, "attacks": "clean,fmn", "fmn_steps": 300, "eps_grid": [0, 0.05, 0.1]}
    fmn_argv = eval_argv(s0, fmn, "eval_fmn.json", "state_final_fmn.json")
    assert fmn_argv[fmn_argv.index("--fmn-steps") + 1] == "300"
    assert fmn_argv[fmn_argv.index("--eps-grid") + 1] == "0,0.05,0.1"
    assert "--eps-grid" not in eval_argv(s0, {**fmn, "eps_grid": None})
    for spec in (s0, s1):
        cfg = spec.config().to_dict()
        _fake_run(spec.result_dir, cfg, 1, summary=True, ckpt=False)
        (spec.result_dir / EVAL_FILE).write_text("{}")
    assert run_status(s1, study) == "done"
    assert run_status(s0, study) == "rebuild"  # its extra evaluation needs the checkpoint
    assert run_status(s0, study, extra=False) == "done"  # --no-extra leaves it for later
    (s0.result_dir / "eval_autoattack.json").write_text("{}")
    assert run_status(s0, study) == "done"


def test_reuse_copies_identical_runs_only(tmp_path: Path, monkeypatch) -> None:
    import run_study

    configs = tmp_path / "configs"
    configs.mkdir()
    monkeypatch.setattr(run_study, "CONFIGS_ROOT", configs)
    roots = {"runs_root": tmp_path / "runs", "results_root": tmp_path / "results"}
    ev = {"n_examples": 10, "eps": 0.1}
    main_data = {
        "study": "main",
        "base": {"epochs": 1, "lr": 0.05},
        "grid": {"opt": [{"name": "sgd", "optimizer": "sgd"}, {"name": "agc", "optimizer": "agc"}]},
        "eval": ev,
    }
    _write(configs, main_data, "main.yaml")
    main_study = load_study(configs / "main.yaml", **roots)
    for spec in expand(main_study, **roots):
        _fake_run(spec.result_dir, spec.config().to_dict(), 1, summary=True, ckpt=False)
        (spec.result_dir / EVAL_FILE).write_text(json.dumps({"n_examples": 10}))
    abl = {
        "study": "abl",
        "base": {"epochs": 1, "lr": 0.05, "optimizer": "agc"},
        "grid": {
            "v": [
                {"name": "sgd", "optimizer": "sgd"},
                {"name": "agc"},
                {"name": "g1", "agc_gamma": 1.0},
            ]
        },
        "eval": ev,
        "reuse": ["main"],
    }
    study = load_study(_write(tmp_path, abl), **roots)
    sgd, agc, g1 = expand(study, **roots)
    assert [run_status(s, study) for s in (sgd, agc, g1)] == ["reuse", "reuse", "new"]
    monkeypatch.setattr(
        "robust_agc.train.train", lambda cfg: pytest.fail("retrained a reusable run")
    )
    assert execute(agc, study) == "reuse"
    assert run_status(agc, study) == "done"
    assert (agc.result_dir / "config.yaml").read_text() == (
        tmp_path / "results" / "main" / "agc" / "s0" / "config.yaml"
    ).read_text()
    # a different final evaluation (stored or in the study file) is not reused
    (tmp_path / "results" / "main" / "sgd" / "s0" / EVAL_FILE).write_text('{"n_examples": 5}')
    assert run_status(sgd, study) == "new"
    _write(configs, {**main_data, "eval": {"n_examples": 20, "eps": 0.1}}, "main.yaml")
    (tmp_path / "results" / "main" / "sgd" / "s0" / EVAL_FILE).write_text('{"n_examples": 10}')
    assert run_status(sgd, study) == "new"


@pytest.mark.parametrize(
    "name",
    ["lr_sweep", "main_adversarial", "standard", "ablations", "variance_probe", "structured"],
)
def test_shipped_configs_parse(name: str) -> None:
    study = load_study(CONFIGS / f"{name}.yaml")
    specs = expand(study)
    assert study.name == name
    # from-scratch runs: the pipeline cells and their sources split the budget between stages
    sources = {s.pipeline["source_cell"].split("_")[0] for s in specs if s.pipeline}
    specs = [s for s in specs if s.pipeline is None and s.cell not in sources]
    cfgs = [s.config() for s in specs]
    # the same data, epoch budget and schedule for every run of a study
    for key in ("train_subset", "val_size", "epochs", "batch_size", "lr_schedule", "eval_subset"):
        assert len({getattr(c, key) for c in cfgs}) == 1, key
    assert all(c.warmup_epochs == 1 for c in cfgs)  # the stall fix (archive/*_v1 had none)
    if name != "lr_sweep":
        assert len(study.seeds) >= 3
        assert len({c.lr for c in cfgs}) == 1
    if name == "main_adversarial":
        assert {(c.sparse_method, c.sparsity) for c in cfgs} == {
            (m, s) for m in ("rigl", "static", "bsr") for s in (0.9, 0.99)
        }
        # BSR-Net rows: sgd and the two agc variants only
        assert {c.optimizer for c in cfgs if c.sparse_method == "bsr"} == {"sgd", "agc"}
        assert len(specs) == 3 * (4 * 5 + 2 * 3)
        assert [e["name"] for e in study.extra_evals_for(2)] == ["autoattack"]
        assert study.extra_evals_for(0) == study.extra_evals_for(1) == []
        assert study.eval["n_examples"] == 1000
        assert {
            (c.optimizer, c.svrg_schedule if c.optimizer == "svrg" else None) for c in cfgs
        } == {
            ("sgd", None),
            ("agc", None),
            ("svrg", "fixed"),
            ("svrg", "ramp"),
        }
        # AGC: the release's variant (pinned in the base) and the toolkit's default
        default = TrainConfig()
        assert {
            (c.agc_estimator, c.agc_refresh_fraction) for c in cfgs if c.optimizer == "agc"
        } == {("loss-slope", 1.0), (default.agc_estimator, default.agc_refresh_fraction)}
        assert {(c.objective, c.eps, c.sparse_init) for c in cfgs} == {("pgd-at", 0.1, "erk")}


@pytest.mark.parametrize("path", sorted((CONFIGS / "archive").glob("*.yaml")), ids=lambda p: p.stem)
def test_archived_configs_parse_and_match_their_results(path: Path) -> None:
    """Archived studies (superseded protocols) still parse, so summarize.py reads their results."""
    study = load_study(path)
    assert study.name == path.stem and study.name.endswith("_v1")
    assert all(s.config().warmup_epochs == 0 for s in expand(study))


def _fake_run(folder: Path, cfg_dict: dict, epochs: int, *, summary: bool, ckpt: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg_dict))
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e + 1}) + "\n" for e in range(epochs))
    )
    if summary:
        (folder / "summary.json").write_text("{}")
    if ckpt:
        (folder / "last.pt").write_bytes(b"x")


def test_run_status_transitions(tmp_path: Path) -> None:
    study = _load(tmp_path, {"base": {"epochs": 3}, "eval": {"n_examples": 10}})
    (spec,) = expand(study, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    cfg = spec.config().to_dict()
    assert run_status(spec, study) == "new"
    spec.run_dir.mkdir(parents=True)
    assert run_status(spec, study) == "new"  # empty folder
    (spec.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_status(spec, study) == "restart"  # killed before its first checkpoint
    _fake_run(spec.run_dir, cfg, 1, summary=False, ckpt=True)
    assert run_status(spec, study) == "resume"
    _fake_run(spec.run_dir, cfg, 3, summary=True, ckpt=True)
    assert run_status(spec, study) == "eval"
    _fake_run(spec.result_dir, cfg, 3, summary=True, ckpt=False)
    assert run_status(spec, study) == "eval"  # evaluation not stored yet
    (spec.result_dir / EVAL_FILE).write_text("{}")
    assert run_status(spec, study) == "done"
    _fake_run(spec.result_dir, {**cfg, "lr": 0.5}, 3, summary=True, ckpt=False)
    assert run_status(spec, study) == "stale"
    _fake_run(
        spec.result_dir, {**cfg, "threads": 7, "out": "elsewhere"}, 3, summary=True, ckpt=False
    )
    assert run_status(spec, study) == "done"  # thread count and folder are not settings


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_driver_trains_evaluates_resumes_and_skips(tmp_path: Path, monkeypatch, capsys) -> None:
    """End to end on a tiny real run: an interrupted run resumes to the uninterrupted result."""
    data = {
        "study": "tiny",
        "base": TINY_BASE,
        "grid": {"opt": [{"name": "sgd", "optimizer": "sgd"}, {"name": "agc", "optimizer": "agc"}]},
        "seeds": [0],
        "eval": {"attacks": "clean,pgd", "n_examples": 8, "pgd_steps": 2, "eps": 0.1},
        "baseline": {"axis": "opt", "value": "sgd"},
    }
    path = _write(tmp_path, data)
    roots = ["--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results")]
    study = load_study(path, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    sgd, agc = expand(study, runs_root=tmp_path / "runs", results_root=tmp_path / "results")

    # interrupt the AGC run in its second epoch, as a killed process would be
    real_epoch = train_mod.Trainer.train_epoch
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if self.cfg.optimizer == "agc" and self.state.epoch == 1 and calls["n"] < 100:
            calls["n"] = 100
            raise KeyboardInterrupt
        return real_epoch(self, *a, **k)

    monkeypatch.setattr(train_mod.Trainer, "train_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        main([str(path), "--threads", "1", *roots])
    assert run_status(sgd, study) == "done"
    assert run_status(agc, study) == "resume"
    assert main([str(path), "--dry-run", *roots]) == 0
    out = capsys.readouterr().out
    assert "done     tiny/sgd/s0" in out and "resume   tiny/agc/s0" in out
    assert main([str(path), "--dry-run", "--seeds", "0", "--only", "agc", *roots]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "resume   tiny/agc/s0"
    assert main([str(path), "--dry-run", "--seeds", "7", *roots]) == 2
    assert main([str(path), "--dry-run", "--seeds", "x", *roots]) == 2
    assert "Invalid seeds value" in capsys.readouterr().err
    assert main([str(path), "--threads", "1", *roots]) == 0
    assert run_status(agc, study) == "done"
    for spec in (sgd, agc):
        assert sorted(p.name for p in spec.result_dir.iterdir()) == sorted(RESULT_FILES)
        assert len(_metrics(spec.result_dir)) == 2
        ev = json.loads((spec.result_dir / EVAL_FILE).read_text())
        assert ev["n_examples"] == 8 and 0.0 <= ev["robust_acc"] <= ev["clean_acc"] <= 1.0
    resumed = _metrics(agc.result_dir)

    # the same AGC run without interruption gives the same metrics (timing aside)
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", real_epoch)
    ref = expand(study, runs_root=tmp_path / "ref", results_root=tmp_path / "ref_res")[1]
    train_mod.train(ref.config(1, progress=False))
    assert _strip(resumed) == _strip(_metrics(ref.run_dir))

    # a finished study is skipped: nothing is retrained
    monkeypatch.setattr(train_mod, "train", lambda cfg: pytest.fail("retrained a finished run"))
    assert main([str(path), "--threads", "1", *roots]) == 0


def test_rebuild_adds_only_the_missing_extra_evaluation(tmp_path: Path, capsys) -> None:
    """A fresh machine has the stored results but no checkpoint: the run is trained again, must
    reproduce the stored metrics, and only the extra evaluation's file is added."""
    data = {
        "study": "tiny",
        "base": TINY_BASE,
        "grid": {"opt": [{"name": "sgd", "optimizer": "sgd"}]},
        "seeds": [0],
        "eval": {"attacks": "clean,pgd", "n_examples": 8, "pgd_steps": 2, "eps": 0.1},
        "extra_evals": [{"name": "strong", "seeds": [0], "n_examples": 6, "pgd_steps": 3}],
    }
    path = _write(tmp_path, data)
    runs = tmp_path / "runs"
    roots = ["--runs-root", str(runs), "--results-root", str(tmp_path / "results")]
    study = load_study(path, runs_root=runs, results_root=tmp_path / "results")
    (spec,) = expand(study, runs_root=runs, results_root=tmp_path / "results")
    assert main([str(path), "--threads", "1", "--no-extra", *roots]) == 0
    stored = {p.name: p.read_bytes() for p in spec.result_dir.iterdir()}
    assert sorted(stored) == sorted(RESULT_FILES)
    assert run_status(spec, study) == "eval"  # same machine: the checkpoint is still there

    shutil.rmtree(runs)  # a fresh machine: results committed, run folders gone
    assert run_status(spec, study) == "rebuild"
    assert run_status(spec, study, extra=False) == "done"
    assert main([str(path), "--dry-run", *roots]) == 0
    out = capsys.readouterr().out
    assert "rebuild  tiny/sgd/s0" in out
    assert "1 runs remain (1 of them only for an extra evaluation, not in the projection: " in out
    assert "projection: sgd/s0)" in out
    assert "about 0.00 CPU-hours remain" in out
    assert main([str(path), "--threads", "1", *roots]) == 0
    assert run_status(spec, study) == "done"
    after = {p.name: p.read_bytes() for p in spec.result_dir.iterdir()}
    assert {k: v for k, v in after.items() if k != "eval_strong.json"} == stored  # untouched
    strong = json.loads(after["eval_strong.json"])
    assert strong["n_examples"] == 6 and 0.0 <= strong["robust_acc"] <= strong["clean_acc"] <= 1.0

    # stored on another CPU capability: refused before any training, nothing overwritten
    shutil.rmtree(runs)
    (spec.result_dir / "eval_strong.json").unlink()
    other = json.loads(stored["summary.json"])
    other["machine"]["cpu"] = "Some Other CPU"
    other["machine"]["cpu_capability"] = "SOME_OTHER_ISA"
    (spec.result_dir / "summary.json").write_text(json.dumps(other))
    before = {p.name: p.read_bytes() for p in spec.result_dir.iterdir()}
    assert main([str(path), "--threads", "1", *roots]) == 2
    assert "stored on a 'SOME_OTHER_ISA' (flags: " in capsys.readouterr().err
    assert not runs.exists()
    assert {p.name: p.read_bytes() for p in spec.result_dir.iterdir()} == before
    (spec.result_dir / "summary.json").write_bytes(stored["summary.json"])

    # stored metrics that the rebuilt run does not reproduce: an error, nothing overwritten
    rows = _metrics(spec.result_dir)
    rows[1]["val_robust_acc"] += 0.125
    (spec.result_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tampered = {p.name: p.read_bytes() for p in spec.result_dir.iterdir()}
    assert main([str(path), "--threads", "1", *roots]) == 2
    err = capsys.readouterr().err
    assert "differs from the stored one from epoch 2 on" in err and "stored results kept" in err
    assert {p.name: p.read_bytes() for p in spec.result_dir.iterdir()} == tampered


def test_same_cpu_kind_compares_capability_then_flags_then_the_model_name() -> None:
    here = {"cpu": "AMD EPYC 9654", "cpu_capability": "AVX512", "cpu_flags": ["avx2", "avx512f"]}
    # another model name with the same kernels: reproducible
    same = {**here, "cpu": "AMD EPYC 7B13"}
    assert same_cpu_kind(same, here)[0]
    # another capability, or the same capability with other kernel flags: not
    assert not same_cpu_kind({**here, "cpu_capability": "AVX2"}, here)[0]
    ok, was, now = same_cpu_kind({**here, "cpu_flags": ["avx2"]}, here)
    assert not ok and "avx512f" in now and "avx512f" not in was
    # flags compared only when both records have them
    assert same_cpu_kind({"cpu": "x", "cpu_capability": "AVX512"}, here)[0]
    # records older than the capability field: the model name decides
    assert same_cpu_kind({"cpu": "AMD EPYC 9654"}, here)[0]
    assert same_cpu_kind({"cpu": "Intel Xeon"}, here) == (False, "'Intel Xeon'", "'AMD EPYC 9654'")
    assert same_cpu_kind({}, here)[0]  # nothing recorded: nothing to compare


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _pipeline_data(**lwm: object) -> dict:
    return {
        "study": "tinyprune",
        "base": TINY_BASE,
        "grid": {
            "method": [
                {"name": "dense", "sparse_method": "dense"},
                {
                    "name": "lwm",
                    "sparse_method": "static",
                    "pipeline": {"method": "lwm", "source_cell": "dense"},
                    **lwm,
                },
            ]
        },
        "seeds": [0],
        "eval": {"attacks": "clean,pgd", "n_examples": 8, "pgd_steps": 2, "eps": 0.1},
        "extra_evals": [
            {"name": "strong", "seeds": [0], "cells": ["lwm*"], "n_examples": 6, "pgd_steps": 3}
        ],
    }


def test_pipeline_cell_runs_resumes_rebuilds_and_is_skipped(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A pipeline cell (LWM from the dense cell's run of the same seed) through the driver: the
    dry run names its source, an interrupted pipeline resumes, its results hold the last stage's
    files, pipeline.json and the chain's compute, a fresh machine rebuilds source and pipeline
    (both must reproduce the stored metrics) for the missing extra evaluation only, and a stored
    study is skipped."""
    import robust_agc.prune.pipeline as pipeline_mod

    path = _write(tmp_path, _pipeline_data())
    runs, results = tmp_path / "runs", tmp_path / "results"
    roots = ["--runs-root", str(runs), "--results-root", str(results)]
    study = load_study(path, runs_root=runs, results_root=results)
    dense, lwm = expand(study, runs_root=runs, results_root=results)
    assert dense.pipeline is None and lwm.pipeline["source_cell"] == "dense"
    assert [e["name"] for e in study.extra_evals_for(0, "lwm")] == ["strong"]
    assert study.extra_evals_for(0, "dense") == []  # the cells filter
    assert main([str(path), "--dry-run", *roots]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "new      tinyprune/dense/s0",
        "new      tinyprune/lwm/s0 (lwm pipeline from dense/s0)",
    ]

    real_epoch = train_mod.Trainer.train_epoch
    hit = {"n": 0}

    def flaky(self, *a, **k):  # interrupt the pipeline's stage in its second epoch, once
        if self.cfg.prune == "lwm" and self.state.epoch == 1 and not hit["n"]:
            hit["n"] = 1
            raise KeyboardInterrupt
        return real_epoch(self, *a, **k)

    monkeypatch.setattr(train_mod.Trainer, "train_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        main([str(path), "--threads", "1", "--no-extra", *roots])
    assert run_status(dense, study) == "done" and run_status(lwm, study) == "resume"
    capsys.readouterr()
    assert main([str(path), "--dry-run", "--only", "lwm", *roots]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("resume   tinyprune/lwm/s0 (lwm")
    assert main([str(path), "--threads", "1", "--no-extra", *roots]) == 0
    assert run_status(lwm, study, extra=False) == "done"
    assert run_status(lwm, study) == "eval"  # the extra evaluation is left for later

    res = lwm.result_dir
    assert sorted(_files(res)) == sorted([*RESULT_FILES, "pipeline.json"])
    rec = json.loads((res / "pipeline.json").read_text())
    assert rec["status"] == "complete" and [s["name"] for s in rec["stages"]] == ["1-lwm"]
    dense_summary = json.loads((dense.result_dir / "summary.json").read_text())
    assert rec["grad_evals_total"] == dense_summary["grad_evals"] + rec["grad_evals"] > 0
    cfg = yaml.safe_load((res / "config.yaml").read_text())
    assert (cfg["prune"], cfg["sparse_method"], cfg["sparsity"], cfg["epochs"]) == (
        "lwm",
        "static",
        0.9,
        2,
    )
    assert cfg["init_from"] == str(dense.run_dir / "best.pt")
    ev = json.loads((res / EVAL_FILE).read_text())
    assert ev["model_info"]["path"] == str(lwm.run_dir / "1-lwm" / "best.pt")
    assert len(_metrics(res)) == 2 and _metrics(res)[-1]["density"] == pytest.approx(0.1, abs=0.01)

    # a fresh machine: the results are stored, every run folder is gone
    shutil.rmtree(runs)
    assert run_status(dense, study) == "done" and run_status(lwm, study) == "rebuild"
    stored = _files(results)
    assert main([str(path), "--threads", "1", *roots]) == 0
    assert run_status(lwm, study) == "done" and (dense.run_dir / "best.pt").is_file()
    after = _files(results)
    added = sorted(set(after) - set(stored))
    assert added == ["tinyprune/lwm/s0/eval_strong.json"]
    assert {k: after[k] for k in stored} == stored  # nothing stored was rewritten

    # a stored study is skipped; a changed setting of the pipeline cell makes it stale
    fail = lambda *a, **k: pytest.fail("retrained a stored run")  # noqa: E731
    monkeypatch.setattr(train_mod, "train", fail)
    monkeypatch.setattr(pipeline_mod, "prune", fail)
    assert main([str(path), "--threads", "1", *roots]) == 0
    changed = load_study(
        _write(tmp_path, _pipeline_data(weight_decay=0.01)), runs_root=runs, results_root=results
    )
    d2, l2 = expand(changed, runs_root=runs, results_root=results)
    assert run_status(d2, changed) == "done" and run_status(l2, changed) == "stale"
    assert main([str(_write(tmp_path, _pipeline_data(weight_decay=0.01))), *roots]) == 2
    assert "weight_decay" in capsys.readouterr().err


def test_a_stored_setting_that_predates_its_field_is_its_default() -> None:
    stored = {"lr": 0.05, "optimizer": "sgd"}  # written before grad_align existed
    assert differing_keys(stored, {"lr": 0.05, "grad_align": 0.0}) == []
    assert differing_keys(stored, {"lr": 0.05, "grad_align": 0.2}) == ["grad_align"]
    assert differing_keys(stored, {"lr": 0.1, "free_replays": 4}) == ["free_replays", "lr"]
    assert differing_keys({}, {"threads": 3, "out": "x"}) == []  # execution keys never differ


def test_reuse_copies_runs_stored_before_new_settings_and_their_matching_extras(
    tmp_path: Path, monkeypatch
) -> None:
    """A stored run whose config.yaml lacks the newer settings is reused by a study that leaves
    them at their defaults; ``eps: None`` in the final evaluation is the run's eps; an extra
    evaluation is copied only when the reused study made it with the same options."""
    import run_study

    configs = tmp_path / "configs"
    configs.mkdir()
    monkeypatch.setattr(run_study, "CONFIGS_ROOT", configs)
    roots = {"runs_root": tmp_path / "runs", "results_root": tmp_path / "results"}
    aa = {"name": "aa", "seeds": [0], "attacks": "clean,autoattack", "n_examples": 5}
    strong = {"name": "strong", "seeds": [0], "pgd_steps": 100}
    main_data = {
        "study": "main",
        "base": {"epochs": 1, "eps": 0.1},
        "grid": {"opt": [{"name": "sgd", "optimizer": "sgd"}]},
        "eval": {"n_examples": 10, "eps": 0.1},
        "extra_evals": [aa, strong],
    }
    _write(configs, main_data, "main.yaml")
    main_study = load_study(configs / "main.yaml", **roots)
    (old,) = expand(main_study, **roots)
    cfg = old.config().to_dict()
    for key in ("grad_align", "free_replays", "on_collapse", "init_from", "save_epochs"):
        del cfg[key]  # stored before these settings existed
    _fake_run(old.result_dir, cfg, 1, summary=True, ckpt=False)
    for name, data in (
        (EVAL_FILE, {"n_examples": 10}),
        ("eval_aa.json", {}),
        ("eval_strong.json", {}),
    ):
        (old.result_dir / name).write_text(json.dumps(data))
    assert run_status(old, main_study) == "done"  # not stale
    fast = {
        "study": "fast",
        "base": {"epochs": 1, "eps": 0.1},
        "grid": {
            "r": [
                {"name": "pgd", "optimizer": "sgd"},
                {"name": "ga", "optimizer": "sgd", "grad_align": 0.2},
            ]
        },
        "eval": {"n_examples": 10},  # eps: the run's
        "extra_evals": [{**aa, "seeds": [0, 1], "cells": ["*"]}, {**strong, "pgd_steps": 20}],
        "reuse": ["main"],
    }
    study = load_study(_write(tmp_path, fast), **roots)
    pgd, ga = expand(study, **roots)
    assert [run_status(s, study) for s in (pgd, ga)] == ["reuse", "new"]
    monkeypatch.setattr("robust_agc.train.train", lambda cfg: pytest.fail("retrained"))
    assert execute(pgd, study) == "reuse"
    # eval_strong.json was made with 100 PGD steps, this study's with 20: not copied, and the
    # run now needs its checkpoint back for it
    assert sorted(p.name for p in pgd.result_dir.iterdir()) == sorted(
        [*RESULT_FILES, "eval_aa.json"]
    )
    assert run_status(pgd, study) == "rebuild" and run_status(pgd, study, extra=False) == "done"


def test_a_run_ended_by_the_collapse_guard_is_finished(tmp_path: Path) -> None:
    study = _load(tmp_path, {"base": {"epochs": 3}, "eval": {"n_examples": 10}})
    (spec,) = expand(study, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    _fake_run(spec.result_dir, spec.config().to_dict(), 2, summary=True, ckpt=False)
    (spec.result_dir / EVAL_FILE).write_text("{}")
    assert run_status(spec, study) == "new"  # 2 of 3 epochs and no reason: not finished
    guard = {"collapse_guard": {"stopped": True, "rolled_back_to": 1}}
    (spec.result_dir / "summary.json").write_text(json.dumps(guard))
    assert run_status(spec, study) == "done"  # --on-collapse stop/rollback ended it


def test_fast_at_study_times_pgd5_here_and_matches_steps_and_lambdas() -> None:
    study = load_study(CONFIGS / "fast_at.yaml")
    specs = expand(study)
    cfgs = {(s.cell, s.seed): s.config() for s in specs}
    assert len(study.seeds) == 3 and {c.optimizer for c in cfgs.values()} == {"sgd"}
    main = {
        (s.cell, s.seed): s.config() for s in expand(load_study(CONFIGS / "main_adversarial.yaml"))
    }
    for s in specs:
        # nothing is copied: the recipes are compared by training time, measured on one machine
        assert reusable_source(s, study) is None, s.cell
        c = cfgs[(s.cell, s.seed)]
        if (
            s.labels["recipe"] == "pgd5" and c.eps == 0.1
        ):  # the main study's SGD run, setting by setting
            m = main[(s.cell.replace("pgd5", "sgd"), s.seed)]
            assert dataclasses.replace(m, out=None) == dataclasses.replace(c, out=None), s.cell
    # equal optimizer steps and warm-up steps: free training's epochs hold M steps per batch
    for c in cfgs.values():
        assert c.epochs * c.free_replays == 8
        assert c.warmup_epochs * c.free_replays == c.eps_warmup_epochs * c.free_replays == 1
    ga = {(c.eps, c.grad_align, c.train_attack) for c in cfgs.values() if c.grad_align}
    assert ga == {(0.1, 0.2, "fgsm"), (0.2, 2.0, "fgsm")}
    assert {c.eps for c in cfgs.values()} == {0.1, 0.2}
    assert study.eval["eps"] is None  # each run at its own eps
    (aa,) = study.extra_evals
    headline = {"static90_n-fgsm", "static90_pgd5", "bsr90_n-fgsm", "bsr90_pgd5"}
    assert [s.cell for s in specs if s.seed == 2 and study.extra_evals_for(2, s.cell)] == [
        s.cell for s in specs if s.seed == 2 and (s.cell.startswith("rigl") or s.cell in headline)
    ]
    assert aa["attacks"] == "clean,autoattack" and aa["n_examples"] == 500


def test_pruning_study_splits_the_from_scratch_budget_and_reuses_the_sparse_runs() -> None:
    study = load_study(CONFIGS / "pruning.yaml")
    specs = expand(study)
    pipes = [s for s in specs if s.pipeline is not None]
    assert {s.pipeline["method"] for s in pipes} == {"lwm", "hydra", "imp"}
    assert len(pipes) == 3 * 2 * 2 * 3  # methods x sparsities x optimizers x seeds
    for s in pipes:
        src = source_spec(study, s)
        src_cfg, cfg = src.config(), s.config()
        assert (src.cell, src_cfg.sparse_method, src_cfg.optimizer) == (
            "dense_90_sgd",
            "dense",
            "sgd",
        )
        p = s.pipeline
        stage_epochs = {
            "lwm": cfg.epochs,
            "hydra": (p["score_epochs"] or cfg.epochs) + cfg.epochs,
            "imp": (p["rounds"] or 3) * cfg.epochs,
        }[p["method"]]
        assert src_cfg.epochs + stage_epochs == 8  # the from-scratch runs' epochs
        assert cfg.sparsity in (0.9, 0.99) and cfg.sparse_init == "erk"
    scratch = [s for s in specs if s.pipeline is None and s.labels["method"] != "dense"]
    assert len(scratch) == 3 * 2 * 2 * 3
    assert all(reusable_source(s, study) is not None for s in scratch)
    assert all(s.config().epochs == 8 for s in scratch)


def test_structured_study_cells_seeds_reuse_and_speed(tmp_path: Path) -> None:
    """structured.yaml: dense + unstructured 90% (copied from main_adversarial) + filter
    static/RigL at 50/75/90%, 3 seeds, AutoAttack on seed 2, speed records for dense and filter
    cells only."""
    # a results folder without this study's stored runs, holding the main study's (read only)
    results = tmp_path / "results"
    results.mkdir()
    (results / "main_adversarial").symlink_to(CONFIGS.parent / "results" / "main_adversarial")
    roots = {"runs_root": tmp_path / "runs", "results_root": results}
    study = load_study(CONFIGS / "structured.yaml", **roots)
    specs = expand(study, **roots)
    cells = list(dict.fromkeys(s.cell for s in specs))
    assert study.seeds == [0, 1, 2] and len(specs) == (9 + 1 + 6) * 3
    # the filter pipelines from dense4 (the pruning study's dense source: 4 epochs), 4 + 4 epochs
    pipes = [s for s in specs if s.pipeline is not None]
    assert {(s.pipeline["method"], s.config().sparsity) for s in pipes} == {
        (m, d) for m in ("lwm", "hydra") for d in (0.5, 0.75, 0.9)
    }
    for s in pipes:
        cfg, p = s.config(), s.pipeline
        assert p["source_cell"] == "dense4" and cfg.sparse_structure == "filter"
        assert cfg.epochs + (p.get("score_epochs") or 0) == 4 and cfg.warmup_epochs == 0
    dense4 = [s.config() for s in specs if s.cell == "dense4"]
    assert {(c.sparse_method, c.epochs) for c in dense4} == {("dense", 4)}
    specs = [s for s in specs if s.pipeline is None and s.cell != "dense4"]
    filt = {(s.config().sparse_method, s.config().sparsity) for s in specs if "filter" in s.cell}
    assert filt == {(m, d) for m in ("static", "rigl") for d in (0.5, 0.75, 0.9)}
    assert all(s.config().sparse_structure == "filter" for s in specs if "filter" in s.cell)
    assert study.baseline == {"axis": "sparse", "value": "dense", "metric": "val_robust_acc"}
    main = load_study(CONFIGS / "main_adversarial.yaml")
    for s in specs:  # the main study's data, budget, recipe and evaluation for every run
        cfg = s.config()
        assert (cfg.epochs, cfg.optimizer, cfg.lr, cfg.eps, cfg.sparse_init) == (
            8, "sgd", 0.05, 0.1, "erk")  # fmt: skip
        assert [e["name"] for e in study.extra_evals_for(s.seed, s.cell)] == (
            ["autoattack"] if s.seed == 2 else []
        )
    assert study.eval == main.eval
    assert study.extra_evals[0] | {"cells": None} == main.extra_evals[0] | {"cells": None}
    # the unstructured cells are the main study's SGD runs (stored in the repository): copied
    for s in specs:
        src = reusable_source(s, study)
        if s.cell in ("rigl90", "static90"):
            assert run_status(s, study) == "reuse"
            assert src is not None and src.parent.name == f"{s.cell}_sgd"
            assert src.parents[1].name == "main_adversarial"
        else:
            assert src is None and run_status(s, study) == "new"
    assert [c for c in cells if study.measures_speed(c)] == ["dense"] + [
        f"filter-{m}{d}" for m in ("static", "rigl") for d in (50, 75, 90)
    ]
    assert study.speed["batch_size"] == 128 and study.speed["repeats"] >= 10


@pytest.mark.parametrize(
    "speed,message",
    [
        ({"repeats": 0}, "repeats"),
        ({"batch_size": "x"}, "batch_size"),
        ({"cells": "filter*"}, "cells"),
        ({"threads": 2}, "keys"),
    ],
)
def test_bad_speed_entries_are_refused(tmp_path: Path, speed: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _load(tmp_path, {"eval": {"n_examples": 8}, "speed": speed})
    with pytest.raises(UserError, match="needs an eval"):
        _load(tmp_path, {"speed": {}})


def test_speed_record_of_a_filter_run_and_its_status(tmp_path: Path) -> None:
    """A tiny real filter-sparse run: the driver exports its best.pt, times it against the full
    width into speed.json (stored with the results), and a missing record makes the run
    unfinished; --no-extra leaves it for later."""
    f75 = {"name": "f75", "sparse_method": "static", "sparse_structure": "filter", "sparsity": 0.75}
    data = {
        "study": "tiny",
        "base": {**TINY_BASE, "epochs": 1},
        "grid": {"m": [f75, {"name": "dense", "sparse_method": "dense"}]},
        "seeds": [0],
        "eval": {"attacks": "clean", "n_examples": 8, "eps": 0.1},
        "speed": {"cells": ["f*"], "batch_size": 16, "repeats": 3, "warmup": 1},
    }
    path = _write(tmp_path, data)
    roots = ["--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results")]
    study = load_study(path, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    f75, dense = expand(study, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    assert study.measures_speed("f75") and not study.measures_speed("dense")
    assert main([str(path), "--threads", "1", "--no-extra", *roots]) == 0
    assert run_status(f75, study, extra=False) == "done"
    assert run_status(f75, study) == "eval"  # trained, checkpoint there, speed record missing
    assert not (f75.result_dir / "speed.json").exists()
    assert main([str(path), "--threads", "1", *roots]) == 0
    assert run_status(f75, study) == run_status(dense, study) == "done"
    assert not (dense.result_dir / "speed.json").exists()
    rec = json.loads((f75.result_dir / "speed.json").read_text())
    assert rec["run"] == "tiny/f75/s0" and rec["checkpoint"] == "best.pt"
    want = {"batch_size": 16, "repeats": 3, "warmup": 1, "threads": 1}
    assert {k: rec["settings"][k] for k in want} == want
    assert rec["machine"]["threads"] == 1 and rec["torch"] and "--threads 1" in rec["command"]
    d, e = rec["dense"], rec["exported"]
    assert len(d["times_s"]) == len(e["times_s"]) == 3
    assert e["params"] < d["params"] and e["flops"] < d["flops"]
    assert rec["flops_ratio"] == pytest.approx(e["flops"] / d["flops"])
    assert rec["speedup"] == pytest.approx(e["images_per_s"] / d["images_per_s"])
    assert d["widths"]["features.2"] > e["widths"]["features.2"]
    assert e["widths"]["classifier.6"] == d["widths"]["classifier.6"] == 10  # the output layer
    # a fresh machine (no checkpoint) missing the record rebuilds the run for it
    (f75.result_dir / "speed.json").unlink()
    shutil.rmtree(f75.run_dir)
    assert run_status(f75, study) == "rebuild"
