"""Experiment kinds, registered by name in :data:`EXPERIMENTS`, and the runner.

Built in: ``jacot_fig1`` (NTK convergence and stability during training,
Jacot et al. 2018, Fig. 1) and ``jacot_fig2`` (trained functions against the
limiting Gaussian, Fig. 2), ``du2019_fig1`` and ``zhang2019_ngd`` (issue 6).
A plugin module registers more with
:func:`register_experiment`.
"""

from ntkexp.experiments import (  # noqa: F401  (registration)
    du2019,
    jacot_fig1,
    jacot_fig2,
    zhang2019,
)
from ntkexp.experiments.base import (
    EXPERIMENTS,
    Experiment,
    RunResult,
    Unit,
    UserError,
    register_experiment,
    run,
)

__all__ = ["EXPERIMENTS", "Experiment", "RunResult", "Unit", "UserError",
           "register_experiment", "run"]
