"""RobustBench zoo models read offline (``robust_agc.eval.loading``): a checkpoint the test writes
in RobustBench's layout ``<model_dir>/cifar10/Linf/<name>.pt`` for a real zoo entry (Ding2020MMA,
a WideResNet-28-4, the cheapest single-checkpoint CIFAR-10 L-inf entry to build), loaded through
the zoo's own constructor and evaluated by ``benchmark()`` and the CLI on synthetic CIFAR-shaped
points; and the one-line errors for a name outside the zoo, a folder without the checkpoint and
robustbench not importable.

robustbench 1.1.1 (the ``dev`` extra installs it) does not import from PyPI packages alone: its
``__init__`` reaches ``pkg_resources`` (gone from setuptools >= 81) and ``autoattack`` (AutoAttack's
git package; PyPI has it as ``pyautoattack``), neither of which the zoo's model definitions use.
Where they are missing, the fixture puts stand-ins for those two modules on ``sys.path`` for the
test only (the library never does), and removes every module it imported afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_agc import data as rd
from robust_agc import eval as ev
from robust_agc.errors import CheckpointError, UserError

NAME = "Ding2020MMA"
pytestmark = pytest.mark.filterwarnings(
    "ignore:Overwriting:UserWarning",
    "ignore::DeprecationWarning",
    "ignore::UserWarning:pkg_resources",
)

STANDINS = {
    "pkg_resources.py": "def resource_filename(package, resource):\n"
    "    raise NotImplementedError('test stand-in: robustbench ImageNet lists are not used')\n",
    "autoattack/__init__.py": "from pyautoattack import AutoAttack  # noqa: F401\n",
    "autoattack/state.py": "from pyautoattack.state import EvaluationState  # noqa: F401\n",
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """RobustBench's CIFAR-10 L-inf zoo (``model_dicts``), importable for this module's tests."""
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("robustbench is not installed (pip install -e '.[dev]')")
    before = set(sys.modules)
    folder = None
    if not _importable("robustbench.model_zoo"):
        for m in [m for m in sys.modules if m.split(".")[0] in ("robustbench", "autoattack")]:
            del sys.modules[m]  # robustbench's half-imported package from the failed attempt
        folder = str(tmp_path_factory.mktemp("standins"))
        for rel, text in STANDINS.items():
            if importlib.util.find_spec(rel.split("/")[0].removesuffix(".py")) is None:
                path = Path(folder) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        sys.path.insert(0, folder)
        importlib.invalidate_caches()
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

        yield model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]
    finally:
        if folder is not None:
            sys.path.remove(folder)
        for m in set(sys.modules) - before:
            if m.split(".")[0] in ("robustbench", "autoattack", "pkg_resources"):
                del sys.modules[m]


@pytest.fixture(scope="module")
def ding(zoo):
    """The zoo entry's model, built once with seeded weights."""
    torch.manual_seed(0)
    return zoo[NAME]["model"]().eval()


def _checkpoint(model, model_dir, prefix="module.", wrap=True):
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = model_dir / "cifar10" / "Linf" / f"{NAME}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 1} if wrap else state, path)
    return model


def _cifar_test(folder, n=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    obj = {b"labels": rng.integers(0, 10, size=n).tolist(), b"data": images.reshape(n, -1)}
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    (folder / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize(("prefix", "wrap"), [("module.", True), ("", False), ("model.", True)])
def test_zoo_model_loads_offline(ding, tmp_path, prefix, wrap):
    ref = _checkpoint(ding, tmp_path, prefix, wrap)
    model, info = ev.load_model_and_info(
        NAME, source="robustbench", dataset="cifar10", threat_model="linf", model_dir=tmp_path
    )
    assert type(model) is type(ref) and model is not ref and not model.training
    theirs, ours = ref.state_dict(), model.state_dict()
    assert list(theirs) == list(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert info["architecture"] == NAME and info["threat_model"] == "Linf"


@pytest.mark.slow  # about 8 s on a loaded 2-core machine: WideResNet-28-4 passes
def test_zoo_model_evaluates(ding, tmp_path):
    _checkpoint(ding, tmp_path)
    model = ev.load_model(NAME, source="robustbench", dataset="cifar10", model_dir=tmp_path)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4)
    res = ev.benchmark(
        model, x=x, y=y, eps=8 / 255, attacks="clean", batch_size=4, progress=False,
        run_checks=False, architecture=NAME,
    )  # fmt: skip
    with torch.no_grad():
        assert res.clean_acc == float((ding(x).argmax(1) == y).float().mean())
    assert res.to_dict()["architecture"] == NAME and res.n_examples == 4


def test_cli_robustbench_model(ding, tmp_path):
    from robust_agc.cli import main

    _checkpoint(ding, tmp_path / "models")
    _cifar_test(tmp_path / "data")
    rd._CACHE.clear()
    out = tmp_path / "r.json"
    argv = ["eval", "--robustbench", NAME, "--dataset", "cifar10", "--norm", "Linf"]
    argv += ["--model-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]
    argv += ["--eps", "0.031", "--attacks", "clean", "--no-checks", "--no-progress"]
    argv += ["--out", str(out)]
    try:
        assert main(argv) == 0
    finally:
        rd._CACHE.clear()
    d = json.loads(out.read_text())
    assert d["architecture"] == NAME and d["n_examples"] == 4 and d["dataset"] == "cifar10"
    assert d["model_info"]["source"] == "robustbench"


def test_bad_robustbench_inputs(zoo, tmp_path):
    with pytest.raises(
        UserError,
        match=rf"'Nope2020' is not in RobustBench's cifar10 Linf zoo \({len(zoo)} models: ",
    ):
        ev.load_model("Nope2020", source="robustbench", dataset="cifar10", model_dir=tmp_path)
    with pytest.raises(UserError, match=r"checkpoint not found: .*cifar10/Linf/Ding2020MMA\.pt"):
        ev.load_model(NAME, source="robustbench", dataset="cifar10", model_dir=tmp_path)
    with pytest.raises(UserError, match="needs --model-dir"):
        ev.load_model(NAME, source="robustbench", dataset="cifar10")
    with pytest.raises(UserError, match="Invalid dataset value: 'mnist'"):
        ev.load_model(NAME, source="robustbench", dataset="mnist", model_dir=tmp_path)
    path = tmp_path / "cifar10" / "Linf" / f"{NAME}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="does not fit RobustBench model 'Ding2020MMA'"):
        ev.load_model(NAME, source="robustbench", dataset="cifar10", model_dir=tmp_path)


def test_robustbench_not_importable_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo", None)
    with pytest.raises(
        UserError, match="RobustBench zoo models need the 'robustbench' package"
    ) as e:
        ev.load_model(NAME, source="robustbench", dataset="cifar10", model_dir="m")
    assert "\n" not in str(e.value) and "autoattack" in str(e.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Nope2020", r"'Nope2020' is not in RobustBench's cifar10 Linf zoo \(\d+ models: \w+, "),
        (NAME, r"RobustBench checkpoint not found: .*/cifar10/Linf/Ding2020MMA\.pt"),
    ],
)
def test_cli_bad_robustbench_model_is_one_line(zoo, tmp_path, capsys, name, message):
    from robust_agc.cli import main

    out = tmp_path / "r.json"
    argv = ["eval", "--robustbench", name, "--dataset", "cifar10", "--model-dir", str(tmp_path)]
    argv += ["--eps", "0.031", "--attacks", "clean", "--no-progress", "--out", str(out)]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()
