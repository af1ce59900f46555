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
``optimal_transform`` takes beta in win-rate units (the coefficient of KL against the win rate itself).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from openrlhf_infalign.core.transforms import Transform, parse_transform, tabulated_transform

__all__ = [
    "InferenceProcedure",
    "Grid",
    "optimum_density",
    "kl_divergence",
    "win_rate",
    "beta_for_kl",
    "optimal_transform",
    "optimal_transform_for_kl",
    "plan",
    "frontier",
]

GRID_POINTS = 4001
BETA_MIN, BETA_MAX = 1e-8, 1e8


# ----------------------------------------------------------------------------------------------------------------
# inference procedures


@dataclass(frozen=True)
class InferenceProcedure:
    """How the policy is used at inference time: ``standard`` (one sample), ``bon:N`` (Best-of-N with the reward
    model), ``won:N`` (Worst-of-N: the worst of N samples, e.g. jailbreak robustness). standard means n = 1."""

    kind: str
    n: int = 1

    def __post_init__(self):
        if self.kind not in ("standard", "bon", "won"):
            raise ValueError(f"unknown inference procedure kind {self.kind!r}; use standard, bon:N or won:N")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"inference procedure needs N >= 1, got {self.n!r}")
        if self.kind == "standard" and self.n != 1:
            raise ValueError("standard inference has n = 1")

    @classmethod
    def parse(cls, spec: str) -> "InferenceProcedure":
        s = str(spec).strip().lower()
        if s in ("standard", "std"):
            return cls("standard", 1)
        kind, sep, n = s.partition(":")
        if kind not in ("bon", "won") or not sep:
            raise ValueError(f"bad inference procedure {spec!r}; use standard, bon:N or won:N (e.g. bon:4)")
        try:
            num = int(n)
        except ValueError:
            raise ValueError(f"bad inference procedure {spec!r}: N={n!r} is not an integer (e.g. bon:4)") from None
        if num < 1:
            raise ValueError(f"bad inference procedure {spec!r}: N must be >= 1")
        return cls(kind, num)

    @classmethod
    def coerce(cls, x) -> "InferenceProcedure":
        return x if isinstance(x, cls) else cls.parse(x)

    @property
    def spec(self) -> str:
        return "standard" if self.kind == "standard" else f"{self.kind}:{self.n}"

    def __str__(self) -> str:
        return self.spec


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


def _grid(grid=None) -> Grid:
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
        elif inf.kind == "bon":
            val = 1.0 - n * self.grid.integral(u ** (n - 1) * self.G**n)
        else:
            val = n * self.grid.integral((1.0 - u) ** (n - 1) * self.S**n)
        return float(min(max(val, 0.0), 1.0))


def _as_transform(transform) -> Transform:
    return transform if isinstance(transform, Transform) else parse_transform(transform)


def _density(transform, beta: float, grid=None) -> _Density:
    gr = _grid(grid)
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


def _check_kl(kl: float) -> float:
    try:
        kl = float(kl)
    except (TypeError, ValueError):
        raise ValueError(f"KL budget must be a number, got {kl!r}") from None
    if not (kl > 0) or not math.isfinite(kl):
        raise ValueError(f"KL budget must be a positive number (nats), got {kl}")
    return kl


def _beta_for_kl_phi(grid: Grid, phi: np.ndarray, kl: float, name: str, x0: float | None = None) -> tuple:
    """Solve KL(beta) = kl in x = log(beta) (KL falls monotonically as beta grows): Newton on log KL, kept inside
    a bisection bracket. Returns (beta, density)."""
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
    kl = _check_kl(kl)
    tr = _as_transform(transform)
    gr = _grid(grid)
    return _beta_for_kl_phi(gr, tr.phi(gr.u), kl, tr.spec)[0]


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
        return _beta_for_kl_phi(grid, phi, kl, f"optimal({inf.spec})", x0)
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
    gr = _grid(grid)
    g0 = np.ones_like(gr.u)
    phi, beta_n, beta_raw, info = _fixed_point(inf, gr, g0, float(beta), None, damping, tol, max_iter)
    return _optimal_result(inf, gr, phi, beta_n, beta_raw, info)


