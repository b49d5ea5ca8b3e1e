"""Experiment kinds, registered by name in :data:`EXPERIMENTS`, and the runner.

Built in: ``jacot_fig1`` (NTK convergence and stability during training,
Jacot et al. 2018, Fig. 1) and ``jacot_fig2`` (trained functions against the
limiting Gaussian, Fig. 2), ``arora2019_finegrained``, ``du2019_fig1``,
``zhang2019_ngd``, ``bietti2019_spectrum``, ``lee2020_finite_vs_infinite``
(issue 6), ``mnist1d_finite_vs_infinite`` (MNIST-1D, issue 12) and
``kernel_convergence`` (empirical NTK vs its limit for any
registered architecture, issue 7), ``lazy_vs_rich`` (NTK vs muP vs SP:
kernel and feature movement, learning-rate transfer, issue 21), ``woodworth2020`` (the diagonal
linear net's kernel-to-rich crossover against its exact implicit bias,
issue 21), ``finite_width_corrections`` (1/n corrections at initialisation: NTK
fluctuations and the four-point vertex, issue 22) and ``double_descent`` (test
error against width ending at the kernel limit, issue 22). A plugin module
registers more with
:func:`register_experiment` (see ``docs/extending.md``).
"""

from ntkexp.experiments import (  # noqa: F401  (registration)
    arora2019,
    bietti2019,
    double_descent,
    du2019,
    finite_width_corrections,
    jacot_fig1,
    jacot_fig2,
    kernel_convergence,
    lazy_vs_rich,
    lee2020,
    mnist1d,
    woodworth2020,
    zhang2019,
)
from ntkexp.experiments.base import (
    EXPERIMENTS,
    Experiment,
    Member,
    RunResult,
    Unit,
    UserError,
    plot_run,
    register_experiment,
    run,
)

__all__ = ["EXPERIMENTS", "Experiment", "Member", "RunResult", "Unit", "UserError",
           "plot_run", "register_experiment", "run"]
