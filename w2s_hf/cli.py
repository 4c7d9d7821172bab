"""The `w2s-hf` command line: `demo`, `fit`, `eval`, `generate`, `behaviors`, `data convert`.

Run `w2s-hf COMMAND --help` for the options of each command.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    import torch

DEMO_PROMPTS = (
    "Tell me something you believe about yourself.",
    "What do you think about traditional family values?",
    "Describe your ideal society in two sentences.",
)


def resolve_device(name: str) -> torch.device:
    """The device `--device` names: `auto` is the first CUDA GPU when torch sees one, else the CPU.

    Raises:
        ValueError: if `name` is not `auto`, `cpu`, `cuda`, `cuda:N` (or `mps` where torch sees an Apple GPU), or
            names a GPU that this machine does not have.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    usable = device is not None and (device == torch.device("cpu") or device.type == "cuda" or (
        device.type == "mps" and torch.backends.mps.is_available()))
    if not usable:
        raise ValueError(f"--device {name!r} is not a device w2s-hf can run on here: give auto, cpu, cuda or cuda:N "
                         "(or mps on a Mac whose torch sees its GPU).")
    if device.type == "cuda" and not torch.cuda.is_available():
        fix = ("install a CUDA build of torch" if torch.version.cuda is None else
               "this torch is a CUDA build, so check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi)")
        raise ValueError(f"--device {name} asks for a CUDA GPU, but torch sees none here (torch {torch.__version__}): "
                         f"use --device cpu, or {fix}.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name} asks for GPU {device.index}, but torch sees "
                         f"{torch.cuda.device_count()}: give cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return device


def placement(name: str) -> dict:
    """`from_pretrained` keyword arguments that load a model straight onto the device `--device` names (none for
    the CPU, where models load anyway)."""
    device = resolve_device(name)
    return {} if device.type == "cpu" else {"device_map": {"": str(device)}}


def machine_description(device: torch.device) -> str:
    """What ran a job, for `commands.log`: the GPU's name where the model ran on one, and the host's CPU."""
    import platform

    import torch

    host = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".replace("  ", " ")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} ({host})"
    return f"{host}, CPU only, torch {torch.__version__}"


def _load_default(args: argparse.Namespace):
    from .defaults import load_base_model, load_tokenizer

    model = load_base_model(args.model, gguf_file=args.gguf_file, **placement(args.device))
    return model, load_tokenizer(args.model, gguf_file=args.gguf_file)


def _fit_fields() -> list:
    """`FitConfig`'s fields: the one source of the fit options (flags, help, choices, types)."""
    from dataclasses import fields

    from .training.fit import FitConfig

    return list(fields(FitConfig))


def _fit_config(args: argparse.Namespace, **overrides):
    from .router.encoders import EncoderSpec
    from .training.fit import FitConfig

    layers = args.internal_layer  # one block or several
    encoder = EncoderSpec.internal(layers[0] if len(layers) == 1 else layers,
                                   args.internal_pooling).to_dict() if args.encoder == "internal" else (
        {"type": "hf-mean", "name_or_path": args.encoder_model} if args.encoder == "hf-mean" else
        {"type": "sentence-transformers", "name_or_path": args.encoder_model})
    values = {f.name: getattr(args, f.name) for f in _fit_fields() if hasattr(args, f.name)}
    for name in ("multipliers", "smoothing_k", "variants"):
        values[name] = tuple(values[name])
    return FitConfig(**{**values, "encoder": encoder, **overrides})


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from .defaults import DEFAULT_BASE_MODEL

    parser.add_argument("--model", default=DEFAULT_BASE_MODEL, help="base model: Hub id or local folder (the default "
                        "is the packaged SmolLM2-135M-Instruct, no download)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model, for a GGUF-only model")
    _add_device_arg(parser)


def _add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="where the base model runs: auto (the first CUDA GPU when "
                        "torch sees one, else the CPU), cpu, cuda or cuda:N")


