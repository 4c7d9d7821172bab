"""Issue 21: W2S routers side by side on the same cached sweeps, selected by cross-validation on train only.

For every behavior of finished `w2s-hf eval` runs (each `--eval` folder's `bundles/<behavior>` with its
sweep cache), the router is re-fitted with each prompt encoder on the very same train/test sweeps (the
cache is copied, so only the embeddings and the cross-validated routers are recomputed; no sweep runs
again), with `router="best"` so that both router kinds are fitted and cross-validated:

* router kinds: the paper's classifier with top-k label smoothing (`k` chosen by CV), and a regression of
  every candidate layer's steerability, steering at the predicted best;
* encoders: all-MiniLM-L6-v2 (the library default: the eval's own fit), and the LLM's own hidden states
  (`internal`): block 2, or blocks 1-4 concatenated, each mean-pooled or at the last prompt token, and the
  mid-depth block 12 at the last prompt token (like L2S's context; routing then needs its own early-stopped
  pass instead of reading inside `generate`'s prompt pass, since candidate layers lie below it).

Every router reads the prompt only when the eval's protocol does (`router_input` is printed per behavior).
The `cv-selected` row picks, per behavior, the encoder and router kind with the best cross-validated
steerability on the train split, kept only when its fold-wise CV gain over the fixed layer exceeds one standard
error (the rule `fit` ships by; the fixed layer otherwise), and is scored on test.
Writes `README.md` (followed by `notes.md` of `--output` when there is one) and `routers.json` into `--output`;
a behavior fitted by an earlier run is read back.

    python reports/router_comparison.py --eval runs/airisk runs/persona --output reports/router-kinds
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from w2s_hf.defaults import DEFAULT_BASE_MODEL, load_base_model, load_tokenizer
from w2s_hf.training.fit import FitConfig, fit_bundle
from w2s_hf.training.router_fit import gain_over_fixed

ENCODERS = {
    "minilm": None,  # the eval's own fit
    "internal-L2-mean": {"type": "internal", "layer": 2},
    "internal-L2-last": {"type": "internal", "layer": 2, "pooling": "last"},
    "internal-L1-4-mean": {"type": "internal", "layers": [1, 2, 3, 4]},
    "internal-L1-4-last": {"type": "internal", "layers": [1, 2, 3, 4], "pooling": "last"},
    "internal-L12-last": {"type": "internal", "layer": 12, "pooling": "last"},
}
KINDS = ("classifier", "regression", "best")


def summary(report: dict) -> dict:
    """CV (train) and test steerability of each router kind of one fit, plus the fixed layer and the oracle."""
    train, base = report["train"], report["test"]["BASE"]
    fixed_test = base["fixed"]["steerability"]
    cv_fixed = next((cv["fixed_score"] for cv in [*train["cv"].values(), train.get("regression_cv") or {}]
                     if "fixed_score" in cv), None)
    k = train["chosen_k"]
    classifier = train["cv"][str(k)] if k is not None else {}
    regression = train.get("regression_cv") or {}
    classifier_cv, regression_cv = classifier.get("best_score"), regression.get("best_score")
    rows = {
        "classifier": {"cv": classifier_cv, "margin": cv_margin(classifier),
                       "test": base[f"w2s_top{k}"]["steerability"] if k else fixed_test},
        "regression": {"cv": regression_cv, "margin": cv_margin(regression),
                       "test": base["w2s_regression"]["steerability"] if regression_cv is not None else fixed_test},
        "best": {"cv": max([s for s in (classifier_cv, regression_cv) if s is not None], default=None),
                 "test": base["w2s_bundle"]["steerability"], "shipped": train["shipped"]},
    }
    return {"routers": rows, "cv_fixed": cv_fixed, "fixed": fixed_test, "oracle": base["oracle"]["steerability"],
            "fixed_layer": base["fixed"]["layer"], "router_input": report["router_input"],
            "n_train": report["n_train"], "n_test": report["n_test"], "layers_swept": report["layers_swept"]}


def cv_margin(cv: dict) -> dict | None:
    """A cross-validated router's fold-wise gain over the fixed layer and its standard error (`None` for a report
    written before the fold scores were recorded, or for a router kind that was not fitted)."""
    if "best_fold_scores" not in cv:
        return None
    gain, stderr = gain_over_fixed(cv)
    return {"gain": gain, "stderr": stderr}


def cv_selected(per_encoder: dict[str, dict]) -> dict:
    """The encoder and router kind with the best train-split CV score, kept under the rule `fit` ships by: its
    fold-wise CV gain over the fixed layer must exceed one standard error, else the fixed layer is selected.
    (A report without fold scores falls back to the plain rule: CV score above the fixed layer's.)"""
    any_fit = next(iter(per_encoder.values()))
    scored = [(fit["routers"][kind]["cv"], encoder, kind) for encoder, fit in per_encoder.items()
              for kind in ("classifier", "regression") if fit["routers"][kind]["cv"] is not None]
    if scored:
        score, encoder, kind = max(scored)
        margin = per_encoder[encoder]["routers"][kind].get("margin")
        wins = margin["gain"] > margin["stderr"] if margin else score > any_fit["cv_fixed"]
        if wins:
            return {"encoder": encoder, "kind": kind, "test": per_encoder[encoder]["routers"][kind]["test"]}
    return {"encoder": "fixed", "kind": None, "test": any_fit["fixed"]}


def fit_behavior(folder: Path, main_report: dict, output: Path, model, tokenizer) -> dict[str, dict]:
    """Every encoder's fit of one behavior (reading back the ones an earlier run wrote)."""
    fits = {}
    for name, spec in ENCODERS.items():
        target = output / name / main_report["behavior"]
        if spec is None and main_report["fit"]["router"] == "best":
            report = main_report
        elif (target / "report.json").is_file():
            report = json.loads((target / "report.json").read_text())
        else:
            if not (target / "cache").is_dir():
                shutil.copytree(folder / "cache", target / "cache")
            encoder = main_report["fit"]["encoder"] if spec is None else spec
            config = FitConfig(**{**main_report["fit"], "encoder": encoder, "router": "best", "variants": ("BASE",)})
            _, report = fit_bundle(model, tokenizer, config, target, progress=False)
            shutil.rmtree(target / "cache")
        fits[name] = summary(report)
    return fits


def mean_row(results: dict, encoder: str, kind: str) -> dict:
    """Means over behaviors of one encoder and router kind (a kind with no fitted router counts as its fixed layer)."""
    fits = [results[b]["fits"][encoder] for b in results]
    tests = [fit["routers"][kind]["test"] for fit in fits]
    cvs = [fit["cv_fixed"] if fit["routers"][kind]["cv"] is None else fit["routers"][kind]["cv"] for fit in fits]
    fixed = [fit["fixed"] for fit in fits]
    return {"test": float(np.mean(tests)), "cv": float(np.mean(cvs)),
            "not_worse": int(sum(t >= 0.95 * f for t, f in zip(tests, fixed)))}


def write_readme(output: Path, results: dict, commands: list[str]) -> None:
    results = {b: r for b, r in results.items() if set(ENCODERS) <= set(r["fits"])}  # a later run completes the rest
    behaviors = sorted(results)
    fixed = float(np.mean([results[b]["fits"]["minilm"]["fixed"] for b in behaviors]))
    oracle = float(np.mean([results[b]["fits"]["minilm"]["oracle"] for b in behaviors]))
    cv_fixed = float(np.mean([results[b]["fits"]["minilm"]["cv_fixed"] for b in behaviors]))

    def ratio(value: float) -> str:
        gap = oracle - fixed
        closed = round(100 * (value - fixed) / gap)  # an int: never "-0"
        return f"{value / fixed:.2f}× | {closed} %" if fixed > 0 and gap > 0 else "- | -"

    lines = ["# W2S routers side by side (SmolLM2-135M-Instruct, test split, BASE prompts)", "",
             "Runs (date | wall time | machine | command):", "", *[f"* `{c}`" for c in commands], "",
             "Same sweeps for every row (copied caches; only embeddings and routers change). Router input per "
             "behavior: " + ", ".join(f"{b} `{results[b]['fits']['minilm']['router_input']}`" for b in behaviors)
             + ". Scale per behavior (train / test examples, layers swept): "
             + ", ".join(f"{b} {results[b]['fits']['minilm']['n_train']}/{results[b]['fits']['minilm']['n_test']}, "
                         f"{len(results[b]['fits']['minilm']['layers_swept'])}" for b in behaviors) + ".", "",
             f"Mean over {len(behaviors)} behaviors: steerability on test, cross-validated steerability on train "
             "(5 folds), ratio to the fixed layer, share of the fixed → oracle gap closed, and behaviors where the "
             "router keeps ≥ 0.95× its fixed layer. `best` = what `--router best` ships (the router kind with the "
             "higher CV score, or the fixed layer when its fold-wise CV gain over the fixed layer is within one "
             "standard error). `cv-selected` applies the same rule to the best encoder and kind per behavior.", "",
             "| encoder | router | test | CV (train) | × fixed | gap closed | ≥ 0.95× fixed |",
             "|---|---|---:|---:|---:|---:|---:|",
             f"| - | fixed layer | {fixed:+.3f} | {cv_fixed:+.3f} | 1.00× | 0 % | - |"]
    for encoder in ENCODERS:
        for kind in KINDS:
            row = mean_row(results, encoder, kind)
            lines.append(f"| {encoder} | {kind} | {row['test']:+.3f} | {row['cv']:+.3f} | {ratio(row['test'])} | "
                         f"{row['not_worse']}/{len(behaviors)} |")
    selected = [results[b]["selected"] for b in behaviors]
    sel_test = float(np.mean([s["test"] for s in selected]))
    sel_ok = sum(s["test"] >= 0.95 * results[b]["fits"]["minilm"]["fixed"] for s, b in zip(selected, behaviors))
    lines += [f"| per behavior | cv-selected | {sel_test:+.3f} | - | {ratio(sel_test)} | {sel_ok}/{len(behaviors)} |",
              f"| - | oracle | {oracle:+.3f} | - | {ratio(oracle)} | - |", "",
              "Per behavior, test steerability (fixed layer; each encoder's shipped `best` router, `(f)` = it "
              "shipped the fixed layer; the cv-selected encoder and kind; oracle):", "",
              "| behavior | fixed (layer) | " + " | ".join(ENCODERS) + " | cv-selected | oracle |",
              "|---|---:|" + "---:|" * (len(ENCODERS) + 2)]
    for b in behaviors:
        fits = results[b]["fits"]
        cells = [f"{fits[e]['routers']['best']['test']:+.3f}" + ("" if fits[e]["routers"]["best"]["shipped"] else " (f)")
                 for e in ENCODERS]
        s = results[b]["selected"]
        chosen = "fixed" if s["kind"] is None else f"{s['encoder']} {s['kind']}"
        lines.append(f"| {b} | {fits['minilm']['fixed']:+.3f} ({fits['minilm']['fixed_layer']}) | " + " | ".join(cells)
                     + f" | {s['test']:+.3f} ({chosen}) | {fits['minilm']['oracle']:+.3f} |")
    notes = output / "notes.md"  # the reading of the tables, written by hand
    lines += ["", notes.read_text().rstrip()] if notes.is_file() else []
    (output / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", nargs="+", required=True, help="folders of finished `w2s-hf eval` runs")
    parser.add_argument("--output", default="reports/router-kinds")
    parser.add_argument("--behaviors", nargs="+", default=None)
    parser.add_argument("--machine", default="x86_64 2 cores, CPU only")
    args = parser.parse_args()
    start = time.time()
    output = Path(args.output)
    model, tokenizer = load_base_model(DEFAULT_BASE_MODEL), load_tokenizer(DEFAULT_BASE_MODEL)
    saved = output / "routers.json"
    results = json.loads(saved.read_text())["behaviors"] if saved.is_file() else {}
    for run in args.eval:
        for folder in sorted(p for p in (Path(run) / "bundles").iterdir() if (p / "report.json").is_file()):
            if args.behaviors and folder.name not in args.behaviors:
                continue
            main_report = json.loads((folder / "report.json").read_text())
            fits = fit_behavior(folder, main_report, output, model, tokenizer)
            results[folder.name] = {"fits": fits, "selected": cv_selected(fits)}
            shown = {e: f"{f['routers']['best']['test']:+.3f}" for e, f in fits.items()}
            print(f"{folder.name}: fixed {fits['minilm']['fixed']:+.3f}, shipped {shown}, "
                  f"cv-selected {results[folder.name]['selected']}", flush=True)
    minutes = (time.time() - start) / 60
    with open(output / "commands.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M')} | {minutes:.1f} min | {args.machine} | "
                  f"python {shlex.join(sys.argv)}\n")
    commands = (output / "commands.log").read_text().splitlines()
    saved.write_text(json.dumps({"commands": commands, "behaviors": results}, indent=2))
    write_readme(output, results, commands)
    print(f"Written to {output} ({minutes:.1f} min).")


if __name__ == "__main__":
    main()
