"""Bundles saved by w2s-hf 0.1.0 (before the package was reorganized) load and steer as they did: the same greedy
tokens, and forward logits equal up to float32 rounding.

The logits were recorded on one machine; another CPU's float32 matmul kernels sum in another order, which moves
the logits' sums by up to 3e-7 relative (seen on an AMD EPYC against the recording machine). `RTOL` allows 1e-5;
turning the steering off moves them by 8e-3 or more, so the check still tells a steered forward from any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_model, make_tokenizer

from w2s_hf import W2SSteeringModel

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_bundles"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
RTOL = 1e-5


def logit_sums(logits: torch.Tensor) -> tuple[float, float]:
    logits = logits.double()
    return float(logits.sum()), float(logits.abs().sum())


@pytest.mark.parametrize("name", sorted(EXPECTED["expected"]))
def test_a_bundle_saved_by_0_1_0_generates_and_scores_as_it_did(name):
    model, tokenizer = make_model("llama"), make_tokenizer()
    w2s = W2SSteeringModel.from_pretrained(FIXTURES / name, base_model=model, tokenizer=tokenizer)
    batch = tokenizer(EXPECTED["prompts"], return_tensors="pt", padding=True)
    expected = EXPECTED["expected"][name]
    tokens = w2s.generate(**batch, max_new_tokens=EXPECTED["max_new_tokens"], do_sample=False, pad_token_id=0)
    assert tokens.tolist() == expected["tokens"]
    recorded = (expected["logits_sum"], expected["logits_abs_sum"])
    with torch.no_grad():
        assert logit_sums(w2s(**batch).logits) == pytest.approx(recorded, rel=RTOL)
        with w2s.disable_steering():
            plain_logits = w2s(**batch).logits
            plain = w2s.generate(**batch, max_new_tokens=EXPECTED["max_new_tokens"], do_sample=False, pad_token_id=0)
    assert plain.tolist() != expected["tokens"], "the fixture steers: its tokens differ from the unsteered model's"
    plain_sums = logit_sums(plain_logits)
    assert all(abs(p - r) > 100 * RTOL * abs(r) for p, r in zip(plain_sums, recorded)), "RTOL tells steered from plain"
