r"""Fixed-point solvers for the implicit backward pass (SPEC §5), in a registry with one signature.

Every solver finds ``y`` with ``y = func(y)`` starting from ``y0`` and returns the solution with
:class:`SolverStats` beside it (torchdeq's convention)::

    y, stats = get_solver("anderson")(func, y0, max_iter=50, tol=1e-6)

The implicit gradient of an equilibrium ``a* = f(a*, x)`` needs ``g`` with
:math:`(I - J_f)^\top g = \bar g` (:math:`\bar g` the incoming gradient); written as a fixed point
that is ``g = ḡ + J_fᵀ g``, whose map is affine with the vector–Jacobian product
:math:`v \mapsto J_f^\top v` computed by autograd. Plain iteration converges when the feedback map
is contractive; Anderson and Broyden also converge (faster) when it is only mildly expansive.

Tensors of any shape are treated as one flat vector (the whole batch at once): the norms and the
stopping rule are global, so a batch converges when its worst sample has. Solvers work in the
dtype of ``y0``.

The stopping rule is the relative residual
:math:`\lVert F(y) - y\rVert / (\lVert F(y)\rVert + \epsilon) \le` ``tol``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .errors import ConfigError

FixedPointMap = Callable[[Tensor], Tensor]
_EPS = 1e-30  # keeps the relative residual finite when F(y) = 0


@dataclass(frozen=True)
class SolverStats:
    """What a solve did: iterations used, final residuals, and whether ``tol`` was met."""

    solver: str  # registry name
    steps: int  # evaluations of the map after the initial one
    residual: float  # absolute residual ‖F(y) − y‖ of the returned y
    relative_residual: float  # ‖F(y) − y‖ / ‖F(y)‖
    converged: bool  # relative_residual <= tol

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double()))


def _stats(name: str, steps: int, fy: Tensor, y: Tensor, tol: float) -> SolverStats:
    residual = _norm(fy - y)
    relative = residual / (_norm(fy) + _EPS)
    return SolverStats(name, steps, residual, relative, relative <= tol)


def _check(max_iter: int, tol: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not tol > 0:
        raise ConfigError(f"tol must be > 0, got {tol!r}")


def fixed_point(func: FixedPointMap, y0: Tensor, max_iter: int = 50, tol: float = 1e-6) -> tuple[Tensor, SolverStats]:
    """Plain fixed-point iteration ``y ← F(y)``; converges linearly at the contraction rate of F."""
    _check(max_iter, tol)
    y = y0
    fy = func(y)
    steps = 1
    while steps < max_iter:
        if _norm(fy - y) <= tol * (_norm(fy) + _EPS):
            break
        y = fy
        fy = func(y)
        steps += 1
    # F(y) is one step closer to the fixed point than y and costs nothing more: return it, with
    # the residual measured at the last y (a safe upper bound for the returned point).
    stats = _stats("fixed_point", steps, fy, y, tol)
    return fy, stats


def anderson(func: FixedPointMap, y0: Tensor, max_iter: int = 50, tol: float = 1e-6, memory: int = 5,
             beta: float = 1.0, lam: float = 1e-10) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II) with ``memory`` past iterates and mixing ``beta``.

    Each step solves the small least-squares problem for the combination of the last ``m``
    residuals closest to zero (with a Tikhonov term ``lam`` times the largest squared residual)
    and mixes the corresponding iterates, as in Walker & Ni (2011) and the DEQ / torchdeq
    implementations.
    """
    _check(max_iter, tol)
    if memory < 1:
        raise ConfigError(f"memory must be >= 1, got {memory!r}")
    shape, dtype = y0.shape, y0.dtype
    n = y0.numel()
    m = memory
    X = y0.new_zeros(m, n)  # past iterates
    F = y0.new_zeros(m, n)  # their images
    X[0] = y0.reshape(-1)
    F[0] = func(y0).reshape(-1)
    steps = 1
    best = (X[0].clone(), F[0].clone())  # X and F are ring buffers: keep copies
    best_res = _norm(F[0] - X[0]) / (_norm(F[0]) + _EPS)
    if best_res <= tol:
        return F[0].reshape(shape), _stats("anderson", steps, F[0], X[0], tol)
    X[1] = F[0]
    F[1] = func(F[0].reshape(shape)).reshape(-1)
    steps += 1
    k = 2
    while True:
        fk, xk = F[(k - 1) % m], X[(k - 1) % m]
        res = _norm(fk - xk) / (_norm(fk) + _EPS)
        if res < best_res:
            best, best_res = (xk.clone(), fk.clone()), res
        if res <= tol or steps >= max_iter:
            break
        n_used = min(k, m)
        G = F[:n_used] - X[:n_used]  # (n_used, n) residuals
        # Minimise ‖Σ α_i G_i‖ subject to Σ α_i = 1: solve the bordered normal equations.
        H = torch.zeros(n_used + 1, n_used + 1, dtype=torch.float64, device=y0.device)
        H[0, 1:] = H[1:, 0] = 1
        GG = (G.double() @ G.double().T)
        # Tikhonov term relative to the residuals' scale, so it regularises without dominating
        # once the residuals are small.
        H[1:, 1:] = GG + lam * (float(GG.diagonal().max()) + _EPS) * torch.eye(n_used, dtype=torch.float64,
                                                                                device=y0.device)
        rhs = torch.zeros(n_used + 1, 1, dtype=torch.float64, device=y0.device)
        rhs[0] = 1
        try:
            alpha = torch.linalg.solve(H, rhs)[1:, 0].to(dtype)
        except RuntimeError:  # singular: fall back to a plain step
            alpha = torch.zeros(n_used, dtype=dtype, device=y0.device)
            alpha[(k - 1) % m if n_used == m else k - 1] = 1
        x_new = beta * (alpha @ F[:n_used]) + (1 - beta) * (alpha @ X[:n_used])
        X[k % m] = x_new
        F[k % m] = func(x_new.reshape(shape)).reshape(-1)
        steps += 1
        k += 1
    x, fx = best
    return fx.reshape(shape), _stats("anderson", steps, fx, x, tol)


