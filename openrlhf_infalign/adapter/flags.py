"""InfAlign's flags on OpenRLHF's own ``train_ppo_ray`` parser, in its dotted style (``hierarchize`` nests them).

``--reward_wrapper NAME`` (also ``--reward.wrapper``) -> ``args.reward.wrapper``; ``--infalign.x`` ->
``args.infalign.x``. Added by the ``openrlhf`` console before upstream parses, or by the source patch through the
wrapper factories' ``add_arguments``. Options the parser already has (a patched OpenRLHF defines
``--reward.wrapper`` natively) are left alone, so both paths can meet on one parser.

Not a flag: ``args.infalign.explicit_dests``, the sorted dests the user gave on the command line, set by the
``openrlhf`` console (:mod:`.console`) before ``train()``. It tells a flag left at its default from one given with
the default's value (an explicit --algo.kl.init_coef wins over the plan's); absent (the source patch path), a value
equal to upstream's default counts as not given.
"""

from __future__ import annotations

import argparse

from openrlhf_infalign.adapter.registry import WRAPPER_GROUP, known_wrappers

__all__ = ["add_infalign_arguments", "DEFAULTS"]

DEFAULTS = {
    "inference": "bon:4",
    "transform": "auto",
    "on_missing": "error",
}


def _has(parser: argparse.ArgumentParser, option: str) -> bool:
    return option in parser._option_string_actions


def add_infalign_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``--reward_wrapper``/``--reward.wrapper`` and the ``--infalign.*`` flags (idempotent)."""
    group = parser.add_argument_group(
        "InfAlign (openrlhf-infalign)",
        "Inference-aware alignment: train on the calibrated-and-transformed reward Phi(C(x, y)) "
        "(see `infalign plan` for the transform and KL coefficient).",
    )

    def add(*options, **kwargs):
        options = [o for o in options if not _has(parser, o)]
        if options:
            group.add_argument(*options, **kwargs)

    names = ", ".join(known_wrappers()) or "none installed"
    add(
        "--reward_wrapper",
        "--reward.wrapper",
        dest="reward.wrapper",
        type=str,
        default=None,
        metavar="NAME",
        help="Reward wrapper applied to every sample's reward before baselines, normalisation, clipping and KL "
        f"shaping, resolved through the entry-point group {WRAPPER_GROUP!r} (installed: {names}). "
        "infalign.ctrl = calibrate + transform, infalign.calibrate = calibrate only (identity transform). "
        "Default: None (plain OpenRLHF rewards).",
    )
    add(
        "--infalign.store",
        type=str,
        default=None,
        metavar="DIR",
        help="Reference reward store of the training prompts (built by `infalign calibrate`). Read once by the "
        "driver and shipped to the trainer actor through Ray: other nodes need no shared filesystem. "
        "Required with --reward_wrapper infalign.*. Default: None.",
    )
    add(
        "--infalign.inference",
        type=str,
        default=DEFAULTS["inference"],
        metavar="PROC",
        help="Inference procedure the policy is trained for: standard | bon:N (Best-of-N) | won:N (Worst-of-N, "
        f"e.g. jailbreak robustness). Default: {DEFAULTS['inference']}.",
    )
    add(
        "--infalign.transform",
        type=str,
        default=DEFAULTS["transform"],
        metavar="SPEC",
        help="Transform Phi of the calibrated reward: auto | identity | exp:t=T | negexp:t=T | log | power:k=K | "
        "optimal. auto = the plan for --infalign.inference at --infalign.kl_budget (exp:t for bon, negexp:t for won, "
        "identity for standard); optimal = the exact fixed-point optimum at that budget. All are normalised to "
        f"[0, 1]. Default: {DEFAULTS['transform']}.",
    )
    add(
        "--infalign.kl_budget",
        type=float,
        default=None,
        metavar="NATS",
        help="KL(pi || pi_ref) budget in nats the transform is planned for (needed by auto and optimal). "
        "The plan's KL coefficient (for the run's --algo.advantage.estimator, --rollout.n_samples_per_prompt and "
        "the store's median K) becomes --algo.kl.init_coef unless that is given explicitly. Default: None.",
    )
    add(
        "--infalign.accept_unplanned_kl",
        action="store_true",
        default=False,
        help="Train with a planned transform even where no fixed KL coefficient gives the plan "
        "(--algo.advantage.estimator group_norm, --algo.kl.use_loss, --algo.kl.estimator k2/k3, --algo.kl.target): "
        "--algo.kl.init_coef is left as given and the KL will not follow the plan. Default: off (stop).",
    )
    add(
        "--infalign.on_missing",
        type=str,
        default=DEFAULTS["on_missing"],
        choices=["error", "raw"],
        help="A training prompt absent from the store: error (stop, naming its key and text) or raw (keep its raw "
        f"reward and warn with the count). Default: {DEFAULTS['on_missing']}.",
    )
    add(
        "--infalign.allow_mismatch",
        action="store_true",
        default=False,
        help="Train even if the store's run record (template and chat template, sampling, policy, reward source, "
        "normalisation) differs from this run's: one warning per differing field instead of an error. Default: off.",
    )
    add(
        "--infalign.cpu",
        action="store_true",
        default=False,
        help="Run OpenRLHF on CPUs only (CI, laptops): applies openrlhf_infalign.adapter.cpu in the driver and "
        "in every Ray worker. GPU runs must not set it. Default: off.",
    )
    add(
        "--infalign.eval_store",
        type=str,
        default=None,
        metavar="DIR",
        help="Reference store of the eval prompts for the Best-of-N-aware evaluation (build one for --eval.dataset "
        "with `infalign calibrate`). Default: the training store.",
    )
    add(
        "--infalign.eval_n",
        type=str,
        default=None,
        metavar="N,N,...",
        help="Comma-separated N for the Best-/Worst-of-N win rates at evaluation, e.g. 1,2,4. "
        "Default: powers of two up to min(--eval.n_samples_per_prompt, K of the eval store).",
    )
    add(
        "--infalign.eval_at_start",
        dest="infalign.eval_at_start",
        action="store_true",
        default=None,
        help="Evaluate once at step 0, before any update (the base policy's win rates, ~0.5). "
        "Default: on when a reward wrapper is active and --eval.dataset is given.",
    )
    add(
        "--infalign.no_eval_at_start",
        dest="infalign.eval_at_start",
        action="store_false",
        help="Skip the step-0 evaluation.",
    )
    return parser