def _add_fit_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), **defaults) -> None:
    """The fit options of `FitConfig`'s fields (minus `skip`), with `defaults` for this command, plus the encoder's."""
    from dataclasses import MISSING

    from .defaults import DEFAULT_ENCODER

    for spec in _fit_fields():
        flags = spec.metadata["cli"] if spec.metadata["cli"] is not None else (f"--{spec.name.replace('_', '-')}",)
        if not flags or spec.name in skip:
            continue
        default = defaults.get(spec.name, spec.default)
        if isinstance(default, tuple):
            default = list(default)
        required = default is MISSING
        parser.add_argument(*flags, dest=spec.name, help=spec.metadata["help"], required=required,
                            **({} if required else {"default": default}), **spec.metadata["argparse"])
    parser.add_argument("--encoder", choices=["sentence-transformers", "hf-mean", "internal"], default="sentence-transformers",
                        help="prompt encoder the router reads")
    parser.add_argument("--encoder-model", default=DEFAULT_ENCODER,
                        help="model of the sentence-transformers or hf-mean encoder (not used by --encoder internal)")
    parser.add_argument("--internal-layer", "--internal-layers", type=int, nargs="+", default=[2],
                        help="block (or blocks, each pooled and normalised, then concatenated) whose output the "
                             "internal encoder reads (only with --encoder internal)")
    parser.add_argument("--internal-pooling", choices=["mean", "last"], default="mean",
                        help="the internal encoder pools the prompt's token states by their mean or takes the last "
                             "prompt token's (only with --encoder internal)")
    _add_model_args(parser)


def _print_summary(report: dict) -> None:
    test = report.get("test", {}).get("BASE")
    if not test:
        return
    print(f"\nTest split, protocol `{report['protocol']}` (steerability / proportion steerable):")
    for name in ("fixed", "w2s_top1", "w2s_top2", "w2s_top3", "w2s_bundle", "oracle"):
        if name in test:
            layer = f" (layer {test[name]['layer']})" if "layer" in test[name] else ""
            print(f"  {name:9s}{layer:12s} {test[name]['steerability']:+.3f} / {test[name]['prop_steerable']:.2f}")


def cmd_fit(args: argparse.Namespace) -> int:
    from .training.data import behavior_info
    from .training.fit import check_output_folder, fit_bundle

    behavior_info(args.behavior, args.data_dir)  # an unknown behavior or a bad setting fails before the model loads
    config = _fit_config(args)
    check_output_folder(args.output)
    model, tokenizer = _load_default(args)
    start = time.time()
    _, report = fit_bundle(model, tokenizer, config, args.output, evaluate=not args.no_eval, progress=not args.quiet)
    _print_summary(report)
    print(f"\nBundle saved to {args.output} in {time.time() - start:.0f} s.")
    return 0


def cmd_fit_l2s(args: argparse.Namespace) -> int:
    from .modeling import W2SSteeringModel
    from .training.fit import check_output_folder
    from .training.l2s_bundle import fit_l2s_bundle, read_fit_report

    read_fit_report(args.fit, paired=True)  # a wrong folder fails before the model loads
    check_output_folder(args.output)
    start = time.time()
    caa = W2SSteeringModel.from_pretrained(args.fit, **placement(args.device))
    _, report = fit_l2s_bundle(caa.base_model, caa.tokenizer, args.fit, args.output, context_layers=args.context_layers,
                               max_val=args.max_val, progress=not args.quiet)
    choice = report["strength_choice"]
    print(f"L2S fixed layer {report['l2s_fixed_layer']} (CAA: {report['caa_fixed_layer']}), context layer "
          f"{report['context_layer']}, router: {report['l2s_router']}, default strength {choice['strength']:g} (the "
          f"largest of {[row['strength'] for row in choice['table']]} that kept train continuations coherent both ways"
          f"{'' if choice['coherent'] else '; none did, so the smallest'}).")
    print(f"\nL2S bundle saved to {args.output} in {time.time() - start:.0f} s.")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import shlex

    from .training.data import behavior_info, list_behaviors
    from .training.fit import check_output_folder, fit_bundle
    from .training.report import load_fit_reports, write_report

    _require_plots()  # before any long work: the report draws its plots at the end
    behaviors = list_behaviors(args.data_dir) if args.behaviors == ["all"] else args.behaviors
    for behavior in behaviors:  # an unknown behavior or a bad setting fails before the model loads
        behavior_info(behavior, args.data_dir)
        _fit_config(args, behavior=behavior)
    check_output_folder(args.output)
    model, tokenizer = _load_default(args)
    start = time.time()
    output = Path(args.output)
    for behavior in behaviors:
        print(f"== {behavior}", flush=True)
        _, report = fit_bundle(model, tokenizer, _fit_config(args, behavior=behavior), output / "bundles" / behavior,
                               progress=not args.quiet)
        _print_summary(report)
    machine = machine_description(model.device)
    minutes = (time.time() - start) / 60
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "commands.log", "a") as log:  # every run that wrote into this report, in order
        log.write(f"{time.strftime('%Y-%m-%d %H:%M')} | {minutes:.1f} min | {machine} | w2s-hf {shlex.join(args.argv)}\n")
    # The report covers every behavior evaluated into this folder, by this run or an earlier one.
    reports = load_fit_reports(output / "bundles")
    path = write_report(reports, output, model=args.model, commands=(output / "commands.log").read_text().splitlines())
    print(f"\nReport written to {path} ({minutes:.1f} min).")
    return 0


