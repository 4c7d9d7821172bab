"""`pipeline("text-generation")` with a steered model: a drop-in replacement for the base model.

    python examples/pipeline.py [--bundle runs/demo]     # packaged SmolLM2
    python examples/pipeline.py --tiny                   # tiny random Llama (seconds)
"""

from __future__ import annotations

from example_utils import PROMPTS, bundle_folder, encode_prompts, example_parser
from transformers import pipeline

from w2s_hf import W2SSteeringModel


def main(argv: list[str] | None = None) -> None:
    args = example_parser(__doc__).parse_args(argv)
    model = W2SSteeringModel.from_pretrained(bundle_folder(args))
    tokenizer = model.tokenizer
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=24, do_sample=False, return_full_text=False)
    for prompt in PROMPTS:
        # Chat models take a list of messages; a plain string works for any tokenizer.
        text_input = [{"role": "user", "content": prompt}] if tokenizer.chat_template else prompt
        steered = generator(text_input, **kwargs)[0]["generated_text"]
        with model.disable_steering():
            base = generator(text_input, **kwargs)[0]["generated_text"]
        # The pipeline steers exactly like model.generate on the same tokens.
        batch = encode_prompts(tokenizer, [prompt])
        direct = model.generate(**batch, max_new_tokens=24, do_sample=False)
        same = tokenizer.decode(direct[0, batch["input_ids"].shape[1]:], skip_special_tokens=True) == steered
        print(f"\n### {prompt}\n  [base] {base!r}\n  [steered] {steered!r}\n  pipeline == generate: {same}")


if __name__ == "__main__":
    main()