def broyden(func: FixedPointMap, y0: Tensor, max_iter: int = 50, tol: float = 1e-6,
            memory: int = 30) -> tuple[Tensor, SolverStats]:
    """Broyden's ("good") quasi-Newton method on ``G(y) = F(y) − y = 0``, limited memory.

    Keeps the inverse-Jacobian estimate as ``−I + Σ u_i v_iᵀ`` (Sherman–Morrison rank-one updates,
    at most ``memory`` of them, then restarts from ``−I``), with a full step (the DEQ / torchdeq
    form without line search).
    """
    _check(max_iter, tol)
    shape = y0.shape
    x = y0.reshape(-1).clone()
    fx = func(y0).reshape(-1)
    g = fx - x
    steps = 1
    Us: list[Tensor] = []
    Vs: list[Tensor] = []

    def inv_mul(v: Tensor) -> Tensor:  # B⁻¹ v with B⁻¹ = −I + Σ u vᵀ
        out = -v
        for u, w in zip(Us, Vs):
            out = out + u * torch.dot(w, v)
        return out

    def inv_t_mul(v: Tensor) -> Tensor:  # vᵀ B⁻¹
        out = -v
        for u, w in zip(Us, Vs):
            out = out + w * torch.dot(u, v)
        return out

    best = (x, fx)
    best_res = _norm(g) / (_norm(fx) + _EPS)
    while best_res > tol and steps < max_iter:
        dx = -inv_mul(g)
        x_new = x + dx
        fx_new = func(x_new.reshape(shape)).reshape(-1)
        steps += 1
        g_new = fx_new - x_new
        dg = g_new - g
        res = _norm(g_new) / (_norm(fx_new) + _EPS)
        if res < best_res:
            best, best_res = (x_new, fx_new), res
        x, g = x_new, g_new
        # Sherman–Morrison: B⁻¹ += (dx − B⁻¹dg) (dxᵀB⁻¹) / (dxᵀ B⁻¹ dg)
        vT = inv_t_mul(dx)
        denom = torch.dot(vT, dg)
        if abs(float(denom)) < 1e-30 or len(Us) >= memory:
            Us.clear()
            Vs.clear()
            continue
        Us.append((dx - inv_mul(dg)) / denom)
        Vs.append(vT)
    x, fx = best
    return fx.reshape(shape).clone(), _stats("broyden", steps, fx, x, tol)


SOLVERS: dict[str, Callable[..., tuple[Tensor, SolverStats]]] = {
    "fixed_point": fixed_point,
    "anderson": anderson,
    "broyden": broyden,
}
"""Registry: name -> ``solver(func, y0, max_iter=..., tol=..., **options) -> (y, SolverStats)``."""


def get_solver(name: str) -> Callable[..., tuple[Tensor, SolverStats]]:
    """A solver by registry name (one-line :class:`ConfigError` for an unknown one)."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ConfigError(f"unknown solver {name!r} (choose from {', '.join(SOLVERS)})") from None
