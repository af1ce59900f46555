"""Planning a CTRL run: which transform and KL coefficient beta for an inference procedure and a KL budget.

The plan searches the transform family the paper recommends for the procedure (exp:t for Best-of-N, negexp:t for
Worst-of-N; identity is already optimal for standard sampling) for the t with the highest inference-time win rate
at the KL budget, and sets it beside the exact optimum and the identity / log baselines. The frontier is the same
question over several budgets. ``resolve_transform`` turns a run's ``--transform`` (``auto``, ``optimal`` or a
fixed spec) into the transform and beta to train with. All of it is the calibrated-space theory of theory.py.

With K reference samples per prompt (``k``), the calibrated reward takes only K+1 values and the optimum spends
more KL at a given beta (finite_k.py): beta is then chosen so that the EXPECTED KL over stores equals the budget,
and win rates are expected ones against the true base distribution. The transform's shape t is searched in the
continuum (K = infinity) and kept; ``k=None`` gives the continuum plan.
"""

from __future__ import annotations

import math

import numpy as np

from openrlhf_infalign.core import finite_k
from openrlhf_infalign.core.finite_k import K_MAX, beta_for_kl_k, expected_win_rate_k
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.core.theory import (
    as_grid,
    beta_and_optimum_for_kl,
    beta_for_kl,
    check_kl,
    optimal_transform_for_kl,
    optimum_density,
)
from openrlhf_infalign.core.transforms import Transform, parse_transform, split_spec

__all__ = ["plan", "frontier", "resolve_transform", "check_k", "N_OPTIMAL_MAX", "K_MAX"]

T_MIN, T_MAX = 0.01, 1e4
# The exact optimum's shape lives within ~1/N of the top of the calibrated scale: on the 4001-point grid it is
# good to ~2e-4 in win rate up to N = 10,000 and not beyond, so plans for larger N leave it out (with a note).
N_OPTIMAL_MAX = 10_000


def _family(inf: InferenceProcedure) -> str | None:
    return {"bon": "exp", "won": "negexp"}.get(inf.kind) if inf.n > 1 else None


def _family_point(grid, inf, family, t, kl):
    tr = parse_transform(f"{family}:t={t:.4g}")
    try:
        beta, d = beta_and_optimum_for_kl(grid, tr.phi(grid.u), kl, tr.spec)
    except ValueError:
        return tr, math.nan, -math.inf
    return tr, beta, d.win_rate(inf)


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


def _point(grid, inf, tr: Transform, kl: float, k: int | None = None) -> dict:
    if k is not None:
        beta = beta_for_kl_k(tr, kl, k)
        return {"transform": tr.spec, "beta": beta, "win_rate": expected_win_rate_k(inf, tr, beta, k)}
    beta, d = beta_and_optimum_for_kl(grid, tr.phi(grid.u), kl, tr.spec)
    return {"transform": tr.spec, "beta": beta, "win_rate": d.win_rate(inf)}


def check_k(k) -> int | None:
    """K reference samples per prompt (None = the continuum); a one-line error below 2 or above K_MAX."""
    if k is None:
        return None
    try:
        whole = not isinstance(k, bool) and float(k).is_integer()
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or int(k) < 2:
        raise ValueError(f"K (reference samples per prompt) must be an integer >= 2, got {k!r}")
    return finite_k._check_k(int(k))


def check_optimal_n(inf: InferenceProcedure) -> None:
    """ValueError for an exact optimum the grid cannot resolve (N above N_OPTIMAL_MAX)."""
    if inf.n > N_OPTIMAL_MAX:
        raise ValueError(
            f"the exact optimal transform is computed for N <= {N_OPTIMAL_MAX:,} only ({inf.spec}: its shape lies "
            f"within ~1/N of the top of the calibrated scale, finer than the planner's grid); use auto or an "
            f"exp:t / negexp:t transform"
        )


def _check_win_rates(out: dict) -> None:
    # Every transform planned here is increasing, so its optimum dominates the base: win rates lie in [1/2, 1].
    # A value outside is a numerical failure, never an answer to print.
    found = [("recommended", out["recommended"]["win_rate"])]
    found += [(name, b["win_rate"]) for name, b in out["baselines"].items()]
    if "optimal" in out:
        found.append(("optimal", out["optimal"]["win_rate"]))
    for name, w in found:
        if not (0.5 - 1e-6 <= w <= 1.0 + 1e-9):
            raise ValueError(
                f"internal error: the {name} win rate came out as {w:.6g}, outside [1/2, 1], for {out['inference']} "
                f"at KL {out['kl']:g}; please report it with this command line"
            )