def optimal_transform_for_kl(
    inference, kl: float, damping: float = 0.9, tol: float = 1e-8, max_iter: int = 3000, grid=None
) -> tuple[Transform, dict]:
    """The optimal transform whose RLHF optimum sits at KL(pi || pi_ref) = kl; info as in optimal_transform
    (info['beta_win_rate_units'] is the beta in optimal_transform's convention that gives the same optimum)."""
    return _optimal_for_kl(InferenceProcedure.coerce(inference), _check_kl(kl), _grid(grid), damping, tol, max_iter)


def _optimal_for_kl(inf, kl, gr, damping=0.9, tol=1e-8, max_iter=3000, start=None):
    # Warm start (default: the identity optimum at this KL, the answer for standard and close for small N).
    g0 = start if start is not None else _beta_for_kl_phi(gr, gr.u.copy(), kl, "identity")[1].g
    phi, beta_n, beta_raw, info = _fixed_point(inf, gr, g0, None, kl, damping, tol, max_iter)
    tr, info = _optimal_result(inf, gr, phi, beta_n, beta_raw, info, kl_target=kl)
    # Past saturation the optimum uses less KL than the budget (info['kl'] says how much): more KL cannot help.
    info["saturated"] = info["kl"] < kl * (1 - 1e-6)
    return tr, info


# ----------------------------------------------------------------------------------------------------------------
# planning


def _family(inf: InferenceProcedure) -> str | None:
    return {"bon": "exp", "won": "negexp"}.get(inf.kind) if inf.n > 1 else None


def _family_point(grid, inf, family, t, kl):
    tr = parse_transform(f"{family}:t={t:.4g}")
    try:
        beta, d = _beta_for_kl_phi(grid, tr.phi(grid.u), kl, tr.spec)
    except ValueError:
        return tr, math.nan, -math.inf
    return tr, beta, d.win_rate(inf)


T_MIN, T_MAX = 0.01, 1e4


def _search_t(grid, inf, family, kl) -> tuple[Transform, float, float]:
    """Best t of the exp/negexp family at this KL: a coarse log-spaced scan, then golden section in log t."""
    ts = np.geomspace(T_MIN, T_MAX, 37)
    wins = [_family_point(grid, inf, family, t, kl)[2] for t in ts]
    i = int(np.argmax(wins))
    a, b = math.log(ts[max(i - 1, 0)]), math.log(ts[min(i + 1, len(ts) - 1)])
    invphi = (math.sqrt(5) - 1) / 2
    c, e = b - invphi * (b - a), a + invphi * (b - a)
    fc = _family_point(grid, inf, family, math.exp(c), kl)[2]
    fe = _family_point(grid, inf, family, math.exp(e), kl)[2]
    while b - a > 2e-3:  # t to ~0.1%; the spec keeps 4 significant digits
        if fc >= fe:
            b, e, fe = e, c, fc
            c = b - invphi * (b - a)
            fc = _family_point(grid, inf, family, math.exp(c), kl)[2]
        else:
            a, c, fc = c, e, fe
            e = a + invphi * (b - a)
            fe = _family_point(grid, inf, family, math.exp(e), kl)[2]
    best = max([(wins[i], ts[i]), (fc, math.exp(c)), (fe, math.exp(e))])
    # Re-evaluate at the rounded t the spec string carries, so spec, beta and win rate agree.
    return _family_point(grid, inf, family, best[1], kl)


def _point(grid, inf, tr: Transform, kl: float) -> dict:
    beta, d = _beta_for_kl_phi(grid, tr.phi(grid.u), kl, tr.spec)
    return {"transform": tr.spec, "beta": beta, "win_rate": d.win_rate(inf)}


def openrlhf_args(inf: InferenceProcedure, transform_spec: str, beta: float, kl: float) -> list[str]:
    return [
        "--reward_wrapper",
        "infalign.ctrl",
        "--infalign.inference",
        inf.spec,
        "--infalign.transform",
        transform_spec,
        "--infalign.kl_budget",
        f"{kl:g}",
        "--algo.kl.init_coef",
        f"{beta:.4g}",
    ]


