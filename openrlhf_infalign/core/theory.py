"""Calibrated-space theory of KL-regularised RLHF on a transformed calibrated reward (InfAlign, section 4).

Under the reference policy the calibrated reward u is Uniform[0, 1]. The RLHF optimum for reward Phi(u) and KL
coefficient beta has density g(u) = exp(Phi(u)/beta) / Z on [0, 1] with CDF G, and

    KL(pi || pi_ref)      = int g log g du
    standard win rate     = int u g(u) du
    Best-of-N win rate    = 1 - N int u^{N-1} G(u)^N du          (best of N from pi vs best of N from pi_ref)
    Worst-of-N win rate   = N int (1-u)^{N-1} (1 - G(u))^N du    (worst of N vs worst of N)

The exact optimal transform for BoN_N / WoN_N is the fixed point g = normalise(exp(R_g / beta)) with
R_g(v) = -N^2 int_v^1 u^{N-1} G^{N-1} du  (WoN: -N^2 int_v^1 (1-u)^{N-1} (1-G)^{N-1} du): the functional
derivative of the win rate, so the fixed point maximises win rate - beta * KL. Damped iteration finds it.

Integrals use the trapezoid rule on a cosine-clustered grid (fine near u = 0 and u = 1, where low-beta optima put
their mass), with densities formed in log-space. Betas are for the normalised transforms (see transforms.py);
``optimal_transform`` takes beta in win-rate units (the coefficient of KL against the win rate itself). The planner
(which transform and beta for an inference procedure and KL budget) is planning.py, built on these pieces.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.core.transforms import Transform, parse_transform, tabulated_transform

__all__ = [
    "Grid",
    "as_grid",
    "optimum_density",
    "kl_divergence",
    "win_rate",
    "check_kl",
    "beta_for_kl",
    "beta_and_optimum_for_kl",
    "optimal_transform",
    "optimal_transform_for_kl",
    "frontier_curve",
]

GRID_POINTS = 4001
BETA_MIN, BETA_MAX = 1e-8, 1e8
# Beyond this N the trapezoid on the grid resolves u^(N-1) near u = 1 (cells of ~1.6e-3 sqrt(1 - u)) to worse than
# ~1e-6 (5e-5 at N = 1000, below 1/2 by N = 1e7);
# Best-/Worst-of-N win rates then take the substitution s = u^N (_Density._win_rate_large_n), exact for any N.
N_GRID_WIN_MAX = 64
_LARGE_N_Y = np.exp(np.linspace(math.log(1e-18), math.log(50.0), 1601))


# ----------------------------------------------------------------------------------------------------------------
# grid and densities


class Grid:
    """Quadrature grid on [0, 1]: points ``u`` and trapezoid weights ``w``; cumulative integrals from either end."""

    def __init__(self, u: np.ndarray):
        u = np.asarray(u, dtype=np.float64)
        if u.ndim != 1 or len(u) < 3 or u[0] != 0.0 or u[-1] != 1.0 or np.any(np.diff(u) <= 0):
            raise ValueError("grid must be strictly ascending points from 0 to 1 (at least 3)")
        self.u = u
        self.du = np.diff(u)
        w = np.zeros_like(u)
        w[:-1] += self.du / 2
        w[1:] += self.du / 2
        self.w = w

    @classmethod
    def cosine(cls, n: int = GRID_POINTS) -> "Grid":
        s = np.linspace(0.0, 1.0, n)
        u = 0.5 * (1.0 - np.cos(np.pi * s))
        u[0], u[-1] = 0.0, 1.0
        return cls(u)

    @classmethod
    def uniform(cls, n: int) -> "Grid":
        return cls(np.linspace(0.0, 1.0, n))

    def integral(self, f: np.ndarray) -> float:
        return float(np.dot(self.w, f))

    def cumulative(self, f: np.ndarray) -> np.ndarray:
        """F(u_i) = int_0^{u_i} f."""
        out = np.empty_like(f)
        out[0] = 0.0
        np.cumsum((f[1:] + f[:-1]) * (self.du / 2), out=out[1:])
        return out

    def cumulative_from_right(self, f: np.ndarray) -> np.ndarray:
        """S(u_i) = int_{u_i}^1 f (accurate where it is tiny, unlike total - F)."""
        seg = (f[1:] + f[:-1]) * (self.du / 2)
        out = np.empty_like(f)
        out[-1] = 0.0
        out[:-1] = np.cumsum(seg[::-1])[::-1]
        return out


_DEFAULT_GRID: Grid | None = None


def as_grid(grid=None) -> Grid:
    """The quadrature grid for ``grid``: None (the shared cosine grid), a Grid, a point count, or the points."""
    global _DEFAULT_GRID
    if grid is None:
        if _DEFAULT_GRID is None:
            _DEFAULT_GRID = Grid.cosine(GRID_POINTS)
        return _DEFAULT_GRID
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, (int, np.integer)):
        return Grid.cosine(int(grid))
    return Grid(grid)


class _Density:
    """g = exp(phi/beta)/Z on a grid, with the pieces every functional needs."""

    __slots__ = ("grid", "phi", "beta", "g", "logg", "_G", "_S")

    def __init__(self, grid: Grid, phi: np.ndarray, beta: float):
        if not (beta > 0) or not math.isfinite(beta):
            if beta == math.inf:
                phi = np.zeros_like(phi)
                beta = 1.0
            else:
                raise ValueError(f"beta must be > 0, got {beta}")
        self.grid, self.phi, self.beta = grid, phi, beta
        with np.errstate(invalid="ignore"):
            logits = phi / beta
        m = np.max(logits)
        e = np.exp(logits - m)
        z = grid.integral(e)
        self.g = e / z
        with np.errstate(divide="ignore", invalid="ignore"):
            self.logg = logits - m - math.log(z)
        self._G = self._S = None

    @property
    def G(self) -> np.ndarray:
        if self._G is None:
            self._G = np.clip(self.grid.cumulative(self.g), 0.0, 1.0)
        return self._G

    @property
    def S(self) -> np.ndarray:  # 1 - G, from the right
        if self._S is None:
            self._S = np.clip(self.grid.cumulative_from_right(self.g), 0.0, 1.0)
        return self._S

    def kl(self) -> float:
        pos = self.g > 0
        return max(float(np.dot(self.grid.w[pos], self.g[pos] * self.logg[pos])), 0.0)

    def dkl_dlogbeta(self) -> float:
        """d KL / d log(beta) = -Var_g(phi) / beta^2 (exponential family in 1/beta)."""
        pos = self.g > 0
        p = self.phi[pos]
        w = self.grid.w[pos] * self.g[pos]
        mean = float(np.dot(w, p))
        var = float(np.dot(w, (p - mean) ** 2))
        return -var / self.beta**2

    def win_rate(self, inf: InferenceProcedure) -> float:
        u, n = self.grid.u, inf.n
        if inf.kind == "standard":
            val = self.grid.integral(u * self.g)
        elif n > N_GRID_WIN_MAX:
            val = self._win_rate_large_n(inf)
        elif inf.kind == "bon":
            val = 1.0 - n * self.grid.integral(u ** (n - 1) * self.G**n)
        else:
            val = n * self.grid.integral((1.0 - u) ** (n - 1) * self.S**n)
        return float(min(max(val, 0.0), 1.0))

    def _win_rate_large_n(self, inf: InferenceProcedure) -> float:
        """Best-/Worst-of-N for N beyond what the grid resolves near u = 1 (resp. 0), exactly rewritten: with
        s = u^N (resp. (1-u)^N) = e^-y, BoN = 1 - int_0^inf e^-y G(1 - x)^N dy, WoN = int_0^inf e^-y (1 - G(x))^N dy,
        x = 1 - e^(-y/N). The mass within x of the end comes from the density, linear between grid points."""
        n = inf.n
        if inf.kind == "bon":
            dist, mass, dens = (1.0 - self.grid.u)[::-1], self.S[::-1], self.g[::-1]
        else:
            dist, mass, dens = self.grid.u, self.G, self.g
        y = _LARGE_N_Y
        x = -np.expm1(-y / n)
        i = np.clip(np.searchsorted(dist, x, side="right") - 1, 0, len(dist) - 2)
        h = x - dist[i]
        slope = (dens[i + 1] - dens[i]) / (dist[i + 1] - dist[i])
        m = np.clip(mass[i] + h * dens[i] + 0.5 * slope * h * h, 0.0, 1.0)
        with np.errstate(divide="ignore"):
            f = np.exp(-y + n * np.log1p(-m))
        # Trapezoid in log y (the integrand is a smooth bump there), plus the sliver [0, y_0] where f ~ 1.
        g = f * y
        dlog = np.diff(np.log(y))
        val = float(y[0] + np.sum((g[1:] + g[:-1]) * dlog) / 2)
        return 1.0 - val if inf.kind == "bon" else val


def _as_transform(transform) -> Transform:
    return transform if isinstance(transform, Transform) else parse_transform(transform)


def _density(transform, beta: float, grid=None) -> _Density:
    gr = as_grid(grid)
    return _Density(gr, _as_transform(transform).phi(gr.u), float(beta))


def optimum_density(transform, beta: float, grid=None) -> tuple[np.ndarray, np.ndarray]:
    """(u, g): density on [0, 1] of the RLHF optimum for reward Phi = transform at KL coefficient beta."""
    d = _density(transform, beta, grid)
    return d.grid.u, d.g


def kl_divergence(transform, beta: float, grid=None) -> float:
    """KL(pi || pi_ref) = int g log g of the RLHF optimum for (transform, beta)."""
    return _density(transform, beta, grid).kl()


def win_rate(inference, transform, beta: float, grid=None) -> float:
    """Inference-time win rate against the reference policy of the RLHF optimum for (transform, beta)."""
    return _density(transform, beta, grid).win_rate(InferenceProcedure.coerce(inference))


# ----------------------------------------------------------------------------------------------------------------
# beta for a KL budget


def check_kl(kl: float) -> float:
    """A KL budget as a float, or a one-line ValueError saying it must be a positive number of nats."""
    try:
        kl = float(kl)
    except (TypeError, ValueError):
        raise ValueError(f"KL budget must be a number, got {kl!r}") from None
    if not (kl > 0) or not math.isfinite(kl):
        raise ValueError(f"KL budget must be a positive number (nats), got {kl}")
    return kl


def beta_and_optimum_for_kl(grid: Grid, phi: np.ndarray, kl: float, name: str, x0: float | None = None) -> tuple:
    """Solve KL(beta) = kl in x = log(beta) (KL falls monotonically as beta grows): Newton on log KL, kept inside
    a bisection bracket. Returns (beta, the optimum's density: .g, .kl(), .win_rate(inference)), so a search
    over transforms pays one solve per candidate."""
    lo, hi = math.log(BETA_MIN), math.log(BETA_MAX)
    d_lo = _Density(grid, phi, BETA_MIN)
    kl_max = d_lo.kl()
    if kl >= kl_max:
        raise ValueError(
            f"KL {kl:g} is out of reach for transform {name}: its RLHF optimum reaches at most KL {kl_max:.4g} "
            f"(beta >= {BETA_MIN:g} on a {len(grid.u)}-point grid: all mass on the top of the calibrated scale); "
            f"use a smaller KL budget"
        )
    if x0 is None:
        fin = phi[np.isfinite(phi)]
        var = float(np.var(fin)) if len(fin) else 0.0
        x0 = 0.5 * math.log(max(var, 1e-12) / (2 * kl))  # large-beta limit KL ~ Var/(2 beta^2)
    x = min(max(x0, lo + 1), hi - 1)
    target = math.log(kl)
    d = None
    for _ in range(200):
        d = _Density(grid, phi, math.exp(x))
        k = d.kl()
        if k <= 0:
            f, slope = -math.inf, 0.0
        else:
            f = math.log(k) - target
            slope = d.dkl_dlogbeta() / k
        if abs(f) < 1e-11:
            break
        if f > 0:
            lo = x  # KL too big -> beta must grow
        else:
            hi = x
        if hi - lo < 1e-13:
            break
        step = -f / slope if slope < 0 and math.isfinite(f) else math.nan
        nx = x + max(min(step, 3.0), -3.0) if math.isfinite(step) else math.nan
        x = nx if lo < nx < hi else 0.5 * (lo + hi)
    return math.exp(x), d


def beta_for_kl(transform, kl: float, grid=None) -> float:
    """KL coefficient (for the normalised transform) whose RLHF optimum has KL(pi || pi_ref) = kl."""
    kl = check_kl(kl)
    tr = _as_transform(transform)
    gr = as_grid(grid)
    return beta_and_optimum_for_kl(gr, tr.phi(gr.u), kl, tr.spec)[0]


# ----------------------------------------------------------------------------------------------------------------
# the exact optimal transform


def _cdfs(grid: Grid, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.clip(grid.cumulative(g), 0.0, 1.0), np.clip(grid.cumulative_from_right(g), 0.0, 1.0)


def _win_gradient_phi(grid: Grid, inf: InferenceProcedure, G: np.ndarray, S: np.ndarray) -> tuple:
    """R_g normalised onto [0, 1] and its scale N^2 int_0^1 h: R_g = scale * (phi - 1)."""
    u, n = grid.u, inf.n
    if inf.kind == "won":
        h = (1.0 - u) ** (n - 1) * S ** (n - 1)
    else:  # bon (standard: n = 1, h = 1, identity)
        h = u ** (n - 1) * G ** (n - 1)
    tail = grid.cumulative_from_right(h)
    total = tail[0]
    if total <= 0:
        return u.copy(), 1.0
    return 1.0 - tail / total, n * n * total


def _beta_for_kl_capped(grid, phi, kl, inf, x0):
    """beta_for_kl, except past the KL where the win rate saturates (the win-rate gradient R_g is flat on top, so
    no beta reaches the budget): then the smallest beta, i.e. the optimum that spends less KL than allowed."""
    try:
        return beta_and_optimum_for_kl(grid, phi, kl, f"optimal({inf.spec})", x0)
    except ValueError:
        return BETA_MIN, _Density(grid, phi, BETA_MIN)


def _fixed_point(inf, grid: Grid, g0: np.ndarray, beta: float | None, kl: float | None, damping, tol, max_iter):
    """Damped iteration g <- damping * g + (1 - damping) * normalise(exp(R_g / beta)). With ``kl`` given, beta is
    re-chosen every step so the new density sits at that KL (the fixed point is then the optimum at that KL)."""
    if not 0 <= damping < 1:
        raise ValueError(f"damping must be in [0, 1), got {damping}")
    g = g0
    residual, it, converged = math.inf, 0, False
    beta_n = x0 = None
    for it in range(1, max_iter + 1):
        phi, scale = _win_gradient_phi(grid, inf, *_cdfs(grid, g))
        if kl is not None:
            beta_n, t = _beta_for_kl_capped(grid, phi, kl, inf, x0)
            x0 = math.log(beta_n)
        else:
            beta_n = beta / scale
            t = _Density(grid, phi, beta_n)
        residual = grid.integral(np.abs(t.g - g))
        if residual < tol:
            g, converged = t.g, True
            break
        g = damping * g + (1.0 - damping) * t.g
    phi, scale = _win_gradient_phi(grid, inf, *_cdfs(grid, g))
    if kl is not None:
        beta_n = _beta_for_kl_capped(grid, phi, kl, inf, x0)[0]
        beta_raw = beta_n * scale
    else:
        beta_raw, beta_n = beta, beta / scale
    return phi, beta_n, beta_raw, dict(converged=converged, iterations=it, residual=residual)


def _optimal_result(inf, grid, phi, beta_n, beta_raw, info, kl_target=None):
    tr = tabulated_transform(grid.u, phi, inference=inf.spec, **({} if kl_target is None else {"kl": kl_target}))
    d = _Density(grid, tr.phi(grid.u), beta_n)
    info = dict(info, beta=float(beta_n), beta_win_rate_units=float(beta_raw), kl=d.kl(), win_rate=d.win_rate(inf))
    if not info["converged"]:
        warnings.warn(
            f"optimal transform for {inf.spec} did not converge: residual {info['residual']:.2e} after "
            f"{info['iterations']} iterations (try a higher damping or more iterations)",
            RuntimeWarning,
            stacklevel=3,
        )
    return tr, info


def optimal_transform(
    inference, beta: float, damping: float = 0.9, tol: float = 1e-8, max_iter: int = 3000, grid=None
) -> tuple[Transform, dict]:
    """Exact optimal transform for ``inference`` at KL coefficient ``beta`` (in win-rate units: the optimum
    maximises win rate - beta * KL) by the damped fixed point. Returns (tabulated normalised transform, info) where
    info has converged, iterations, residual (L1 distance of the last update), beta (for the normalised
    transform, = what to train with), kl and win_rate."""
    inf = InferenceProcedure.coerce(inference)
    if not (beta > 0):
        raise ValueError(f"beta must be > 0, got {beta}")
    gr = as_grid(grid)
    g0 = np.ones_like(gr.u)
    phi, beta_n, beta_raw, info = _fixed_point(inf, gr, g0, float(beta), None, damping, tol, max_iter)
    return _optimal_result(inf, gr, phi, beta_n, beta_raw, info)


def optimal_transform_for_kl(
    inference,
    kl: float,
    damping: float = 0.9,
    tol: float = 1e-8,
    max_iter: int = 3000,
    grid=None,
    start: np.ndarray | None = None,
) -> tuple[Transform, dict]:
    """The optimal transform whose RLHF optimum sits at KL(pi || pi_ref) = kl; info as in optimal_transform
    (info['beta_win_rate_units'] is the beta in optimal_transform's convention that gives the same optimum).
    ``start``: a density on the grid to iterate from (a neighbouring optimum converges in fewer steps)."""
    inf = InferenceProcedure.coerce(inference)
    kl = check_kl(kl)
    gr = as_grid(grid)
    # Warm start (default: the identity optimum at this KL, the answer for standard and close for small N).
    g0 = start if start is not None else beta_and_optimum_for_kl(gr, gr.u.copy(), kl, "identity")[1].g
    phi, beta_n, beta_raw, info = _fixed_point(inf, gr, g0, None, kl, damping, tol, max_iter)
    tr, info = _optimal_result(inf, gr, phi, beta_n, beta_raw, info, kl_target=kl)
    # Past saturation the optimum uses less KL than the budget (info['kl'] says how much): more KL cannot help.
    info["saturated"] = info["kl"] < kl * (1 - 1e-6)
    return tr, info


# ----------------------------------------------------------------------------------------------------------------
# curves for plots


def frontier_curve(inference, transform, betas=None, grid=None) -> tuple[np.ndarray, np.ndarray]:
    """(kl, win_rate) along a sweep of beta, for plots (no root finding; ``optimal`` is swept in win-rate beta
    with warm starts)."""
    inf = InferenceProcedure.coerce(inference)
    gr = as_grid(grid)
    kls, wins = [], []
    if isinstance(transform, str) and transform.strip().lower() == "optimal":
        betas = np.geomspace(3.0, 0.003, 40) if betas is None else betas
        g = np.ones_like(gr.u)
        for b in betas:
            phi, beta_n, _, info = _fixed_point(inf, gr, g, float(b), None, 0.9, 1e-7, 3000)
            d = _Density(gr, phi, beta_n)
            g = d.g
            kls.append(d.kl())
            wins.append(d.win_rate(inf))
    else:
        tr = _as_transform(transform)
        phi = tr.phi(gr.u)
        betas = np.geomspace(10.0, 1e-3, 60) if betas is None else betas
        for b in betas:
            d = _Density(gr, phi, float(b))
            kls.append(d.kl())
            wins.append(d.win_rate(inf))
    return np.asarray(kls), np.asarray(wins)
