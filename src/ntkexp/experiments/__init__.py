"""Experiment kinds, registered by name in :data:`EXPERIMENTS`, and the runner.

Built in: ``jacot_fig1`` (NTK convergence and stability during training,
Jacot et al. 2018, Fig. 1) and ``jacot_fig2`` (trained functions against the
limiting Gaussian, Fig. 2). A plugin module registers more with
:func:`register_experiment`.
"""

from ntkexp.experiments.base import (
    EXPERIMENTS,
    Experiment,
    RunResult,
    Unit,
    UserError,
    register_experiment,
    run,
)
from ntkexp.experiments import jacot_fig1, jacot_fig2  # noqa: E402,F401  (registration)

__all__ = ["EXPERIMENTS", "Experiment", "RunResult", "Unit", "UserError",
           "register_experiment", "run"]
