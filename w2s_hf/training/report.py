"""Multi-behavior W2S evaluation reports: JSON, markdown and plots.

`report.json` has the shape ``{"model": ..., "behaviors": {name: {"protocol": ..., "router_input":
"prompt" | "prompt+scored", "n_train", "n_test", "layers_swept", "fixed": {"layer", "steerability",
"prop_steerable"}, "w2s_top1": {...}, "w2s_top2": {...}, "w2s_top3": {...}, "w2s_regression": {...},
"oracle": {...}, "w2s_bundle": {...}, "ood": {variant: {...}}}}, "mean": {...}}`` (test split; BASE
prompts unless under "ood"). `mean` is over the behaviors whose router reads the prompt only;
`mean_prompt_plus_scored` over the others.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..bundle.files import write_atomic
from .protocols import ROUTER_INPUTS

logger = logging.getLogger(__name__)

POLICIES = ("fixed", "w2s_top1", "w2s_top2", "w2s_top3", "w2s_regression", "w2s_bundle", "oracle")


def _policy_entry(result: dict) -> dict:
    entry = {"steerability": float(result["steerability"]), "prop_steerable": float(result["prop_steerable"])}
    if "layer" in result:
        entry["layer"] = int(result["layer"])
    return entry


def behavior_entry(fit_report: dict) -> dict:
    """One behavior's entry of `report.json` from a `fit_bundle` report."""
    tests = fit_report["test"]
    base = tests["BASE"]
    entry = {"protocol": fit_report["protocol"],
             "router_input": fit_report.get("router_input", ROUTER_INPUTS[fit_report["protocol"]]),
             "n_test": base["n"], "n_train": fit_report.get("n_train", fit_report["fit"].get("max_train")),
             "layers_swept": fit_report.get("layers_swept", fit_report["fit"].get("layers")),
             "use_router": fit_report["train"]["use_router"], "chosen_k": fit_report["train"]["chosen_k"],
             "router": fit_report["train"].get("shipped")}
    entry.update({name: _policy_entry(base[name]) for name in POLICIES if name in base})
    ood = {variant: {name: _policy_entry(result[name]) for name in POLICIES if name in result}
           for variant, result in tests.items() if variant != "BASE"}
    if ood:
        entry["ood"] = ood
    return entry


def load_fit_reports(bundles_dir: str | Path) -> dict[str, dict]:
    """The `fit_bundle` reports of every `<bundles_dir>/<behavior>/report.json`, by behavior.

    A report that cannot be read or lacks what `behavior_entry` needs (e.g. a run killed while writing it,
    or one fitted without evaluation) is left out with a warning naming the file, so that one bad folder
    does not end a whole evaluation.

    Example:

    ```python
    >>> reports = load_fit_reports("reports/mwe-smollm2/bundles")
    ```
    """
    reports = {}
    for path in sorted(Path(bundles_dir).glob("*/report.json")):
        try:
            report = json.loads(path.read_text())
            behavior_entry(report)
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as err:
            logger.warning("Skipping %s: it is not a readable fit report (%s: %s).", path, type(err).__name__, err)
            continue
        reports[path.parent.name] = report
    return reports


def _mean_over(entries: list[dict]) -> dict:
    """Mean of each policy over `entries`; a policy some entries lack (e.g. `w2s_regression` in fits older than it)
    gets no mean, since a mean over a subset would read as one over all of them."""
    mean = {}
    for name in POLICIES:
        values = [e[name] for e in entries if name in e]
        if values and len(values) == len(entries):
            mean[name] = {key: float(np.mean([v[key] for v in values])) for key in ("steerability", "prop_steerable")}
    return mean


