"""Layer-sweep throughput: w2s-hf's sweep vs a naive loop, in one run on one machine.

Naive = one forward per (sample, layer, multiplier) at batch 1, as a straightforward implementation
would do. Fast = `w2s_hf.sweep.layer_sweep` (multiplier 0 shared by all layers, multipliers batched
as rows, blocks below the steered layer replayed from one unsteered pass). Both score the same
evaluations on the packaged SmolLM2-135M-Instruct (statement protocol, anti-LGBTQ train split); the
script checks that their propensities agree and prints evaluations per second and the ratio.

    python bench/sweep_throughput.py [--samples 8] [--layers 0 5 10 15 20 25] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from w2s_hf.data import behavior_info, load_behavior, split_dataset
from w2s_hf.defaults import DEFAULT_BASE_MODEL, load_base_model, load_tokenizer
from w2s_hf.protocols import build_item
from w2s_hf.steering import AdditiveIntervention, SteeringEngine
from w2s_hf.sweep import caa_vectors, layer_sweep, score_propensities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25])
    parser.add_argument("--multipliers", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0, 2.0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    model = load_base_model(DEFAULT_BASE_MODEL, dtype=getattr(torch, args.dtype)).to(args.device)
    tokenizer = load_tokenizer(DEFAULT_BASE_MODEL)
    info = behavior_info("anti-LGBTQ")
    train = list(split_dataset(load_behavior("anti-LGBTQ"))["train"])
    items = [build_item(example, "statement", tokenizer, info) for example in train[: args.samples]]
    vectors = caa_vectors(model, items, tokenizer.pad_token_id, progress=False)
    evaluations = len(items) * len(args.layers) * len(args.multipliers)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    layer_sweep(model, items[:2], vectors, tokenizer.pad_token_id, layers=args.layers[:1], progress=False)  # warm-up
    sync()
    start = time.perf_counter()
    fast = layer_sweep(model, items, vectors, tokenizer.pad_token_id, layers=args.layers,
                       multipliers=args.multipliers, batch_size=args.batch_size, progress=False)
    sync()
    fast_seconds = time.perf_counter() - start

    engine, intervention = SteeringEngine(model), AdditiveIntervention(vectors)
    naive = np.zeros_like(fast["propensity"])
    start = time.perf_counter()
    for i in range(len(items)):
        for j, layer in enumerate(args.layers):
            for k, multiplier in enumerate(args.multipliers):
                naive[i, j, k] = score_propensities(
                    model, engine, intervention, items, [(i, layer, multiplier)], tokenizer.pad_token_id, batch_size=1
                )[0]
    sync()
    naive_seconds = time.perf_counter() - start

    difference = float(np.abs(fast["propensity"] - naive).max())
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} samples={len(items)} "
          f"layers={len(args.layers)} multipliers={len(args.multipliers)} evaluations={evaluations}")
    print(f"naive loop : {naive_seconds:8.2f} s  {evaluations / naive_seconds:8.2f} evaluations/s")
    print(f"w2s sweep  : {fast_seconds:8.2f} s  {evaluations / fast_seconds:8.2f} evaluations/s")
    print(f"speed-up   : {naive_seconds / fast_seconds:8.2f}x   max |propensity difference| = {difference:.2e}")


if __name__ == "__main__":
    main()