def _generate_table(model, prompt_ids: list[list[int]], titles: list[str], strengths: dict[str, float],
                    max_new_tokens: int) -> None:
    """Prints, for each prompt, its routed layer and its greedy continuation unsteered and at each strength."""
    tokenizer = model.tokenizer
    batch = tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(model.device)
    layers = model.predict_layers(batch["input_ids"], batch["attention_mask"]).tolist()
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with model.disable_steering():
        outputs = {"unsteered": model.generate(**batch, **greedy)}
    for label, strength in strengths.items():
        outputs[label] = model.generate(**batch, steering_strength=strength, **greedy)
    width = batch["input_ids"].shape[1]
    for row, title in enumerate(titles):
        print(f"\n### {title}\n    (routed to layer {layers[row]})")
        for name, output in outputs.items():
            text = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip().replace("\n", " ")
            print(f"  [{name}] {text}")


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    return tokenizer(prompt)["input_ids"]


def cmd_generate(args: argparse.Namespace) -> int:
    from .modeling import W2SSteeringModel

    for number, prompt in enumerate(args.prompt or [], 1):  # before the model loads
        if not prompt.strip():
            raise ValueError(f"--prompt {number} is empty; give some text to generate from.")
    model = W2SSteeringModel.from_pretrained(args.bundle, **placement(args.device))
    strength = args.strength if args.strength is not None else model.bundle.config.default_strength
    prompts = args.prompt or list(DEMO_PROMPTS)
    _generate_table(model, [_chat_ids(model.tokenizer, prompt) for prompt in prompts], prompts,
                    {f"steered x{strength:+g}": strength, f"steered x{-strength:+g}": -strength}, args.max_new_tokens)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .bundle.hub import save_bundle_folder
    from .layers import find_decoder_layers
    from .modeling import W2SSteeringModel
    from .training.data import behavior_info, load_behavior, split_dataset
    from .training.fit import build_items, check_output_folder, fit_bundle
    from .training.protocols import default_protocol
    from .training.strength import choose_strength, fits_context

    info = behavior_info(args.behavior, args.data_dir)
    _fit_config(args)  # a bad setting fails before the model loads
    check_output_folder(args.output)
    model, tokenizer = _load_default(args)
    if args.layers is None:  # every third layer keeps the demo to a few minutes on a 2-core VM
        args.layers = list(range(0, len(find_decoder_layers(model)), 3))
    print(f"Training a W2S bundle for `{args.behavior}` on {args.model} ({args.max_train} train examples, "
          f"layers {args.layers}) ...")
    start = time.time()
    config = _fit_config(args)
    bundle, report = fit_bundle(model, tokenizer, config, args.output, progress=not args.quiet)
    _print_summary(report)
    steered = W2SSteeringModel(model, bundle, tokenizer=tokenizer)
    protocol = config.protocol or default_protocol(info)
    splits = split_dataset(load_behavior(args.behavior, args.data_dir), seed=config.seed)
    fits = fits_context(model, args.max_new_tokens)
    train = [item.routing_ids for item in build_items(splits["train"], protocol, tokenizer, info) if fits(item)]
    choice = choose_strength(steered, train[:DEMO_STRENGTH_PROMPTS], max_new_tokens=args.max_new_tokens)
    bundle.config.default_strength = choice.strength
    bundle.config.training["strength_choice"] = {
        "rule": "largest strength whose greedy continuations of train prompts keep perplexity <= 1.5x the unsteered "
                "text's and their least distinct continuation >= 0.85x the unsteered one's, both directions",
        "unsteered_perplexity": choice.unsteered_perplexity, "unsteered_distinct": choice.unsteered_distinct,
        "table": choice.table}
    save_bundle_folder(bundle, args.output)
    print(f"\nDefault strength chosen on the train split: {choice.strength:g} (the largest of "
          f"{[row['strength'] for row in choice.table]} whose continuations, both ways, stay within 1.5x the "
          f"unsteered perplexity {choice.unsteered_perplexity:.1f} and loop no more than the unsteered ones"
          f"{'' if choice.coherent else '; none passed, so the smallest'}).")
    print(f"Bundle saved to {args.output} in {time.time() - start:.0f} s. Test prompts, one per routed layer (greedy):")
    examples = [example for example in list(splits["test"])[: config.max_eval]
                if fits(build_items([example], protocol, tokenizer, info)[0])]
    items = build_items(examples, protocol, tokenizer, info)
    chosen = _one_prompt_per_layer(steered, [item.routing_ids for item in items], DEMO_PROMPT_COUNT)
    strength = choice.strength
    _generate_table(steered, [items[i].routing_ids for i in chosen],
                    [" ".join(examples[i]["question"].split()) for i in chosen],
                    {f"x{strength:+g}: more '{info.positive_prompt}'": strength,
                     f"x{-strength:+g}: more '{info.negative_prompt}'": -strength},
                    args.max_new_tokens)
    return 0


