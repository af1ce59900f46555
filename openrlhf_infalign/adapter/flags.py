"""InfAlign's flags on OpenRLHF's own ``train_ppo_ray`` parser, in its dotted style (``hierarchize`` nests them).

``TrainSettings`` declares each flag once (:mod:`openrlhf_infalign.options`): ``--reward_wrapper NAME`` (also
``--reward.wrapper``) -> ``args.reward.wrapper``; ``--infalign.x`` -> ``args.infalign.x``. Added by the ``openrlhf``
console before upstream parses, or by the source patch through the wrapper factories' ``add_arguments``. Options the
parser already has (a patched OpenRLHF defines ``--reward.wrapper`` natively) are left alone, so both paths can meet
on one parser.

Not a flag: ``args.infalign.explicit_dests``, the sorted dests the user gave on the command line, set by the
``openrlhf`` console before ``train()``. It tells a flag left at its default from one given with the default's value
(an explicit --algo.kl.init_coef wins over the plan's); absent (the source patch path), a value equal to upstream's
default counts as not given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Optional

from openrlhf_infalign import options
from openrlhf_infalign.adapter.registry import WRAPPER_GROUP, known_wrappers
from openrlhf_infalign.options import option

__all__ = ["TRAIN_DEFAULTS", "TrainSettings", "add_infalign_arguments"]

GROUP = (
    "InfAlign (openrlhf-infalign)\nInference-aware alignment: train on the calibrated-and-transformed reward "
    "Phi(C(x, y)) (see `infalign plan` for the transform and KL coefficient)."
)


@dataclass(kw_only=True)
class TrainSettings:
    """The ``openrlhf train_ppo`` flags InfAlign adds to upstream's; fields are in `--help` order."""

    reward_wrapper: Optional[str] = option(
        None,
        flags=("--reward_wrapper", "--reward.wrapper"),
        dest="reward.wrapper",
        metavar="NAME",
        help="reward wrapper applied to every sample's reward before baselines, normalisation, clipping and KL "
        f"shaping, resolved through the entry-point group `{WRAPPER_GROUP}`: infalign.ctrl = calibrate + transform, "
        "infalign.calibrate = calibrate only (identity transform), infalign.direct = calibrate, then each prompt "
        "group's unbiased estimator of the Best-/Worst-of-N win rate (leave-one-out baseline; needs "
        "--rollout.n_samples_per_prompt > N); none: plain OpenRLHF rewards",
    )
    store: Optional[str] = option(
        None,
        flags=("--infalign.store",),
        metavar="DIR",
        doc_default="required with a wrapper",
        help="reference reward store of the training prompts (`infalign calibrate`), read once by the driver and "
        "shipped to the trainer actor through Ray (other nodes need no shared filesystem)",
    )
    inference: str = option(
        "bon:4",
        flags=("--infalign.inference",),
        metavar="PROC",
        help="inference procedure the policy is trained for: standard | bon:N (Best-of-N) | won:N (Worst-of-N, e.g. "
        "jailbreak robustness)",
    )
    transform: str = option(
        "auto",
        flags=("--infalign.transform",),
        metavar="SPEC",
        help="transform Phi of the calibrated reward: auto | identity | exp:t=T | negexp:t=T | log | power:k=K | "
        "optimal; auto = the plan for --infalign.inference at --infalign.kl_budget (exp:t for bon, negexp:t for won, "
        "identity for standard), optimal = the exact fixed-point optimum at that budget; all normalised to [0, 1]; "
        "infalign.direct has none (leave it at auto)",
    )
    kl_budget: Optional[float] = option(
        None,
        flags=("--infalign.kl_budget",),
        metavar="NATS",
        help="KL(pi || pi_ref) budget in nats the transform (or infalign.direct) is planned for (needed by auto and "
        "optimal); the plan's KL coefficient for the run's estimator, samples per prompt and the store's median K "
        "becomes --algo.kl.init_coef unless that is given",
    )
    accept_unplanned_kl: bool = option(
        False,
        flags=("--infalign.accept_unplanned_kl",),
        help="train a planned transform even where no fixed KL coefficient gives the plan (group_norm, "
        "--algo.kl.use_loss, --algo.kl.estimator k2/k3, --algo.kl.target): --algo.kl.init_coef is left as given "
        "and the KL will not follow the plan; off: stop",
    )
    on_missing: str = option(
        "error",
        flags=("--infalign.on_missing",),
        choices=["error", "raw"],
        help="a training prompt absent from the store: error (stop, naming its key and text) or raw (keep its raw "
        "reward, which is not in [0, 1], and warn with the count)",
    )
    allow_mismatch: bool = option(
        False,
        flags=("--infalign.allow_mismatch",),
        help="train even if the store's run record (template and chat template, sampling, policy, reward source, "
        "normalisation) differs from this run's: one warning per differing field instead of an error",
    )
    cpu: bool = option(
        False,
        flags=("--infalign.cpu",),
        help="run OpenRLHF on CPUs only (CI, laptops): the CPU mode (openrlhf_infalign/adapter/cpu/) in the driver "
        "and in every Ray worker; GPU runs never touch it",
    )
    eval_store: Optional[str] = option(
        None,
        flags=("--infalign.eval_store",),
        metavar="DIR",
        doc_default="the training store",
        help="reference store of the eval prompts (`infalign calibrate` on --eval.dataset) for the Best-of-N-aware "
        "evaluation",
    )
    eval_n: Optional[str] = option(
        None,
        flags=("--infalign.eval_n",),
        metavar="N,N,...",
        doc_default="powers of 2 up to min(M, K)",
        help="the N of the Best-/Worst-of-N win rates logged at evaluation, e.g. 1,2,4 (M: --eval.n_samples_per_prompt, "
        "K: the eval store's)",
    )
    eval_at_start: Optional[bool] = option(
        None,
        flags=("--infalign.eval_at_start",),
        off_flag="--infalign.no_eval_at_start",
        doc_default="on with a wrapper and --eval.dataset",
        help="evaluate once at step 0, before any update (the base policy's win rates, about 0.5)",
    )


#: The defaults, where a namespace lacks our flags (a plain upstream args, a patched OpenRLHF, a test's namespace).
TRAIN_DEFAULTS = TrainSettings()


def add_infalign_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``--reward_wrapper``/``--reward.wrapper`` and the ``--infalign.*`` flags (idempotent)."""
    options.add_arguments(parser, TrainSettings, group_title=GROUP, skip_existing=True)
    # --help states each default (upstream's parser shows none) and the wrappers installed here.
    for f in fields(TrainSettings):
        for flag in f.metadata["flags"]:
            action = parser._option_string_actions.get(flag)
            if action is not None and not action.help.endswith("."):
                default = options.default_words(f).replace("`", "")
                action.help = f"{action.help[0].upper()}{action.help[1:]}. Default: {default}."
    action = parser._option_string_actions.get("--reward_wrapper")
    if action is not None and "(installed:" not in action.help:
        action.help += f" (installed: {', '.join(known_wrappers()) or 'none'})"
    return parser
