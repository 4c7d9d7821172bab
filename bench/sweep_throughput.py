"""Layer-sweep throughput: w2s-hf's sweep vs a naive loop, in one run on one machine.

Naive = one forward per (sample, layer, multiplier) at batch 1, scored from every position's logits,
as a straightforward implementation would do. Fast = `w2s_hf.training.sweep.layer_sweep` (multiplier 0 shared
by all layers, multipliers batched as rows, blocks below the steered layer replayed from one unsteered
pass, logits only at each row's own scored positions, an item's answers packed into one row over their
shared prompt). Both score the same evaluations on the packaged SmolLM2-135M-Instruct (by default the statement
protocol on the anti-LGBTQ train split; `--protocol answer` scores two answers per sample); the script
checks that their propensities agree and prints evaluations per second and the ratio, and times three
ablations: every position's logits, the batch's union of read positions through the head (each row's own
are projected since 2026-11-30), and (answer protocol) each answer in a row of its own.

    python bench/sweep_throughput.py [--samples 8] [--layers 0 5 10 15 20 25] [--device cpu] [--dtype bfloat16]
                                     [--protocol answer] [--behavior awareness-good]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from unittest import mock

import numpy as np
import torch

from w2s_hf.defaults import DEFAULT_BASE_MODEL, load_base_model, load_tokenizer
from w2s_hf.interventions import AdditiveIntervention
from w2s_hf.steering import SteeringEngine, SteeringRoute
from w2s_hf.training.data import behavior_info, load_behavior, split_dataset
from w2s_hf.training.extraction import caa_vectors
from w2s_hf.training.protocols import Item, build_item
from w2s_hf.training.sweep import layer_sweep


@torch.inference_mode()
def naive_propensity(model, engine: SteeringEngine, intervention: AdditiveIntervention, item: Item, layer: int,
                     multiplier: float) -> float:
    """One item's propensity steered at one layer and multiplier: a batch-1 forward per scored sequence."""
    device = next(model.parameters()).device
    total = 0.0
    for sequence in item.sequences:
        if sequence.sign == 0:
            continue
        ids = torch.tensor([sequence.input_ids], device=device)
        with engine.steer(intervention, SteeringRoute.from_layers([layer], [multiplier], engine.num_layers)):
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
        start, end = sequence.span
        if sequence.kind == "logit_diff":
            score = logits[start - 1, sequence.tokens[0]] - logits[start - 1, sequence.tokens[1]]
        else:
            score = torch.log_softmax(logits[start - 1 : end - 1], -1).gather(-1, ids[0, start:end, None]).mean()
        total += sequence.sign * float(score)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25])
    parser.add_argument("--multipliers", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0, 2.0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each fast variant, after one untimed run (the fastest is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--protocol", default="statement", choices=["statement", "answer"])
    parser.add_argument("--behavior", default="anti-LGBTQ")
    args = parser.parse_args()

    model = load_base_model(DEFAULT_BASE_MODEL, dtype=getattr(torch, args.dtype)).to(args.device)
    tokenizer = load_tokenizer(DEFAULT_BASE_MODEL)
    info = behavior_info(args.behavior)
    train = list(split_dataset(load_behavior(args.behavior))["train"])
    items = [build_item(example, args.protocol, tokenizer, info) for example in train[: args.samples]]
    vectors = caa_vectors(model, items, tokenizer.pad_token_id, progress=False)
    evaluations = len(items) * len(args.layers) * len(args.multipliers)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def sweep(all_logits: bool = False, separate_answers: bool = False, batch_union: bool = False) -> dict:
        with (mock.patch("w2s_hf.training.rows._accepts_logits_to_keep", return_value=False) if all_logits else nullcontext(),
              mock.patch("w2s_hf.training.sweep.packing_works", return_value=False) if separate_answers else nullcontext(),
              mock.patch("w2s_hf.training.rows._head_reads_own_positions", lambda *a: nullcontext([False]))
              if batch_union or all_logits else nullcontext()):
            return layer_sweep(model, items, vectors, tokenizer.pad_token_id, layers=args.layers,
                               multipliers=args.multipliers, batch_size=args.batch_size, progress=False)

    def fastest(function) -> float:  # the fastest of --repeats timed runs
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            function()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    fast = sweep()  # also the warm-up of the timed runs
    fast_seconds = fastest(sweep)
    sweep(all_logits=True)
    all_logits_seconds = fastest(lambda: sweep(all_logits=True))  # ablation: every position's logits
    union = sweep(batch_union=True)
    union_seconds = fastest(lambda: sweep(batch_union=True))  # ablation: the batch's union of read positions
    packed = args.protocol == "answer"
    if packed:
        separate = sweep(separate_answers=True)
        separate_seconds = fastest(lambda: sweep(separate_answers=True))  # ablation: each answer in its own row

    engine, intervention = SteeringEngine(model), AdditiveIntervention(vectors)
    naive = np.zeros_like(fast["propensity"])
    start = time.perf_counter()
    for i in range(len(items)):
        for j, layer in enumerate(args.layers):
            for k, multiplier in enumerate(args.multipliers):
                naive[i, j, k] = naive_propensity(model, engine, intervention, items[i], layer, multiplier)
    sync()
    naive_seconds = time.perf_counter() - start

    difference = float(np.abs(fast["propensity"] - naive).max())
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} samples={len(items)} "
          f"layers={len(args.layers)} multipliers={len(args.multipliers)} evaluations={evaluations}")
    print(f"naive loop : {naive_seconds:8.2f} s  {evaluations / naive_seconds:8.2f} evaluations/s")
    print(f"w2s sweep  : {fast_seconds:8.2f} s  {evaluations / fast_seconds:8.2f} evaluations/s")
    print(f"w2s sweep, every position's logits (ablation): {all_logits_seconds:8.2f} s  "
          f"{evaluations / all_logits_seconds:8.2f} evaluations/s")
    print(f"speed-up   : {naive_seconds / fast_seconds:8.2f}x   max |propensity difference| = {difference:.2e}")
    print(f"scored-position logits alone: {all_logits_seconds / fast_seconds:8.2f}x")
    union_difference = float(np.abs(fast["propensity"] - union["propensity"]).max())
    print(f"w2s sweep, the batch's union of read positions through the head (ablation): {union_seconds:8.2f} s  "
          f"{evaluations / union_seconds:8.2f} evaluations/s")
    print(f"each row's own read positions alone: {union_seconds / fast_seconds:8.2f}x   "
          f"max |propensity difference| = {union_difference:.2e}")
    if packed:
        packing_difference = float(np.abs(fast["propensity"] - separate["propensity"]).max())
        print(f"w2s sweep, each answer in its own row (ablation): {separate_seconds:8.2f} s  "
              f"{evaluations / separate_seconds:8.2f} evaluations/s")
        print(f"answers packed over their shared prompt alone: {separate_seconds / fast_seconds:8.2f}x   "
              f"max |propensity difference| = {packing_difference:.2e}")


if __name__ == "__main__":
    main()