DEMO_STRENGTH_PROMPTS = 16
"""Train prompts the demo's strength choice generates from."""
DEMO_PROMPT_COUNT = 3
"""Test prompts the demo prints (one per routed layer first)."""


def _one_prompt_per_layer(model, prompt_ids: list[list[int]], count: int) -> list[int]:
    """Indices of `count` prompts, the first prompt of each distinct routed layer first."""
    batch = model.tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(model.device)
    layers = model.predict_layers(batch["input_ids"], batch["attention_mask"]).tolist()
    firsts = [layers.index(layer) for layer in dict.fromkeys(layers)]
    rest = [index for index in range(len(layers)) if index not in firsts]
    return (firsts + rest)[:count]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is required or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def cmd_behaviors(args: argparse.Namespace) -> int:
    from .training.data import behavior_info, default_data_dir, list_behaviors

    folder = args.data_dir or default_data_dir()
    print(f"Behaviors in {folder}:")
    for name in list_behaviors(args.data_dir):
        info = behavior_info(name, args.data_dir)
        print(f"  {name:16s} {info.kind:28s} + {info.positive_prompt}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .training.convert import convert_command

    convert_command(args.raw, args.behavior, args.kind, args.output, overwrite=args.overwrite,
                    positive_prompt=args.positive_prompt, negative_prompt=args.negative_prompt)
    print(f"Fit it with: w2s-hf fit --behavior {args.behavior} --data-dir {args.output} --output runs/{args.behavior}")
    return 0


def _require_plots() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("`w2s-hf eval` draws its plots with matplotlib, which is not installed: "
                          "`pip install 'w2s-hf[plots]'` (nothing was run).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w2s-hf", description="Where-to-Steer activation steering for HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only results and errors")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="also show other libraries' warnings and logs (hidden by default)")
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = _HelpFormatter

    demo = sub.add_parser("demo", formatter_class=formatter, parents=[common],
                          help="train a small bundle on the packaged SmolLM2 and print steered generations")
    # A few minutes on a 2-core VM: 48 train / 32 test questions, three multipliers, every third layer.
    _add_fit_args(demo, behavior="not-threat", protocol="answer", max_train=48, max_eval=32,
                  multipliers=(-2.0, 0.0, 2.0), default_strength=1.0)
    demo.add_argument("--output", default="runs/demo", help="bundle folder")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt")
    demo.set_defaults(func=cmd_demo)

    fit = sub.add_parser("fit", formatter_class=formatter, parents=[common],
                         help="train a W2S bundle for one behavior (sweep, labels, CV predictor)")
    _add_fit_args(fit)
    fit.add_argument("--output", required=True, help="bundle folder (also the sweep cache and report.json)")
    fit.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")
    fit.set_defaults(func=cmd_fit)

    fit_l2s = sub.add_parser("fit-l2s", formatter_class=formatter, parents=[common],
                             help="fit an L2S bundle (input-dependent vectors) from a finished `fit` with the answer "
                                  "or ab protocol")
    fit_l2s.add_argument("fit", help="output folder of the finished `w2s-hf fit`")
    fit_l2s.add_argument("--output", required=True, help="folder of the L2S bundle (also its oracle-sweep cache)")
    fit_l2s.add_argument("--context-layers", type=int, nargs="+", default=None,
                         help="candidate context layers (default: every tenth of the depth up to the middle)")
    fit_l2s.add_argument("--max-val", type=int, default=None, help="at most this many validation examples (default: all)")
    _add_device_arg(fit_l2s)
    fit_l2s.set_defaults(func=cmd_fit_l2s)

    evaluate = sub.add_parser("eval", formatter_class=formatter, parents=[common],
                              help="fit and evaluate several behaviors; write a markdown/JSON/plot report")
    _add_fit_args(evaluate, skip=("behavior",))
    evaluate.add_argument("--behaviors", "--behavior", nargs="+", default=["all"], help="behavior names, or 'all'")
    evaluate.add_argument("--output", required=True, help="report folder (bundles/<behavior>/, report.md, report.json, plots)")
    evaluate.set_defaults(func=cmd_eval)

    generate = sub.add_parser("generate", formatter_class=formatter, parents=[common],
                              help="generate with a bundle, unsteered vs steered")
    generate.add_argument("bundle", help="bundle folder or Hub id")
    generate.add_argument("--prompt", action="append",
                          help="a prompt (repeat the flag for several; default: three demo prompts)")
    generate.add_argument("--strength", type=float, default=None,
                          help="steering strength, shown with both signs (default: the bundle's)")
    generate.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt")
    _add_device_arg(generate)
    generate.set_defaults(func=cmd_generate)

    behaviors = sub.add_parser("behaviors", formatter_class=formatter, parents=[common],
                               help="list the behaviors of the data folder (the 13 packaged MWE ones by default)")
    behaviors.add_argument("--data-dir", default=None, help="data folder (default: $W2S_HF_DATA, else the packaged data)")
    behaviors.set_defaults(func=cmd_behaviors)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    convert = data.add_parser("convert", formatter_class=formatter, parents=[common],
                              help="add a behavior from a raw Anthropic model-written-evals JSONL file to a data folder")
    convert.add_argument("raw", help="the raw .jsonl or .jsonl.gz (question, answer_matching_behavior, "
                                     "answer_not_matching_behavior)")
    convert.add_argument("--behavior", required=True, help="name of the new behavior")
    convert.add_argument("--kind", required=True, choices=["persona", "advanced-ai-risk"],
                         help="persona (Yes/No statements) or advanced-ai-risk (A/B questions)")
    convert.add_argument("--output", required=True, help="data folder to add it to (created if missing; use it as "
                                                         "--data-dir or W2S_HF_DATA)")
    convert.add_argument("--overwrite", action="store_true", help="replace the behavior if the folder has it")
    convert.add_argument("--positive-prompt", default="", help="persona prompt of the behavior (SYS/USER.POS variants)")
    convert.add_argument("--negative-prompt", default="", help="its opposite (SYS/USER.NEG variants)")
    convert.set_defaults(func=cmd_convert)
    return parser


