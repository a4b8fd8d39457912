"""Fixed-point solvers of the implicit backward: each solves an affine fixed point exactly enough,
reports honest statistics, and the registry refuses unknown names."""

import pytest
import torch

from spikingbert_sim.errors import ConfigError
from spikingbert_sim.solvers import SOLVERS, SolverStats, get_solver


def affine_problem(n=12, rate=0.6, seed=0):
    """y = A y + b with spectral norm of A equal to ``rate``; exact solution by a dense solve."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, ord=2) * rate
    b = torch.randn(n, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, b)
    return (lambda y: A @ y + b), b, exact


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_finds_the_fixed_point(name):
    func, b, exact = affine_problem()
    y, stats = get_solver(name)(func, b.clone(), max_iter=200, tol=1e-12)
    assert isinstance(stats, SolverStats) and stats.solver == name
    assert stats.converged
    assert stats.relative_residual <= 1e-12
    assert torch.allclose(y, exact, atol=1e-10, rtol=0)
    assert stats.residual == pytest.approx(float(torch.linalg.vector_norm(func(y) - y)), abs=1e-9)


def test_accelerated_solvers_need_fewer_steps():
    func, b, _ = affine_problem(rate=0.9)
    steps = {name: SOLVERS[name](func, b.clone(), max_iter=500, tol=1e-10)[1].steps for name in SOLVERS}
    assert steps["anderson"] < steps["fixed_point"]
    assert steps["broyden"] < steps["fixed_point"]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_keeps_shape_and_reports_non_convergence(name):
    func, b, _ = affine_problem(n=12, rate=0.95)
    shaped = lambda y: func(y.reshape(-1)).reshape(3, 4)  # noqa: E731
    y, stats = SOLVERS[name](shaped, b.reshape(3, 4).clone(), max_iter=2, tol=1e-14)
    assert y.shape == (3, 4)
    assert stats.steps <= 2
    assert not stats.converged


def test_expansive_map_anderson_and_broyden_still_solve():
    # Plain iteration diverges for an eigenvalue of -1.5; the quasi-Newton solvers do not need
    # a contraction (the linear system is still non-singular).
    n = 6
    A = torch.diag(torch.tensor([-1.5, 0.3, 0.2, -0.1, 0.5, 0.0], dtype=torch.float64))
    b = torch.ones(n, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, b)
    for name in ("anderson", "broyden"):
        y, stats = SOLVERS[name](lambda v: A @ v + b, b.clone(), max_iter=100, tol=1e-12)
        assert stats.converged, name
        assert torch.allclose(y, exact, atol=1e-9)
    _, stats = SOLVERS["fixed_point"](lambda v: A @ v + b, b.clone(), max_iter=50, tol=1e-12)
    assert not stats.converged


def test_registry_rejects_unknown_names_and_bad_options():
    with pytest.raises(ConfigError, match="unknown solver 'newton'"):
        get_solver("newton")
    func, b, _ = affine_problem()
    with pytest.raises(ConfigError, match="max_iter"):
        SOLVERS["anderson"](func, b, max_iter=0)
    with pytest.raises(ConfigError, match="tol"):
        SOLVERS["broyden"](func, b, tol=0.0)
    assert SolverStats("x", 1, 0.0, 0.0, True).to_dict()["converged"] is True
