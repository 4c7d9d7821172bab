"""Issue 5 report: attention-guided vs answer-token CAA vectors, and layer relevance vs sweep steerability.

Reuses the CAA eval (`w2s-hf eval ... --output reports/mwe-smollm2`): its per-behavior report.json gives
the CAA fixed-layer / W2S test results and the train sweep's mean steerability per layer, and its
`fit` section gives the exact FitConfig, so the attention run uses identical settings (only the
extraction differs) and the CAA sweep is never recomputed. A behavior without a CAA report is
skipped (re-run the same `w2s-hf eval` command: it resumes from its cache).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from w2s_hf.attention_features import attention_features, layer_relevance
from w2s_hf.data import behavior_info, list_behaviors, load_behavior, split_dataset
from w2s_hf.defaults import DEFAULT_BASE_MODEL, load_base_model, load_tokenizer
from w2s_hf.train import FitConfig, build_items, fit_bundle


def spearman(x, y) -> float:
    def ranks(values):
        values = np.asarray(values, dtype=float)
        rank = np.empty(len(values))
        rank[values.argsort(kind="stable")] = np.arange(len(values))
        for value in np.unique(values):  # average ranks of ties
            rank[values == value] = rank[values == value].mean()
        return rank

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1]) if rx.std() > 0 and ry.std() > 0 else float("nan")


parser = argparse.ArgumentParser()
parser.add_argument("--model", default=DEFAULT_BASE_MODEL)
parser.add_argument("--caa", default="reports/mwe-smollm2", help="output folder of the CAA `w2s-hf eval`")
parser.add_argument("--output", default="runs/attention-smollm2")
parser.add_argument("--behaviors", nargs="+", default=["all"])
parser.add_argument("--effect-items", type=int, default=16)
args = parser.parse_args()

model, tokenizer = load_base_model(args.model), load_tokenizer(args.model)
output = Path(args.output)
rows, start = {}, time.time()
for behavior in list_behaviors() if args.behaviors == ["all"] else args.behaviors:
    caa_path = Path(args.caa) / "bundles" / behavior / "report.json"
    if not caa_path.is_file():
        print(f"skip {behavior}: no CAA report at {caa_path}")
        continue
    caa = json.loads(caa_path.read_text())
    fit = {**caa["fit"], "extraction": "attention", "relevance_prune": None}
    began = time.time()
    _, att = fit_bundle(model, tokenizer, FitConfig(**fit), output / "bundles" / behavior)
    swept = caa["fit"]["layers"] or list(range(len(caa["train"]["mean_steerability_per_layer"])))
    train = build_items(split_dataset(load_behavior(behavior, fit["data_dir"]), seed=fit["seed"])["train"],
                        caa["protocol"], tokenizer, behavior_info(behavior, fit["data_dir"]), limit=fit["max_train"])
    relevance = {}
    for name, read_mix in (("attention", 0.0), ("caa", 1.0)):
        features = attention_features(model, train, tokenizer.pad_token_id, read_mix=read_mix,
                                      batch_size=fit["batch_size"])
        relevance[name] = layer_relevance(model, train, tokenizer.pad_token_id, features=features, layers=swept,
                                          effect_items=args.effect_items, batch_size=fit["batch_size"])
    curve = caa["train"]["mean_steerability_per_layer"]  # the cached CAA sweep, same layers as `swept`
    c, a = caa["test"]["BASE"], att["test"]["BASE"]
    rows[behavior] = {
        "protocol": caa["protocol"],
        "caa_fixed": c["fixed"], "attention_fixed": a["fixed"],
        "caa_w2s": c["w2s_bundle"], "attention_w2s": a["w2s_bundle"],
        "caa_oracle": c["oracle"], "attention_oracle": a["oracle"],
        "layers": swept,
        "caa_train_curve": curve, "attention_train_curve": att["train"]["mean_steerability_per_layer"],
        "relevance": {name: r.to_dict() for name, r in relevance.items()},
        "spearman": {
            "relevance(caa feats) vs caa sweep": spearman(relevance["caa"].score, curve),
            "separation(caa feats) vs caa sweep": spearman(relevance["caa"].separation, curve),
            "effect(caa feats) vs caa sweep": spearman(relevance["caa"].effect, curve),
            "relevance(attn feats) vs caa sweep": spearman(relevance["attention"].score, curve),
            "relevance(attn feats) vs attn sweep": spearman(relevance["attention"].score,
                                                            att["train"]["mean_steerability_per_layer"]),
        },
        "seconds": time.time() - began,
    }
    print(behavior, json.dumps({k: rows[behavior][k] for k in ("caa_fixed", "attention_fixed", "spearman")}),
          flush=True)

lines = ["| behavior | protocol | CAA fixed (layer) | attn fixed (layer) | CAA W2S | attn W2S | "
         "ρ rel(CAA)~sweep | ρ sep~sweep | ρ eff~sweep | ρ rel(attn)~sweep |", "|" + "---|" * 10]
for name, r in rows.items():
    s = r["spearman"]
    lines.append(
        f"| {name} | {r['protocol']} | {r['caa_fixed']['steerability']:.3f} ({r['caa_fixed']['layer']}) | "
        f"{r['attention_fixed']['steerability']:.3f} ({r['attention_fixed']['layer']}) | "
        f"{r['caa_w2s']['steerability']:.3f} | {r['attention_w2s']['steerability']:.3f} | "
        f"{s['relevance(caa feats) vs caa sweep']:.2f} | {s['separation(caa feats) vs caa sweep']:.2f} | "
        f"{s['effect(caa feats) vs caa sweep']:.2f} | {s['relevance(attn feats) vs caa sweep']:.2f} |")
if rows:
    def mean(key: str, field: str) -> float:
        return float(np.mean([r[key][field] for r in rows.values()]))

    lines.append(
        f"| **mean** | | {mean('caa_fixed', 'steerability'):.3f} | {mean('attention_fixed', 'steerability'):.3f} | "
        f"{mean('caa_w2s', 'steerability'):.3f} | {mean('attention_w2s', 'steerability'):.3f} | "
        + " | ".join(f"{np.nanmean([r['spearman'][k] for r in rows.values()]):.2f}" for k in (
            "relevance(caa feats) vs caa sweep", "separation(caa feats) vs caa sweep",
            "effect(caa feats) vs caa sweep", "relevance(attn feats) vs caa sweep")) + " |")
    wins = sum(r["attention_fixed"]["steerability"] > r["caa_fixed"]["steerability"] for r in rows.values())
    lines.append(f"\nAttention-guided beats answer-token CAA at the fixed layer on {wins}/{len(rows)} behaviors; "
                 f"total {(time.time() - start) / 60:.1f} min.")
output.mkdir(parents=True, exist_ok=True)
(output / "attention_vs_caa.json").write_text(json.dumps(rows, indent=2))
(output / "attention_vs_caa.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