def plan(inference, kl: float, with_optimal: bool = True, grid=None, k: int | None = None) -> dict:
    """Best transform and beta for (inference procedure, KL budget): the exp:t (BoN) / negexp:t (WoN) with the
    highest inference-time win rate at that KL, beside the exact optimum and the identity / log baselines.
    With ``k``, betas and win rates are those of K reference samples per prompt (module docstring).
    The JSON of `infalign plan --json` less the OpenRLHF flags, which the adapter adds (adapter/planning.py)."""
    inf = InferenceProcedure.coerce(inference)
    kl = check_kl(kl)
    k = check_k(k)
    gr = as_grid(grid)
    family = _family(inf)
    baselines = {name: _point(gr, inf, parse_transform(name), kl, k) for name in ("identity", "log")}
    if family is None:  # standard / N = 1: identity is the exact optimum
        rec = dict(baselines["identity"])
    else:
        tr, beta, wr = _search_t(gr, inf, family, kl)
        if not math.isfinite(beta):
            raise ValueError(f"no {family}:t transform reaches KL {kl:g}; use a smaller KL budget")
        rec = {"transform": tr.spec, "beta": beta, "win_rate": wr, "t": tr.params["t"]}
        if k is not None:
            rec.update(_point(gr, inf, tr, kl, k))
    for b in baselines.values():
        b.pop("transform")
    out = {"inference": inf.spec, "kl": kl, "recommended": rec}
    notes: list[str] = []
    if with_optimal and inf.n > N_OPTIMAL_MAX:
        with_optimal = False
        notes.append(
            f"the exact optimum is left out: it is computed for N <= {N_OPTIMAL_MAX:,} only (its shape lies within "
            "~1/N of the top of the calibrated scale); the recommended transform's win rate is exact"
        )
    if with_optimal:
        beta0 = rec["beta"] if k is None else beta_for_kl(rec["transform"], kl)  # the continuum's beta
        start = optimum_density(rec["transform"], beta0, gr)[1]  # near the optimum
        opt, info = optimal_transform_for_kl(inf, kl, grid=gr, start=start)
        if k is not None:  # the continuum's optimal shape, read at the K+1 bin values
            try:
                info = {**info, **_point(gr, inf, opt, kl, k), "kl": kl}
            except ValueError:
                # A shape flat near the top saturates: on K bins it cannot spend the budget at all. Its best is
                # all mass on those top bins (the smallest beta), as the continuum caps it too.
                b = finite_k.BETA_MIN
                won = expected_win_rate_k(inf, opt, b, k)
                info = {**info, "beta": b, "win_rate": won, "kl": finite_k.expected_kl_k(opt, b, k), "saturated": True}
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
    if rec["win_rate"] > 1 - 1e-6:
        notes.append("the recommended win rate is 1 to 6 digits: any t works here; a smaller KL budget suffices")
    out["notes"] = notes
    _check_win_rates(out)
    return out


def frontier(inference, transform, kls, grid=None, k: int | None = None) -> dict:
    """Win rate against KL for one transform: for each KL budget, the beta putting the optimum there and its
    inference-time win rate. ``transform`` may be ``optimal`` or ``auto`` (re-planned per KL; each point then
    names its transform); ``k`` as in plan(). Exactly the JSON of `infalign frontier --json`."""
    inf = InferenceProcedure.coerce(inference)
    k = check_k(k)
    kls = [check_kl(x) for x in kls]
    if not kls:
        raise ValueError("give at least one KL budget")
    gr = as_grid(grid)
    spec = transform.spec if isinstance(transform, Transform) else str(transform).strip()
    name = spec.partition(":")[0].lower()
    points = []
    if name == "optimal" and not isinstance(transform, Transform):
        check_optimal_n(inf)
        start = None
        for x in kls:
            tr, info = optimal_transform_for_kl(inf, x, grid=gr, start=start)
            start = optimum_density(tr, info["beta"], gr)[1]  # neighbouring KLs have neighbouring optima
            if k is not None:
                info = {**info, **_point(gr, inf, tr, x, k)}
            points.append(
                {"kl": x, "beta": info["beta"], "win_rate": info["win_rate"], "converged": info["converged"]}
            )
    elif name == "auto":
        for x in kls:
            rec = plan(inf, x, with_optimal=False, grid=gr, k=k)["recommended"]
            points.append({"kl": x, "beta": rec["beta"], "win_rate": rec["win_rate"], "transform": rec["transform"]})
    else:
        tr = transform if isinstance(transform, Transform) else parse_transform(transform)
        spec = tr.spec
        for x in kls:
            p = _point(gr, inf, tr, x, k)
            points.append({"kl": x, "beta": p["beta"], "win_rate": p["win_rate"]})
    return {"inference": inf.spec, "transform": spec, "points": points}


def resolve_transform(
    spec: str, inference=None, kl_budget: float | None = None, k: int | None = None
) -> tuple[Transform, float | None]:
    """Transform for a training run and its beta (KL coefficient for the normalised transform, or None).

    ``auto``: the plan's recommended transform (exp:t for bon, negexp:t for won, identity for standard) and its
    beta at ``kl_budget``. ``optimal``: the tabulated fixed-point optimum whose RLHF solution sits at ``kl_budget``.
    Fixed transforms: beta is the one that puts the optimum at ``kl_budget`` if given, else None. With ``k``
    (the store's K per prompt), beta puts the EXPECTED KL of the K-bin optimum at ``kl_budget``.
    """
    name, _ = split_spec(spec) if isinstance(spec, str) else ("", {})
    if name in ("optimal", "auto"):
        if inference is None or kl_budget is None:
            raise ValueError(f"transform {spec!r} needs an inference procedure and a KL budget")
        inf = InferenceProcedure.coerce(inference)
        k = check_k(k)
        if name == "auto":
            p = plan(inf, kl_budget, with_optimal=False, k=k)
            rec = p["recommended"]
            return parse_transform(rec["transform"]), rec["beta"]
        check_optimal_n(inf)
        tr, info = optimal_transform_for_kl(inf, kl_budget)
        return tr, (info["beta"] if k is None else beta_for_kl_k(tr, kl_budget, k))
    tr = parse_transform(spec)
    if kl_budget is None:
        return tr, None
    return tr, beta_for_kl_k(tr, kl_budget, check_k(k))
