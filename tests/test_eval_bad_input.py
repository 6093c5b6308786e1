"""``robust-agc eval`` on bad input: one line on stderr naming the value and what is accepted, exit
status 2, nothing written. (Bad ``--eps-grid``/``--fmn-steps``: ``tests/test_fmn.py``; RobustBench
names and folders: ``tests/test_robustbench_offline.py``.)"""

from __future__ import annotations

import pytest
import torch

from robust_agc.cli import main
from robust_agc.models import create_model


@pytest.fixture
def state_dict(tmp_path):
    torch.manual_seed(0)
    cnn = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28).eval()
    path = tmp_path / "w.pt"
    torch.save(cnn.state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attacks", "clean,cw"], "Invalid attacks value: 'cw' (choose from clean, pgd, "),
        (["--attacks", ""], "Invalid attacks value: [] (empty)"),
        (["--norm", "L3"], "--norm: Invalid threat_model value: 'L3' (choose Linf, L2, L1, L0)"),
        (["--norm", "Linf2"], "Invalid threat_model value: 'Linf2' (choose Linf, L2, L1, L0)"),
        (["--norm", "L1"], "Invalid threat_model value: 'L1' with autoattack (L1 is for the fmn"),
        (["--norm", "L0", "--attacks", "clean,pgd,fmn"], "'L0' with pgd (L0 is for the fmn"),
        (["--eps-grid", ",", "--attacks", "clean,fmn"], "Invalid eps_grid value: [] (empty)"),
        (["--eps-grid", "0.2,0.1", "--attacks", "clean,fmn"], "must be strictly increasing"),
        (["--n-examples", "20000"], "Invalid n_examples value: 20000 (only 10000 points)"),
    ],
)
def test_bad_value_is_one_line_exit_2_nothing_written(tmp_path, state_dict, capsys, extra, message):
    out, state = tmp_path / "r.json", tmp_path / "st.json"
    argv = ["eval", "--state-dict", str(state_dict), "--arch", "small-cnn"]
    argv += ["--dataset", "fashion-mnist", "--eps", "0.1", "--n-examples", "4", "--no-progress"]
    argv += ["--out", str(out), "--state", str(state), *extra]
    code = main(argv)
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err and "usage:" not in err, err
    assert not out.exists() and not state.exists() and cap.out == ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "robustbench"], "Invalid preset value: 'robustbench' (choose apb)"),
        (
            ["--preset", "apb"],
            "Invalid fmn_slice value: 2048:2176 (must lie within the n_examples=4",
        ),
        (
            ["--attacks", "clean,fmn", "--fmn-slice", "3"],
            "Invalid fmn_slice value: '3' (START:STOP",
        ),
        (["--attacks", "clean,fmn", "--fmn-slice", "3:2"], "Invalid fmn_slice value: (3, 2)"),
        (["--fmn-slice", "0:2"], "Invalid fmn_slice value: (0, 2) (without the fmn stage)"),
    ],
)
def test_bad_preset_or_slice_is_one_line(tmp_path, state_dict, capsys, extra, message):
    test_bad_value_is_one_line_exit_2_nothing_written(tmp_path, state_dict, capsys, extra, message)