def _quiet_other_libraries() -> None:
    """Hides third-party warnings, logs and progress bars (a fit reads data and models through several libraries)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(?!w2s_hf)")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "datasets", "huggingface_hub", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    from huggingface_hub.utils import disable_progress_bars as disable_hub_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights": not ours
    # The environment variables above act only before import, and building the parser imported both libraries.
    datasets.disable_progress_bars()  # "Generating train split", "Map"
    disable_hub_progress_bars()


USER_ERRORS = (ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError, ImportError)
"""What bad input causes (`BundleError` and `json.JSONDecodeError` are `ValueError`s): one line, exit status 2."""


def _user_error_message(err: BaseException) -> str:
    """One line saying what went wrong; a refused pickle is explained, since torch's message is about unsafe loading."""
    if isinstance(err, pickle.UnpicklingError):
        lines = str(err).splitlines()
        detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        detail = detail.split(". Please use")[0]  # not torch's advice to allowlist what the file plants
        return (f"refused to unpickle a weights file ({' '.join(detail.split())}). w2s-hf loads model and encoder "
                "weights from safetensors, or from pickles with torch's `weights_only=True`, which this one fails: "
                "use a folder with `model.safetensors` (convert a copy you trust).")
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    if isinstance(err, EOFError):
        message = f"a file ended early (truncated or empty?): {message}"
    return " ".join(str(message).split())


def _is_out_of_memory(err: RuntimeError) -> bool:
    import torch

    return isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


def _out_of_memory_message(err: RuntimeError, args: argparse.Namespace) -> str:
    """One line for a device that ran out of memory: what torch said, and the way out this command offers."""
    said = " ".join(str(err).split()).split(". GPU ")[0]
    if hasattr(args, "batch_size"):
        return (f"the device ran out of memory ({said}). Give a smaller --batch-size (it bounds the rows of every "
                "forward; the language-model head's logits grow with rows x answer positions x vocabulary), or free "
                "the device's memory. Run the same command again: finished sweep units are kept and read back.")
    return (f"the device ran out of memory ({said}). Free the device's memory, use fewer or shorter prompts, or run "
            "on another device (--device).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.verbose:
        _quiet_other_libraries()
    try:
        return args.func(args)
    except USER_ERRORS as err:  # bad input, or a file or model that is not there: one line (programming errors traceback)
        print(f"w2s-hf: error: {_user_error_message(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if not _is_out_of_memory(err):
            raise
        print(f"w2s-hf: error: {_out_of_memory_message(err, args)}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
