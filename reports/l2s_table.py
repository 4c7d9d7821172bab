"""Issue 6: the W2S paper's Table 1 (CAA / L2S, fixed layer / W2S), in distribution and OOD.

For every behavior of a finished `w2s-hf eval` (default `reports/mwe-smollm2`) whose protocol has a
positive and a negative answer per item (`answer`: the five advanced-AI-risk behaviors; `ab` too),
reusing its fit config, splits and bundle (CAA vectors, fixed layer, W2S router); steps 1-4 are the
library's one call `w2s_hf.training.l2s_bundle.fit_l2s_bundle`:

1. L2S oracle vectors and context representations of the train and validation splits;
2. the L2S fixed layer: best mean train steerability when each input is steered with its own oracle
   vector (a per-item-vector layer sweep over the eval's swept layers, cached and resumable);
3. the context layer (lowest validation MSE of the fixed layer's network over `--context-layers`),
   then one network per layer a router can pick (step 4; learning rates swept on validation);
4. the L2S router: trained like the eval's (its encoder, label smoothing, CV and fallback to the fixed
   layer) on the train items' per-input oracle-vector sweep of step 2, i.e. on where each input's own
   vector steers best; networks are fitted for every layer it or the eval's router can pick;
5. on the test split, for BASE and the OOD prompt variants (SYS.POS, SYS.NEG, USER.POS, USER.NEG):
   CAA fixed, CAA + W2S (the eval bundle's routing: its router, or its fixed layer where CV chose no
   router), L2S fixed, L2S + W2S (the L2S router's layer, each row with its L2S vector), L2S at the
   CAA router's layers, and the oracle vectors at the L2S fixed layer, all scored the same way
   (`steerability_at`).

Persona behaviors evaluated with the `statement` protocol (one persona statement per item, no paired
answers) have no oracle vectors and no L2S: they are listed as skipped. Evaluated with `--protocol
answer` (the MWE question answered "Yes" or "No"), they have a pair and run like the others. The
eval's BASE numbers are kept next to ours as a check (same policies; ours re-score only the needed
layer per item).

Writes `README.md`, `l2s_table.json` and, per behavior, `<behavior>/result.json` (a finished behavior
is not refitted: variants it lacks are scored with the networks and router read back from its bundle) and the L2S
bundle `<behavior>/bundle` (loadable with `W2SSteeringModel`).

    python reports/l2s_table.py --eval reports/mwe-smollm2 --output reports/l2s [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch

from w2s_hf.bundle import SteeringBundle
from w2s_hf.defaults import DEFAULT_BASE_MODEL, load_base_model, load_tokenizer
from w2s_hf.router.l2s import L2SNetworks
from w2s_hf.router.predictor import LayerPredictor
from w2s_hf.steering import SteeringEngine
from w2s_hf.training.data import PROMPT_VARIANTS
from w2s_hf.training.fit import embed_items
from w2s_hf.training.fit_l2s import DEFAULT_LRS, context_representations, evaluate_l2s, oracle_vectors
from w2s_hf.training.l2s_bundle import PAIRED_PROTOCOLS, CAAFit, fit_l2s_bundle
from w2s_hf.training.metrics import summarize
from w2s_hf.training.scoring import steerability_at
METHODS = {"caa_fixed": "CAA w/ fixed layer", "caa_w2s": "CAA w/ W2S", "l2s_fixed": "L2S w/ fixed layer",
           "l2s_w2s": "L2S w/ W2S", "l2s_at_caa_router": "L2S at the CAA router's layers (reference)",
           "oracle_fixed": "oracle vectors w/ L2S fixed layer (reference)"}
SHORT = {"caa_fixed": "CAA fixed", "caa_w2s": "CAA+W2S", "l2s_fixed": "L2S fixed", "l2s_w2s": "L2S+W2S",
         "l2s_at_caa_router": "L2S @ CAA router", "oracle_fixed": "oracle"}


def routed_layers(bundle: SteeringBundle, n_items: int, embeddings: Callable[[], torch.Tensor]) -> list[int]:
    """A bundle's layer for each of `n_items` items: its router's choice (read from `embeddings()`, the
    items' router inputs), or its fixed layer without a router."""
    if bundle.config.predictor is None:
        return [int(bundle.config.fixed_layer)] * n_items
    predictor = LayerPredictor.from_config_dict(bundle.config.predictor, bundle.predictor_state_dict()).eval()
    return predictor.predict_layers(embeddings()).tolist()


def histogram(layers: list[int]) -> dict[int, int]:
    return {int(k): int(v) for k, v in zip(*np.unique(layers, return_counts=True))}


def score_variant(model, behavior: CAAFit, l2s: SteeringBundle, result: dict, variant: str,
                  engine: SteeringEngine) -> dict:
    """Step 5 on one prompt variant of the test split: every method, scored the same way."""
    fit, pad_id, tokenizer = behavior.config, behavior.tokenizer.pad_token_id, behavior.tokenizer
    items = behavior.items("test", variant, limit=fit.max_eval)
    networks = L2SNetworks.from_config_dict(l2s.config.l2s, l2s.l2s_state_dict()).eval()
    caa, caa_fixed = behavior.bundle.steering_vectors, result["caa_fixed_layer"]
    embeddings = cache(lambda: embed_items(behavior.encoder, tokenizer, items))  # one encoding for both routers
    caa_routed = routed_layers(behavior.bundle, len(items), embeddings)
    common = dict(multipliers=fit.multipliers, batch_size=fit.batch_size, policy=fit.position_policy)
    contexts = context_representations(model, items, pad_id)
    scores = evaluate_l2s(model, items, networks, pad_id, fixed_layer=result["l2s_fixed_layer"],
                          predicted_layers=routed_layers(l2s, len(items), embeddings),
                          oracle=oracle_vectors(model, items, pad_id), contexts=contexts, engine=engine, **common)
    base = None if scores["base"] is None else np.asarray(scores["base"])
    row = {name: scores[name] for name in ("l2s_fixed", "l2s_w2s", "oracle_fixed")}
    at_caa_router = networks.vectors(contexts[:, networks.context_layer], caa_routed).cpu()
    for name, layers, vectors in (("caa_fixed", [caa_fixed] * len(items), caa[[caa_fixed] * len(items)]),
                                  ("caa_w2s", caa_routed, caa[caa_routed]),
                                  ("l2s_at_caa_router", caa_routed, at_caa_router)):
        slopes = steerability_at(model, engine, items, layers, vectors, pad_id, base=base, **common)["steerability"]
        row[name] = summarize(slopes)
        if name != "caa_fixed":
            row[name]["layer_histogram"] = histogram(layers)
    row["n"] = len(items)
    row["device"] = str(next(model.parameters()).device)
    if variant in behavior.report.get("test", {}):
        row["eval_report"] = {"caa_fixed": behavior.report["test"][variant]["fixed"],
                              "caa_w2s": behavior.report["test"][variant]["w2s_bundle"]}
    print(f"  {variant:8s} " + "  ".join(f"{SHORT[name]} {row[name]['steerability']:+.3f}" for name in METHODS),
          flush=True)
    return row


def run_behavior(model, tokenizer, folder: Path, output: Path, args, result: dict | None = None) -> dict:
    """Fits a behavior with `fit_l2s_bundle` (unless `result` holds a finished fit, whose bundle is read back from
    `output/bundle`) and scores the requested variants it does not have yet."""
    behavior = CAAFit(folder, model, tokenizer)
    if behavior.protocol not in PAIRED_PROTOCOLS:
        return {"skipped": f"protocol `{behavior.protocol}` has no positive/negative answer pair per item: no oracle "
                           "vectors, no L2S"}
    engine = SteeringEngine(model)
    if result is None:
        bundle, result = fit_l2s_bundle(model, tokenizer, folder, output / "bundle", context_layers=args.context_layers,
                                        lrs=args.lrs, max_val=args.max_val, engine=engine, progress=args.progress)
        result["test"] = {}
    else:
        bundle = SteeringBundle.load(output / "bundle")
    for variant in args.variants:
        if variant not in result["test"]:
            result["test"][variant] = score_variant(model, behavior, bundle, result, variant, engine)
    return result


def mean_over(results: dict, variant: str, method: str, key: str) -> float | None:
    values = [r["test"][variant][method][key] for r in results.values() if variant in r.get("test", {})]
    return float(np.mean(values)) if values else None


def cell(value: float | None, signed: bool = True) -> str:
    return "n/a" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")


def write_report(results: dict, sources: dict[str, str], output: Path, variants: list[str], command: str,
                 minutes: float, args) -> None:
    done = {b: r for b, r in results.items() if "test" in r}
    summary = {variant: {method: {key: mean_over(done, variant, method, key) for key in ("steerability", "prop_steerable")}
                         for method in METHODS} for variant in variants}
    (output / "l2s_table.json").write_text(json.dumps(
        {"command": command, "minutes": minutes, "mean_over_behaviors": summary, "behaviors": results,
         "sources": sources}, indent=2))
    also = f" Behaviors from {', '.join(f'`{a}`' for a in args.also)} are read from those finished runs." if args.also else ""
    lines = [f"# CAA and L2S, fixed layer and W2S ({args.base_model}, test split)", "",
             f"Command: `{command}` ({minutes:.1f} min). Built on the eval in `{args.eval}` (its fit config, "
             f"splits, CAA vectors, fixed layer and W2S router).{also} Mean over "
             f"{len(done)} behaviors ({', '.join(done) or 'none'}); steerability and proportion of steerable examples.", ""]
    if "BASE" in variants:
        lines += ["In distribution (BASE prompts):", "", "| Method | Steerability | Prop. steerable |", "|---|---:|---:|"]
        base = summary["BASE"]
        lines += [f"| {label} | {cell(base[m]['steerability'])} | {cell(base[m]['prop_steerable'], False)} |"
                  for m, label in METHODS.items()]
        groups = sorted(set(sources[b] for b in done))
        if len(groups) > 1:
            lines += ["", "BASE steerability by source (mean over its behaviors):", "",
                      "| Source | behaviors | " + " | ".join(SHORT.values()) + " |", "|---|---:|" + "---:|" * len(SHORT)]
            for group in groups:
                members = {b: r for b, r in done.items() if sources[b] == group}
                lines.append(f"| `{group}` | {len(members)} | "
                             + " | ".join(cell(mean_over(members, "BASE", m, "steerability")) for m in METHODS) + " |")
    ood = [v for v in variants if v != "BASE"]
    if ood:
        lines += ["", "Out of distribution (router and networks trained on BASE):", "",
                  "| Method | " + " | ".join(f"{v} steer. | {v} prop." for v in ood) + " |",
                  "|---|" + "---:|---:|" * len(ood)]
        lines += [f"| {label} | " + " | ".join(f"{cell(summary[v][m]['steerability'])} | "
                                               f"{cell(summary[v][m]['prop_steerable'], False)}" for v in ood) + " |"
                  for m, label in METHODS.items()]
    lines += ["", "Per behavior, BASE steerability (layers: CAA fixed / L2S fixed / context):", "",
              "| behavior | " + " | ".join(SHORT.values()) + " | layers | CAA router | L2S router | eval CAA fixed / W2S |",
              "|---|" + "---:|" * len(SHORT) + "---|---|---|---|"]
    for behavior, r in results.items():
        if "test" not in r:
            lines.append(f"| {behavior} | skipped: {r['skipped']} |" + " |" * (len(SHORT) + 3))
            continue
        base = r["test"].get("BASE")
        if base is None:
            continue
        check = base.get("eval_report")
        check = f"{cell(check['caa_fixed']['steerability'])} / {cell(check['caa_w2s']['steerability'])}" if check else "n/a"
        lines.append(f"| {behavior} | " + " | ".join(cell(base[m]["steerability"]) for m in METHODS)
                     + f" | {r['caa_fixed_layer']} / {r['l2s_fixed_layer']} / {r['context_layer']} | {r['router']} | "
                     + f"{r['l2s_router']} | {check} |")
    lines += ["", "Notes:", "",
              "- L2S fixed layer: best mean train steerability with each input's own oracle vector (paper section 6.1); "
              "context layer: lowest validation MSE of that layer's network among "
              f"{args.context_layers}; networks: 2-layer MLP, hidden 100, tanh, learning rate from {list(args.lrs)} "
              "by validation MSE (appendix D.3). One context layer serves every steering layer.",
              "- CAA + W2S uses the eval bundle's router as it was trained (on CAA sweep labels); where the eval's CV "
              "chose no router, it is the eval's fixed layer, as in the eval's own `w2s_bundle` row.",
              "- L2S + W2S uses its own router: trained like the eval's (same encoder, label smoothing, CV, fallback "
              "to the fixed layer) on the per-input layer sweep with oracle vectors, i.e. on where each input's own "
              "vector steers best (the networks fit the train split almost exactly, so these are L2S's train "
              "labels). It is the router in the saved L2S bundle. `L2S @ CAA router` puts the L2S vectors at the "
              "CAA router's layers instead.",
              "- Persona behaviors under the statement protocol have no positive/negative answer pair per item, so no "
              "oracle vectors and no L2S; under `w2s-hf eval --protocol answer` (Yes/No answers) they have one."]
    (output / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", default="reports/mwe-smollm2", help="folder of the finished `w2s-hf eval`")
    parser.add_argument("--output", default="reports/l2s")
    parser.add_argument("--behaviors", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(PROMPT_VARIANTS), choices=PROMPT_VARIANTS)
    parser.add_argument("--context-layers", nargs="+", type=int, default=[3, 6, 9, 12, 15])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS))
    parser.add_argument("--max-val", type=int, default=None, help="cap on validation examples (default: all)")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="the eval's base model (folder or id)")
    parser.add_argument("--device", default="cpu", help="device of the base model (the networks train on CPU)")
    parser.add_argument("--also", nargs="+", default=[],
                        help="finished outputs of this script on other evals: their behaviors join the table (read only)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    start = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_base_model(args.base_model).to(args.device), load_tokenizer(args.base_model)
    bundles = Path(args.eval) / "bundles"
    behaviors = args.behaviors or sorted(p.name for p in bundles.iterdir() if (p / "report.json").is_file())
    results = {}
    for behavior in behaviors:
        path = output / behavior / "result.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is not None and ("skipped" in saved or set(args.variants) <= set(saved["test"])):
            results[behavior] = saved
            continue
        print(f"{behavior}:" + (" (fitted before; scoring the missing variants)" if saved else ""), flush=True)
        results[behavior] = run_behavior(model, tokenizer, bundles / behavior, output / behavior, args, saved)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results[behavior], indent=2))
    sources = {behavior: args.output for behavior in results}
    for folder in args.also:
        for path in sorted(Path(folder).glob("*/result.json")):
            if path.parent.name not in results:
                results[path.parent.name], sources[path.parent.name] = json.loads(path.read_text()), folder
    write_report(results, sources, output, args.variants, "python " + shlex.join(sys.argv), (time.time() - start) / 60, args)
    print(f"Written to {output} ({(time.time() - start) / 60:.1f} min).")


if __name__ == "__main__":
    main()
