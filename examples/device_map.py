"""Steer a model that Accelerate spreads over devices, with some layers offloaded to disk.

`W2SSteeringModel.from_pretrained(bundle, device_map=..., max_memory=..., offload_folder=...)` passes
the placement arguments to the base model's `from_pretrained`. With `device_map="auto"`, Accelerate
fills GPUs first, then the CPU up to `max_memory`, and offloads the remaining layers to
`offload_folder` on disk. Steering hooks run on whatever device each block's activations are on (and
on blocks whose weights sit on disk), so the output matches the in-memory model exactly.

    python examples/device_map.py                       # packaged SmolLM2, ~half its layers on disk
    python examples/device_map.py --tiny                # tiny random Llama (seconds)
    python examples/device_map.py --max-memory 0=2GiB cpu=4GiB    # e.g. one GPU, then CPU, then disk
"""

from __future__ import annotations

from collections import Counter

import torch
from example_utils import PROMPTS, bundle_folder, encode_prompts, example_parser

from w2s_hf import W2SSteeringModel


def parse_max_memory(items: list[str]) -> dict:
    """`["0=2GiB", "cpu=4GiB"]` → `{0: "2GiB", "cpu": "4GiB"}` (GPU indices as ints, like Accelerate wants)."""
    memory = {}
    for item in items:
        device, amount = item.split("=", 1)
        memory[int(device) if device.isdigit() else device] = amount
    return memory


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(__doc__)
    parser.add_argument("--max-memory", nargs="+", default=None,
                        help="per-device budgets DEVICE=SIZE (default: CPU budget of about half the model)")
    args = parser.parse_args(argv)
    folder = bundle_folder(args)
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else {"cpu": "150KB" if args.tiny else "300MB"}

    in_memory = W2SSteeringModel.from_pretrained(folder)
    offloaded = W2SSteeringModel.from_pretrained(folder, device_map="auto", max_memory=dict(max_memory),
                                                 offload_folder=str(args.workdir / "offload"))
    placement = Counter(offloaded.base_model.hf_device_map.values())
    on_disk = sum(parameter.device.type == "meta" for parameter in offloaded.base_model.parameters())
    print(f"max_memory={max_memory}: modules per device {dict(placement)}; "
          f"{on_disk} weight tensors stay on disk until their block runs")

    batch = encode_prompts(in_memory.tokenizer, PROMPTS)
    kwargs = dict(max_new_tokens=16, do_sample=False)
    expected = in_memory.generate(**batch, **kwargs)
    actual = offloaded.generate(**{k: v.to(offloaded.device) for k, v in batch.items()}, **kwargs)
    print(f"steered generation identical to the in-memory model: {torch.equal(actual.cpu(), expected)}")
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(PROMPTS):
        print(f"  {prompt!r} -> {in_memory.tokenizer.decode(actual[row, width:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
