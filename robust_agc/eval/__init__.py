"""Robustness evaluation: one typed entry point, per-point worst case, AutoAttack, resumable.

:func:`benchmark` follows RobustBench/AutoAttack conventions (``docs/protocols.md`` section 1):

* the first ``n_examples`` test points, unshuffled, the model in eval mode, eps and seed explicit;
* stages run in the order given (``clean`` always first); each stage only attacks the points that
  are still robust, always starting from the clean image; a misclassified clean point is never
  attacked and a point broken once stays broken; the reported number is the final worst case;
* AutoAttack is the original implementation (:mod:`pyautoattack`, 100-iteration APGD, 9 targets,
  Square with 5000 queries). We drive the attack objects that ``pyautoattack.AutoAttack`` itself
  builds and configures for the requested version, with AutoAttack's own loop semantics (the robust
  points in order, cut into ``batch_size`` chunks, each attack re-seeded with ``seed`` per chunk,
  success judged by re-predicting the returned images). Points and seeds being the same, the
  per-point flags are identical to ``AutoAttack.run_standard_evaluation`` (tested, and checked by
  ``benchmarks/eval_speed.py``); driving the components ourselves gives per-component accuracies
  and timings, a resumable state after every chunk, and no repeated checks or clean passes;
* the minimum-norm stage ``fmn`` (foolbox's FMN, L-inf, L2, L1 or L0, :mod:`~robust_agc.eval.fmn`) runs last on every
  clean-correct point and records per-point radii and a security curve over ``eps_grid``; a radius
  ``<= eps`` breaks the point at eps, so ``robust_acc`` stays the per-point worst case over stages;
* robust accuracy is counted twice (flags, and re-prediction on the adversarial images) and the
  gradient-masking checks of :mod:`robust_agc.eval.checks` are recorded as flags in the result;
* with ``torch.distributed`` initialized (e.g. under ``torchrun``), the chunks are shared out
  round-robin over the processes (chunk ``b`` on rank ``b % world_size``) and the per-chunk outcomes
  are gathered on every rank after each round. A chunk is the same points with the same seed
  whichever rank runs it, so the per-point flags, accuracies and pass counts equal a single
  process's with the same ``batch_size``, for every stage, AutoAttack included (tested in
  ``tests/test_distributed_eval.py``); only timings differ. ``batch_size`` is the unit of work: a
  unit with fewer chunks than processes leaves some idle.

Accuracies are fractions in [0, 1] everywhere in this module and in the JSON record.

The package, in the order an evaluation uses it:

* :mod:`~robust_agc.eval.plan`: the validated arguments (:class:`EvalPlan`, :func:`make_plan`);
* :mod:`~robust_agc.eval.entry`: :func:`benchmark`, the public entry point;
* :mod:`~robust_agc.eval.runner`: the evaluation's phases, one function each, top to bottom;
* :mod:`~robust_agc.eval.attackers` and :mod:`~robust_agc.eval.autoattack`: the attack behind each
  unit (PGD from ``attacks``, AutoAttack's components from pyautoattack);
* :mod:`~robust_agc.eval.state`: the resumable state file; :mod:`~robust_agc.eval.comm`: the
  processes of a distributed evaluation; :mod:`~robust_agc.eval.passes`: counting model passes;
* :mod:`~robust_agc.eval.checks`: the gradient-masking checks;
* :mod:`~robust_agc.eval.result`: :class:`EvalResult` and its JSON record;
* :mod:`~robust_agc.eval.loading`: :func:`load_model` and :func:`load_model_and_info`;
* :mod:`~robust_agc.eval.presets`: benchmark presets (``apb``, the Adversarial Pruning Benchmark).
"""

from .entry import benchmark
from .loading import compression_info, load_model, load_model_and_info
from .plan import (
    AUTOATTACK_COMPONENTS,
    AUTOATTACK_VERSIONS,
    STAGES,
    EvalPlan,
    ThreatModel,
    make_plan,
)
from .result import EvalResult

__all__ = [
    "ThreatModel",
    "EvalResult",
    "EvalPlan",
    "STAGES",
    "AUTOATTACK_COMPONENTS",
    "AUTOATTACK_VERSIONS",
    "benchmark",
    "compression_info",
    "load_model",
    "load_model_and_info",
    "make_plan",
]
