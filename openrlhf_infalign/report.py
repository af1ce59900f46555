"""Plots and Markdown for inference-time win rates: used by `infalign evaluate --plot` and `infalign report`.

Reads the evaluation log through ``openrlhf_infalign.evallog`` (its schema is documented there).

The theory curve on the KL plot is the calibrated-space frontier (core/theory.py) of the run's transform: the win
rate the RLHF optimum reaches at each KL. KL in calibrated space is at most the sequence KL, so a run sits at or
below the curve; the gap is what training left on the table. Several runs side by side (``plot_arms_vs_kl``,
``compare_markdown``) take their numbers from compare.py. This module never imports openrlhf.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openrlhf_infalign import compare
from openrlhf_infalign.evallog import EVAL_LOG, load_eval_log
from openrlhf_infalign.files import pyplot, save_figure

__all__ = [
    "EVAL_LOG",
    "load_eval_log",
    "run_metric",
    "plot_winrate_vs_n",
    "plot_winrate_vs_kl",
    "summary_markdown",
    "winrate_table",
    "plot_arms_vs_kl",
    "compare_markdown",
    "noise_floor_words",
    "shade_noise_floor",
    "save_figure",
]


def run_metric(records: list[dict]) -> tuple[str, int, str | None]:
    """(kind, N, transform) of the run from its latest record: kind is bon, won or standard."""
    last = records[-1]
    spec = str(last.get("inference") or "").strip().lower()
    kind, _, n = spec.partition(":")
    if kind in ("bon", "won") and n.isdigit() and int(n) >= 1:
        return kind, int(n), last.get("transform")
    if kind in ("standard", "std"):
        return "standard", 1, last.get("transform")
    # No (or an unknown) inference procedure recorded: show the largest N both tables have.
    common = set(last["bon"]) & set(last["won"])
    return "bon", max(int(x) for x in common) if common else 1, last.get("transform")


def _stat(rec: dict, kind: str, n: int) -> dict | None:
    if kind == "standard":
        return rec["standard"]
    return rec[kind].get(str(n))


# ----------------------------------------------------------------------------------------------------------------
# plots


def _ns(result: dict, key: str) -> list[int]:
    return sorted(int(n) for n in result[key])


def _theory_vs_n(transform: str | None, kl: float | None, ns: list[int]) -> dict[str, list[float]] | None:
    """Theory win rates at this KL for every N (None when there is no transform / KL to predict from)."""
    if not transform or kl is None or kl <= 0:
        return None
    from openrlhf_infalign.core import theory

    try:
        beta = theory.beta_for_kl(transform, kl)
        return {key: [theory.win_rate(f"{key}:{n}", transform, beta) for n in ns] for key in ("bon", "won")}
    except ValueError:
        return None  # e.g. a transform spec theory cannot parse, or a KL beyond its reach: plot the data alone


def plot_winrate_vs_n(
    result: dict,
    path,
    title: str | None = None,
    baseline: dict | None = None,
    baseline_label: str = "step 0",
    result_label: str | None = None,
    transform: str | None = None,
    kl: float | None = None,
    overwrite: bool = True,
) -> Path:
    """Best-of-N and Worst-of-N win rate vs N with +-1.96 stderr error bars (95%), log2 N axis.

    result: the `win_rates` dict. baseline: an earlier result drawn faint for comparison. transform/kl: also draw
    the calibrated-space theory prediction of the RLHF optimum at that KL (dotted).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    styles = {"bon": ("tab:blue", "o", "Best-of-N"), "won": ("tab:red", "s", "Worst-of-N")}
    # Nudge the two series apart on the log2 axis so their error bars do not hide each other.
    dodge = {"bon": 2**-0.03, "won": 2**0.03}
    if baseline is not None:
        for key, (color, marker, label) in styles.items():
            ns = _ns(baseline, key)
            ax.errorbar(
                [n * dodge[key] for n in ns],
                [baseline[key][str(n)]["win_rate"] for n in ns],
                yerr=[1.96 * baseline[key][str(n)]["stderr"] for n in ns],
                color=color,
                marker=marker,
                alpha=0.3,
                linestyle="--",
                capsize=2,
                label=f"{label} ({baseline_label})",
            )
    for key, (color, marker, label) in styles.items():
        ns = _ns(result, key)
        ax.errorbar(
            [n * dodge[key] for n in ns],
            [result[key][str(n)]["win_rate"] for n in ns],
            yerr=[1.96 * result[key][str(n)]["stderr"] for n in ns],
            color=color,
            marker=marker,
            capsize=3,
            label=f"{label} ({result_label})" if result_label else label,
        )
    ns_all = sorted(set(_ns(result, "bon")) | set(_ns(result, "won")))
    theory = _theory_vs_n(transform, kl, ns_all)
    if theory is not None:
        for key, (color, _, label) in styles.items():
            ax.plot(ns_all, theory[key], color=color, linestyle=":", label=f"{label}, theory at KL {kl:.3g}")
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns_all, [str(n) for n in ns_all])
    ax.set_xlabel("N (samples per side)")
    ax.set_ylabel("win rate vs reference policy")
    ax.set_title(title or f"Win rate vs N ({result.get('num_prompts', '?')} prompts; bars: 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never hides a point
    return save_figure(fig, path, overwrite=overwrite)


_BASELINE_NAMES = {"optimal": "theory: optimal transform (ceiling)", "identity": "theory: identity (calibration only)"}


def _frontier_to(inference: str, spec: str, kl_top: float, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The frontier of a transform from KL 0 to a little past kl_top, sorted by KL, for plots. With ``k``, the
    K-aware one (expected KL and win rate over stores with K reference samples per prompt; core/finite_k.py)."""
    from openrlhf_infalign.core import planning, theory

    k = planning.check_k(k)

    if k is not None:
        kls = np.linspace(kl_top * 1.05 / 12, kl_top * 1.05, 12)
        pts = []
        for x in kls:
            try:
                pts.append(planning.frontier(inference, spec, [float(x)], k=k)["points"][0])
            except ValueError:  # a budget this transform cannot reach with K bins: the curve ends there
                break
        ck = np.array([0.0] + [q["kl"] for q in pts])
        return ck, np.array([0.5] + [q["win_rate"] for q in pts])
    if spec == "optimal":
        # 24 betas from KL ~0.01 to ~3.5: smooth enough, and the fixed point is the slow part (~1 s).
        ck, cw = theory.frontier_curve(inference, "optimal", betas=np.geomspace(3.0, 0.003, 24))
    else:
        # Sweep beta from ~0 KL to just past the largest observed KL.
        b_end = theory.beta_for_kl(spec, kl_top * 1.05)
        ck, cw = theory.frontier_curve(inference, spec, betas=np.geomspace(b_end * 1e3, b_end, 80))
    keep = ck <= kl_top * 1.5  # a little past the axis so the line reaches the edge; far points off autoscale
    ck, cw = np.concatenate([[0.0], ck[keep]]), np.concatenate([[0.5], cw[keep]])
    order = np.argsort(ck)
    return ck[order], cw[order]


def shade_noise_floor(ax, floor: float | None) -> None:
    """KL in [0, floor] shaded and twice the floor marked: below it a run's KL is what the optimiser spends with no
    signal at all, so gaps there say nothing about a method."""
    if not floor:
        return
    ax.axvspan(0, floor, color="0.55", alpha=0.18, linewidth=0, zorder=0, label=f"noise floor (KL <= {floor:.3g})")
    ax.axvline(
        2 * floor, color="0.35", linestyle="--", linewidth=0.9, zorder=0, label=f"2x noise floor ({2 * floor:.3g})"
    )


def end_point(records: list[dict], kind: str, n: int) -> dict | None:
    """Where the run ended: its last evaluation's {step, kl, win_rate, stderr} of this metric; None when that
    evaluation has no measured KL (or no such metric). An earlier evaluation is never passed off as the end."""
    r = max(records, key=lambda rec: rec["step"])
    st = _stat(r, kind, n)
    if r.get("kl") is None or st is None:
        return None
    return {"step": r["step"], "kl": float(r["kl"]), "win_rate": st["win_rate"], "stderr": st["stderr"]}


def planned_point(records: list[dict], kind: str, n: int) -> dict | None:
    """Where the run's plan says it lands: (KL budget, the expected win rate of this metric at the planned beta,
    with the store's K), from the latest record that carries a plan; None for a run without one."""
    from openrlhf_infalign.core.finite_k import expected_win_rate_k

    rec = next((r for r in reversed(records) if r.get("kl_budget") and r.get("planned_beta")), None)
    if rec is None or not rec.get("transform"):
        return None
    inference = "standard" if kind == "standard" else f"{kind}:{n}"
    k = rec.get("k")
    win = expected_win_rate_k(inference, rec["transform"], float(rec["planned_beta"]), int(k) if k else None)
    return {"kl": float(rec["kl_budget"]), "win_rate": float(win), "k": k, "beta": float(rec["planned_beta"])}


def plot_winrate_vs_kl(
    records: list[dict],
    path,
    kind: str,
    n: int,
    transform: str | None,
    with_optimal: bool = True,
    noise_floor: float | None = None,
    overwrite: bool = True,
) -> Path:
    """The run's inference-time win rate vs training KL across evaluations, over the calibrated-space frontier of
    its transform (and of the optimal transform, the ceiling for this inference procedure); with a noise floor
    (nats), KL inside it shaded and twice it marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    label = {"bon": f"BoN_{n}", "won": f"WoN_{n}", "standard": "standard"}[kind]
    inference = "standard" if kind == "standard" else f"{kind}:{n}"
    pts = [(r["step"], r["kl"], _stat(r, kind, n)) for r in records if r.get("kl") is not None]
    pts = [(s, k, st) for s, k, st in pts if st is not None]
    kls = np.array([k for _, k, _ in pts], dtype=float)
    plan = planned_point(records, kind, n)
    kl_top = max(float(kls.max()) if kls.size else 0.0, plan["kl"] if plan else 0.0, 1e-3) * 1.3
    kl_top = max(kl_top, 2.1 * (noise_floor or 0.0))
    k_store = plan["k"] if plan else None
    notes = []
    if transform:
        curves = [(transform, "tab:green", "-")]
        if str(transform).strip().lower() != "identity":  # the calibration-only baseline: what CTRL's transform adds
            curves.append(("identity", "gray", ":"))
        if with_optimal and str(transform).strip().lower() != "optimal":
            curves.append(("optimal", "black", "--"))
        for spec, color, ls in curves:
            try:
                ck, cw = _frontier_to(inference, spec, kl_top, k=k_store)
            except ValueError as e:
                notes.append(f"no theory curve for {spec}: {e}")
                continue
            name = f"theory: {spec} (this run)" if spec == transform else _BASELINE_NAMES[spec]
            name += f", K={k_store}" if k_store else ""
            ax.plot(ck, cw, color=color, linestyle=ls, linewidth=1.2, label=name)
    if pts:
        ax.errorbar(
            kls,
            [st["win_rate"] for _, _, st in pts],
            yerr=[1.96 * st["stderr"] for _, _, st in pts],
            color="tab:blue",
            marker="o",
            capsize=3,
            linestyle="-",
            linewidth=0.8,
            label=f"run: {label} win rate",
        )
        for step, k, st in pts:
            ax.annotate(str(step), (k, st["win_rate"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if plan:
        ax.plot(
            [plan["kl"]],
            [plan["win_rate"]],
            "r*",
            ms=13,
            label=f"plan: KL {plan['kl']:g}, {label} {plan['win_rate']:.3f}",
        )
    shade_noise_floor(ax, noise_floor)
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, kl_top)
    ax.set_xlabel("KL(policy || reference) [nats per sequence]")
    ax.set_ylabel(f"{label} win rate vs reference policy")
    ax.set_title(f"{label} win rate vs KL ({len(pts)} evaluations; labels: step)")
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes)[:200], transform=ax.transAxes, fontsize=6, va="bottom")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------------------
# tables


def _fmt(stat: dict | None, digits: int = 4) -> str:
    if stat is None:
        return "-"
    return f"{stat['win_rate']:.{digits}f} ± {stat['stderr']:.{digits}f}"


def summary_markdown(records: list[dict], kind: str, n: int) -> str:
    """Markdown table: step, KL, standard, BoN_N, WoN_N (win rate ± stderr) per evaluation."""
    lines = [
        f"| step | KL | prompts | standard | BoN_{n} | WoN_{n} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        kl = "-" if r.get("kl") is None else f"{r['kl']:.4f}"
        lines.append(
            f"| {r['step']} | {kl} | {r.get('num_prompts', '-')} | {_fmt(r['standard'])} "
            f"| {_fmt(r['bon'].get(str(n)))} | {_fmt(r['won'].get(str(n)))} |"
        )
    return "\n".join(lines)


def winrate_table(result: dict) -> str:
    """Plain-text table of one `win_rates` result, for terminals."""
    std = result["standard"]
    lines = [
        f"prompts: {result['num_prompts']}",
        f"standard win rate: {_fmt(std)}",
        "",
        f"{'N':>5}  {'Best-of-N win rate':>20}  {'Worst-of-N win rate':>20}  {'prompts':>8}",
    ]
    for n in sorted(set(_ns(result, "bon")) | set(_ns(result, "won"))):
        b, w = result["bon"].get(str(n)), result["won"].get(str(n))
        count = (b or w)["num_prompts"] if (b or w) and "num_prompts" in (b or w) else result["num_prompts"]
        lines.append(f"{n:>5}  {_fmt(b):>20}  {_fmt(w):>20}  {count:>8}")
    lines.append("(win rate ± prompt-level standard error; ties count 1/2; 0.5 = no better than the reference)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# several runs side by side


def plot_arms_vs_kl(
    arms: dict[str, list[list[dict]]],
    transforms: dict[str, str | None],
    inference: str,
    path,
    kl_grid=(),
    with_optimal: bool = True,
    k: int | None = None,
    noise_floor: float | None = None,
    overwrite: bool = True,
    crossing: str = "first",
) -> Path:
    """One metric against KL for several arms: per arm a colour, its seeds as thin lines (their first- or
    sustained-crossing trajectories), the seed mean with a +-1 se band (compare.arm_at_kl), and beneath, the frontier of each arm's
    transform and of identity (K-aware with ``k``). arms: label -> the seeds' records; matched KLs drawn faint;
    with a noise floor (nats), KL inside it shaded and twice it marked."""
    from openrlhf_infalign.core.planning import check_k

    k = check_k(k)  # before anything is drawn: a theory curve for K < 2 does not exist
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.6))
    label = compare.metric_name(inference)
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}
    seed_kls = [compare.trajectory(records, inference, crossing)[1] for seeds in arms.values() for records in seeds]
    kl_top = max([float(k.max()) for k in seed_kls if k.size] + [1e-3, 2.1 * (noise_floor or 0.0)]) * 1.1
    specs: dict[str, tuple] = {}
    for arm, spec in transforms.items():
        if spec and spec not in specs:
            specs[spec] = colors[arm]
    specs.setdefault("identity", "gray")
    notes = []
    for spec, color in specs.items():
        if spec == "optimal" and not with_optimal:
            continue
        try:
            ck, cw = _frontier_to(inference, spec, kl_top, k=k)
        except ValueError as e:
            notes.append(f"no theory curve for {spec}: {e}")
            continue
        name = f"theory: {spec}" + (f", K={k}" if k else "")
        ax.plot(ck, cw, color=color, linestyle=":", linewidth=1.2, alpha=0.8, zorder=1, label=name)
    for arm, seeds in arms.items():
        color = colors[arm]
        ranges = [compare.run_kl_range(records, crossing) for records in seeds]
        for records in seeds:
            _, kl, win, _ = compare.trajectory(records, inference, crossing)
            ax.plot(kl, win, color=color, linewidth=0.7, alpha=0.35, marker=".", markersize=3, zorder=2)
        span = compare.common_kl_range(ranges) if len(ranges) > 1 else ranges[0]
        if span is None or span[1] <= span[0]:
            continue
        grid = np.linspace(span[0], span[1], 64)
        mean, se = compare.arm_at_kl(seeds, inference, grid, crossing)
        ax.fill_between(grid, mean - se, mean + se, color=color, alpha=0.2, linewidth=0, zorder=3)
        name = f"{arm} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
        ax.plot(grid, mean, color=color, linewidth=2, zorder=4, label=name)
    for k in kl_grid:
        ax.axvline(k, color="gray", linewidth=0.6, alpha=0.4, zorder=0)
    shade_noise_floor(ax, noise_floor)
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, kl_top)
    ax.set_xlabel("KL(policy || reference) [nats per sequence]")
    ax.set_ylabel(f"{label} win rate vs reference policy")
    ax.set_title(f"{label} win rate vs KL (lines: seed mean, band: ±1 se; thin: seeds; dotted: theory)", fontsize=9)
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes)[:200], transform=ax.transAxes, fontsize=6, va="bottom")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path, overwrite=overwrite)


def _pm(value, se, signed: bool = False) -> str:
    if value is None or se is None:
        return "-"
    return f"{value:+.4f} ± {se:.4f}" if signed else f"{value:.4f} ± {se:.4f}"


def noise_floor_words(floor: dict) -> str:
    """One sentence: the floor, how it was found, and each noise run's KL by that rule (and its largest at any
    evaluation, where a one-evaluation spike went higher)."""

    def one(r: dict) -> str:
        if r["max_kl"] > r["floor_kl"]:
            return f"{r['run']}: {r['floor_kl']:.3g} (one evaluation: {r['max_kl']:.3g} at step {r['step_of_max']})"
        return f"{r['run']}: {r['floor_kl']:.3g} at step {r['step_of_max']}"

    runs = "; ".join(one(r) for r in floor["runs"])
    return f"Noise floor {floor['nats']:.3g} nats: {floor['source']}" + (f"; per run: {runs}." if runs else ".")


def _floor_cell(kl: float, floor: dict | None) -> str:
    if floor is None:
        return ""
    return "inside" if kl <= floor["nats"] else "< 2x" if kl < 2 * floor["nats"] else "≥ 2x"


def compare_markdown(result: dict) -> str:
    """Markdown of compare.compare_runs' result: the arms (seeds, final KL per seed), the noise floor when known,
    then each arm's win rates at every matched KL ± se and their difference to the baseline arm ± the se of that
    difference (with where each KL lies against the floor), then the notes."""
    base = result["baseline"]
    floor = result.get("noise_floor")
    lines = ["| arm | transform | seeds | final KL per seed | KL covered by every seed |", "|---|---|---:|---|---|"]
    if result.get("crossing") == "sustained":
        lines = [
            "Trajectories: sustained crossings (a KL level counts when two consecutive evaluations reach it, read at "
            "the lower; one-evaluation spikes and the unconfirmed last evaluation left out).",
            "",
        ] + lines
    for arm in result["arms"]:
        finals = ", ".join("-" if r["final_kl"] is None else f"{r['final_kl']:.3f}" for r in arm["runs"])
        span = "none" if arm["kl_range"] is None else "{:.3f} to {:.3f}".format(*arm["kl_range"])
        lines.append(f"| {arm['label']} | {arm['transform'] or '-'} | {arm['seeds']} | {finals} | {span} |")
    if floor is not None:
        lines += [
            "",
            noise_floor_words(floor)
            + " KL inside the floor is shaded in the figures and twice the floor is marked; a difference at a KL "
            "below twice the floor is optimiser noise, not the method.",
        ]
    metrics = list(result["metrics"])
    if result["kl_grid"]:
        intro = f"Win rate at matched KL ± se; Δ: minus the baseline arm `{base}`, ± se of that difference."
        if floor is not None:
            intro += " floor: where the KL lies against the noise floor (inside, < 2x, ≥ 2x)."
        lines += ["", intro, ""]
        head = "".join(f" {m} | Δ {m} |" for m in metrics)
        fcol, fsep = (" floor |", "---|") if floor is not None else ("", "")
        lines += [f"| arm | seeds | KL |{fcol}{head}", "|---|---:|---:|" + fsep + "---:|---:|" * len(metrics)]
        for arm in result["arms"]:
            for i, k in enumerate(result["kl_grid"]):
                cells = f" {_floor_cell(k, floor)} |" if floor is not None else ""
                for m in metrics:
                    e = result["metrics"][m]["arms"][arm["label"]]
                    diff = "(baseline)" if arm["label"] == base else _pm(e["diff"][i], e["diff_stderr"][i], True)
                    cells += f" {_pm(e['win_rate'][i], e['stderr'][i])} | {diff} |"
                lines.append(f"| {arm['label']} | {arm['seeds']} | {k:.3g} |{cells}")
    if result["notes"]:
        lines += [""] + [f"* {n}" for n in result["notes"]]
    return "\n".join(lines)
