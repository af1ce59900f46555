"""What `--algo.kl.init_coef` means in OpenRLHF 0.11.2, per advantage estimator: the planned beta in upstream's flag.

The plan's beta is the coefficient of E[Phi(u)] - beta * KL(pi || pi_ref). OpenRLHF adds the k1 KL penalty
``init_coef * log(pi/pi_ref)`` to the reward AFTER the estimator has shaped the reward per group of n samples
(``RemoteExperienceMaker.compute_advantages_and_returns``), so the estimator decides which coefficient trains
toward the planned optimum:

* gae, reinforce, rloo, flash_reinforce: the reward reaches the gradient unscaled (rloo's leave-one-out mean and
  the critic are baselines; flash_reinforce's batch mean includes the sample, a 1/batch effect): coef = beta.
* reinforce_baseline, dr_grpo: the group mean includes the sample itself, so the reward's expected gradient is
  scaled by (n-1)/n and the KL's is not: effective beta = coef * n/(n-1), hence coef = beta * (n-1)/n.
* group_norm: rewards are divided by their group's standard deviation before the KL is added: no fixed coef.
* ``--algo.kl.use_loss`` (KL as a loss term), ``--algo.kl.estimator k2|k3`` (not KL's gradient in the reward) and
  ``--algo.kl.target`` (upstream's adaptive controller, steering its per-token mean KL) break the mapping as well.

Advantage whitening afterwards rescales reward and KL alike: it changes the step size, not the fixed point. This
module imports no openrlhf package (`infalign plan` uses it and must start fast).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["ESTIMATORS", "PlanNotApplicable", "kl_coef_for_beta", "beta_for_kl_coef", "unplanned_reason"]

# estimator -> does it shape with a group baseline that includes the sample (None: no fixed coefficient)
ESTIMATORS = {
    "gae": "keeps beta",
    "reinforce": "keeps beta",
    "rloo": "keeps beta (leave-one-out baseline)",
    "flash_reinforce": "keeps beta (batch-mean baseline)",
    "reinforce_baseline": "init_coef = beta * (n-1)/n (group mean includes the sample)",
    "dr_grpo": "init_coef = beta * (n-1)/n (group mean includes the sample)",
    "group_norm": "no fixed coefficient (rewards divided by the group's std before the KL is added)",
}
_GROUP = ("rloo", "reinforce_baseline", "dr_grpo", "group_norm")
_SELF_MEAN = ("reinforce_baseline", "dr_grpo")
ACCEPT_FLAG = "--infalign.accept_unplanned_kl"


class PlanNotApplicable(ValueError):
    """No fixed --algo.kl.init_coef trains toward the planned optimum under these OpenRLHF settings."""


def _check(estimator: str, n: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_samples_per_prompt must be an integer >= 1, got {n!r}")
    if estimator in _GROUP and n < 2:
        raise ValueError(
            f"estimator {estimator} needs --rollout.n_samples_per_prompt >= 2 (a group baseline), got {n}"
        )


def unplanned_reason(
    estimator: str, n: int, kl_use_loss: bool = False, kl_estimator: str = "k1", kl_target: Optional[float] = None
) -> Optional[str]:
    """Why no fixed coefficient gives the plan under these settings (None when one does)."""
    _check(estimator, n)
    if estimator == "group_norm":
        return (
            "--algo.advantage.estimator group_norm divides the rewards by their group's std before the KL is added, "
            "so no fixed KL coefficient gives the planned optimum (and it erases most of the transform's shape); "
            "use rloo, reinforce_baseline, dr_grpo, reinforce or gae"
        )
    if kl_use_loss:
        return "--algo.kl.use_loss moves the KL out of the reward, where the plan puts it; drop --algo.kl.use_loss"
    if (kl_estimator or "k1") != "k1":
        return f"--algo.kl.estimator {kl_estimator} in the reward is not the KL's gradient; use --algo.kl.estimator k1"
    if kl_target is not None:
        return (
            "--algo.kl.target turns on upstream's adaptive KL controller, which steers its per-token mean KL rather "
            "than holding the planned coefficient; drop --algo.kl.target"
        )
    return None


def kl_coef_for_beta(beta: float, estimator: str = "gae", n: int = 1) -> float:
    """The --algo.kl.init_coef that trains toward the optimum at effective coefficient beta."""
    _check(estimator, n)
    if estimator == "group_norm":
        raise PlanNotApplicable(unplanned_reason(estimator, n))
    return beta * (n - 1) / n if estimator in _SELF_MEAN else beta


def beta_for_kl_coef(coef: float, estimator: str = "gae", n: int = 1) -> float:
    """The effective beta that --algo.kl.init_coef coef gives under this estimator (inverse of the above)."""
    _check(estimator, n)
    if estimator == "group_norm":
        raise PlanNotApplicable(unplanned_reason(estimator, n))
    return coef * n / (n - 1) if estimator in _SELF_MEAN else coef