def write_report(
    fit_reports: dict[str, dict],
    output_dir: str | Path,
    *,
    model: str,
    commands: list[str],
) -> Path:
    """Writes `report.json`, `report.md`, `steerability_per_layer.png` and `optimal_layers.png`.

    Example:

    ```python
    >>> write_report({"openness": fit_report}, "reports/mwe-smollm2", model="SmolLM2-135M-Instruct",
    ...              commands=["2026-11-25 21:24 | 31.0 min | x86_64, 2 cores, CPU only | w2s-hf eval ..."])
    ```
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    behaviors = {name: behavior_entry(report) for name, report in fit_reports.items()}
    entries = list(behaviors.values())
    variants = sorted({v for e in entries for v in e.get("ood", {})})
    data = {
        "model": model,
        "commands": commands,
        "split": "test",
        "behaviors": behaviors,
        "mean": _mean_over([e for e in entries if e["router_input"] == "prompt"]),
        "mean_prompt_plus_scored": _mean_over([e for e in entries if e["router_input"] != "prompt"]),
        "mean_ood": {v: _mean_over([e["ood"][v] for e in entries if v in e.get("ood", {})]) for v in variants},
    }
    write_atomic(output / "report.json", json.dumps(data, indent=2).encode())  # a crash keeps the old run history
    write_atomic(output / "report.md", _markdown(data, variants).encode())
    _plot(fit_reports, output)
    return output / "report.json"


def _row(name: str, entry: dict) -> str:
    cells = []
    for policy in POLICIES:
        value = entry.get(policy)
        cells.append("-" if value is None else f"{value['steerability']:+.3f} / {value['prop_steerable']:.2f}")
    layer = entry.get("fixed", {}).get("layer", "")
    n = f"{entry['n_test']} / {entry['n_train']}" if "n_test" in entry else ""
    swept = len(entry["layers_swept"]) if entry.get("layers_swept") else ""
    return f"| {name} | {entry.get('protocol', '')} | {n} | {swept} | {layer} | " + " | ".join(cells) + " |"


def _markdown(data: dict, variants: list[str]) -> str:
    header = ("| behavior | protocol | n | layers | fixed layer | " + " | ".join(POLICIES) + " |\n|"
              + " --- |" * (len(POLICIES) + 5))
    prompt_only = {name: entry for name, entry in data["behaviors"].items() if entry["router_input"] == "prompt"}
    scored = {name: entry for name, entry in data["behaviors"].items() if entry["router_input"] != "prompt"}
    lines = [
        f"# W2S evaluation: {data['model']}",
        "",
        "Runs that wrote this report (finished | wall time | machine | command):",
        "",
        *[f"* `{command}`" for command in data["commands"]],
        "",
        "Test split, BASE prompts; `n` = test / train examples, `layers` = layers swept. Each cell: mean steerability /",
        "proportion steerable. `w2s_topk`: the paper's classifier router with top-k label smoothing; `w2s_regression`:",
        "a router that predicts every layer's steerability; `w2s_bundle`: what the saved bundle does (the router",
        "chosen on the train split, or the fixed layer when cross-validation said no router beats it by more than one",
        "standard error).",
        "",
        "## Deployment routing: the router reads the prompt only (what `generate` sees)",
        "",
        header,
        *[_row(name, entry) for name, entry in prompt_only.items()],
        _row("**mean**", data["mean"]),
    ]
    if scored:
        lines += ["", "## Scoring-time routing: the router reads the scored text", "",
                  "These routers read the prompt and the statement whose likelihood is scored (`statement` protocol),",
                  "which `generate` never sees: their gains cannot happen in deployment.", "", header,
                  *[_row(name, entry) for name, entry in scored.items()],
                  _row("**mean**", data["mean_prompt_plus_scored"])]
    for variant in variants:
        lines += ["", f"## OOD: {variant} (router trained on BASE)", "", header]
        lines += [_row(name, {**entry["ood"][variant], "protocol": entry["protocol"]})
                  for name, entry in data["behaviors"].items() if variant in entry.get("ood", {})]
        lines.append(_row("**mean**", data["mean_ood"][variant]))
    lines += ["", "![mean steerability per layer](steerability_per_layer.png)", "",
              "![per-sample optimal layers](optimal_layers.png)", ""]
    return "\n".join(lines)


def _plot(fit_reports: dict[str, dict], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(fit_reports)
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in names:
        base = fit_reports[name]["test"]["BASE"]
        layers = fit_reports[name]["fit"]["layers"] or list(range(len(base["mean_steerability_per_layer"])))
        ax.plot(layers, base["mean_steerability_per_layer"], marker="o", ms=3, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("steered layer (block output)")
    ax.set_ylabel("mean steerability (test)")
    ax.set_title("Mean steerability per layer")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(output / "steerability_per_layer.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 5))
    for position, name in enumerate(names):
        base = fit_reports[name]["test"]["BASE"]
        best = np.asarray(base["best_layers"])
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(best))
        ax.scatter(position + jitter, best, s=6, alpha=0.4)
        ax.scatter([position], [base["fixed"]["layer"]], marker="_", s=400, color="black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("per-sample optimal layer (test)")
    ax.set_title("Per-sample optimal layers vs the fixed layer (black bar)")
    fig.tight_layout()
    fig.savefig(output / "optimal_layers.png", dpi=120)
    plt.close(fig)