def plan(inference, kl: float, with_optimal: bool = True, grid=None) -> dict:
    """Best transform and beta for (inference procedure, KL budget): the exp:t (BoN) / negexp:t (WoN) with the
    highest inference-time win rate at that KL, beside the exact optimum and the identity / log baselines.
    Exactly the JSON of `infalign plan --json`."""
    inf = InferenceProcedure.coerce(inference)
    kl = _check_kl(kl)
    gr = _grid(grid)
    family = _family(inf)
    baselines = {name: _point(gr, inf, parse_transform(name), kl) for name in ("identity", "log")}
    if family is None:  # standard / N = 1: identity is the exact optimum
        rec = dict(baselines["identity"])
    else:
        tr, beta, wr = _search_t(gr, inf, family, kl)
        if not math.isfinite(beta):
            raise ValueError(f"no {family}:t transform reaches KL {kl:g}; use a smaller KL budget")
        rec = {"transform": tr.spec, "beta": beta, "win_rate": wr, "t": tr.params["t"]}
    for b in baselines.values():
        b.pop("transform")
    out = {"inference": inf.spec, "kl": kl, "recommended": rec}
    notes: list[str] = []
    if with_optimal:
        start = _Density(gr, parse_transform(rec["transform"]).phi(gr.u), rec["beta"]).g  # near the optimum
        _, info = _optimal_for_kl(inf, kl, gr, start=start)
        out["optimal"] = {
            "win_rate": info["win_rate"],
            "beta": info["beta"],
            "converged": info["converged"],
            "iterations": info["iterations"],
            "residual": info["residual"],
            "kl": info["kl"],
            "saturated": info["saturated"],
        }
        out["gap_to_optimal"] = info["win_rate"] - rec["win_rate"]
        if not info["converged"]:
            notes.append(
                f"the exact optimum did not converge (residual {info['residual']:.1e}); its win rate is approximate"
            )
        if info["saturated"]:
            notes.append(
                f"the win rate saturates: the exact optimum needs only KL {info['kl']:.3g}; a smaller budget suffices"
            )
    out["baselines"] = baselines
    out["openrlhf_args"] = openrlhf_args(inf, rec["transform"], rec["beta"], kl)
    if rec["win_rate"] > 1 - 1e-6:
        notes.append("the recommended win rate is 1 to 6 digits: any t works here; a smaller KL budget suffices")
    out["notes"] = notes
    return out


def frontier(inference, transform, kls, grid=None) -> dict:
    """Win rate against KL for one transform: for each KL budget, the beta putting the optimum there and its
    inference-time win rate. ``transform`` may be ``optimal`` or ``auto`` (re-planned per KL; each point then
    names its transform). Exactly the JSON of `infalign frontier --json`."""
    inf = InferenceProcedure.coerce(inference)
    kls = [_check_kl(k) for k in kls]
    if not kls:
        raise ValueError("give at least one KL budget")
    gr = _grid(grid)
    spec = transform.spec if isinstance(transform, Transform) else str(transform).strip()
    name = spec.partition(":")[0].lower()
    points = []
    if name == "optimal" and not isinstance(transform, Transform):
        start = None
        for k in kls:
            tr, info = _optimal_for_kl(inf, k, gr, start=start)
            start = _Density(gr, tr.phi(gr.u), info["beta"]).g  # neighbouring KLs have neighbouring optima
            points.append(
                {"kl": k, "beta": info["beta"], "win_rate": info["win_rate"], "converged": info["converged"]}
            )
    elif name == "auto":
        for k in kls:
            rec = plan(inf, k, with_optimal=False, grid=gr)["recommended"]
            points.append({"kl": k, "beta": rec["beta"], "win_rate": rec["win_rate"], "transform": rec["transform"]})
    else:
        tr = _as_transform(transform)
        spec = tr.spec
        for k in kls:
            p = _point(gr, inf, tr, k)
            points.append({"kl": k, "beta": p["beta"], "win_rate": p["win_rate"]})
    return {"inference": inf.spec, "transform": spec, "points": points}


def frontier_curve(inference, transform, betas=None, grid=None) -> tuple[np.ndarray, np.ndarray]:
    """(kl, win_rate) along a sweep of beta, for plots (no root finding; ``optimal`` is swept in win-rate beta
    with warm starts)."""
    inf = InferenceProcedure.coerce(inference)
    gr = _grid(grid)
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
