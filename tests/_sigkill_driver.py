"""Run the ``robust-agc`` CLI and SIGKILL the process at a known training step (a test helper).

``python -m tests._sigkill_driver STEP MARKER <robust-agc arguments>`` runs
``robust_agc.cli.main(<robust-agc arguments>)`` with :meth:`Trainer._optimizer_step` wrapped, in
this process only: the call that takes training step ``STEP + 1`` (when ``trainer.state.step ==
STEP``) first takes the step, then writes ``MARKER.<rank>`` (JSON: the epoch and step counters,
and whether ``last.pt`` existed) and sends SIGKILL to its own process. The kill happens at the same
point of the run on every launch, whatever the machine's speed; works under ``torchrun`` too (every
rank writes its marker, waits at a barrier, and kills itself at the same step). The library
has no test hook: the patch lives here.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from robust_agc.cli import main
from robust_agc.train import Trainer


def _kill_at(step: int, marker: str, out: Path) -> None:
    original = Trainer._optimizer_step

    def _optimizer_step(self: Trainer) -> bool:
        stepped = original(self)  # the in-memory weights move past the last checkpoint
        if self.state.step == step:
            record = {
                "epoch": self.state.epoch,
                "step": self.state.step,
                "last_pt_existed": (out / "last.pt").is_file(),
            }
            Path(f"{marker}.{self.rank}").write_text(json.dumps(record))
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its marker before one dies
            os.kill(os.getpid(), signal.SIGKILL)
        return stepped

    Trainer._optimizer_step = _optimizer_step  # type: ignore[method-assign]


if __name__ == "__main__":
    step, marker, *argv = sys.argv[1:]
    _kill_at(int(step), marker, Path(argv[argv.index("--out") + 1]))
    sys.exit(main(argv))
