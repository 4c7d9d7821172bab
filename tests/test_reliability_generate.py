"""Reliability: steering settings follow the call, and `generate` steers as asked in its less common modes.

Contexts in asyncio tasks and in threads started inside them (the streaming recipe), static caches, chunked
prefill, continuing from a cache, and an interrupt at any point while hooks are put in place.
The matrix of faults tried and what each gets is in RELIABILITY.md at the repo root.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from threading import Thread

import pytest
import torch
from helpers import GENERATE, NUM_LAYERS, PROMPTS, hook_state, make_bundle, make_model, make_tokenizer
from transformers import TextIteratorStreamer

from w2s_hf import W2SSteeringModel, call_settings
from w2s_hf.interventions import AdditiveIntervention
from w2s_hf.steering import SteeringEngine, SteeringRoute, _ActiveSteering

# Routed with seed 3, these prompts go to different layers than their first 4 tokens would send them.
ROUTED_PROMPTS = [*PROMPTS, "Why is the sky blue? Explain it to a child please.", "2+2?",
                  "Write a haiku about the sea and the moon."]
GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture
def w2s() -> W2SSteeringModel:
    model = make_model("llama")
    return W2SSteeringModel(model, make_bundle(model, seed=3), tokenizer=make_tokenizer())


def _batch(w2s: W2SSteeringModel, prompts: list[str] = PROMPTS) -> dict[str, torch.Tensor]:
    return dict(w2s.tokenizer(prompts, return_tensors="pt", padding=True))


def _by_hand(w2s: W2SSteeringModel, layer: int, strength: float) -> SteeringEngine:
    """The oracle: the engine steering every row at `layer` by hand, with the bundle's vectors."""
    route = SteeringRoute.from_layers([layer], strength, NUM_LAYERS)
    return SteeringEngine(w2s.base_model).steer(AdditiveIntervention(w2s.bundle.steering_vectors), route,
                                               policy=w2s.bundle.config.position_policy)


def _steered_layers(monkeypatch) -> list[torch.Tensor]:
    """Records the layer mask every steering hook used (the last one holds the call's final routing)."""
    seen: list[torch.Tensor] = []
    route_for = _ActiveSteering.route_for

    def spy(self, batch: int, device: torch.device) -> SteeringRoute:
        seen.append(self.route.layer_mask.clone())
        return route_for(self, batch, device)

    monkeypatch.setattr(_ActiveSteering, "route_for", spy)
    return seen


# ------------------------------------------------------------------ 1. settings follow the call


def test_asyncio_tasks_each_keep_their_own_steering_settings(w2s):
    batch = _batch(w2s)
    routed = w2s(**batch).logits
    with _by_hand(w2s, 1, 4.0):
        layer_1 = w2s.base_model(**batch).logits
    with _by_hand(w2s, 3, -4.0):
        layer_3 = w2s.base_model(**batch).logits
    unsteered = w2s.base_model(**batch).logits

    async def steered(context: Callable[[], object]) -> torch.Tensor:
        with context():
            await asyncio.sleep(0)  # the other tasks enter their own blocks here
            await asyncio.sleep(0)
            return w2s(**batch).logits

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(steered(lambda: w2s.steering(layer=1, strength=4.0)),
                                    steered(lambda: w2s.steering(layer=3, strength=-4.0)),
                                    steered(w2s.disable_steering))

    got = asyncio.run(main())
    for logits, want in zip(got, (layer_1, layer_3, unsteered)):
        torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert not torch.equal(layer_1, layer_3) and not torch.equal(layer_1, unsteered)
    torch.testing.assert_close(w2s(**batch).logits, routed, rtol=0, atol=0)  # nothing stays active


def test_contexts_exited_out_of_order_leave_no_setting_active(w2s):
    batch = _batch(w2s)
    routed = w2s(**batch).logits
    outer, inner = w2s.steering(layer=1, strength=4.0), w2s.disable_steering()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    torch.testing.assert_close(w2s(**batch).logits, w2s.base_model(**batch).logits, rtol=0, atol=0)
    inner.__exit__(None, None, None)
    torch.testing.assert_close(w2s(**batch).logits, routed, rtol=0, atol=0)


@pytest.mark.parametrize("consume_inside", [True, False], ids=["read-inside-the-block", "read-after-the-block"])
@pytest.mark.parametrize("setting", ["disable_steering", "steering"])
def test_streaming_recipe_in_a_thread_steers_as_the_block_says(w2s, setting, consume_inside):
    """`TextIteratorStreamer` + `Thread(target=model.generate)` started inside a block (the transformers recipe)."""
    batch = _batch(w2s, PROMPTS[:1])
    width = batch["input_ids"].shape[1]
    kwargs = dict(**batch, max_new_tokens=12, **GREEDY)
    tokenizer = w2s.tokenizer
    if setting == "steering":
        context = w2s.steering(layer=2, strength=-8.0)
        with _by_hand(w2s, 2, -8.0):
            oracle = w2s.base_model.generate(**kwargs)
    else:
        context = w2s.disable_steering()
        oracle = w2s.base_model.generate(**kwargs)
    assert not torch.equal(oracle, w2s.generate(**kwargs)), "the setting changes the tokens"
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with context:
        thread = Thread(target=w2s.generate, kwargs=dict(**kwargs, streamer=streamer))
        thread.start()
        if consume_inside:
            text = "".join(streamer)
    if not consume_inside:
        text = "".join(streamer)
    thread.join()
    assert text == tokenizer.decode(oracle[0, width:], skip_special_tokens=True)
    assert not w2s.engine.has_hooks


def test_a_thread_with_its_own_block_uses_its_own_settings(w2s):
    batch = _batch(w2s)
    with _by_hand(w2s, 3, 5.0):
        want = w2s.base_model(**batch).logits
    got: list[torch.Tensor] = []

    def own_block() -> None:
        with w2s.steering(layer=3, strength=5.0):
            got.append(w2s(**batch).logits)

    with w2s.disable_steering():
        thread = Thread(target=own_block)
        thread.start()
        thread.join()
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)


# ------------------------------------------------------------------ 3. static cache


@pytest.mark.parametrize("policy", ["generated", "all"])
def test_static_cache_steers_the_same_tokens_as_the_dynamic_cache(w2s, policy, monkeypatch):
    batch = _batch(w2s, ROUTED_PROMPTS)
    kwargs = dict(**batch, max_new_tokens=4, steering_policy=policy, output_scores=True,
                  return_dict_in_generate=True, **GREEDY)
    layers = _steered_layers(monkeypatch)
    dynamic = w2s.generate(**kwargs)
    dynamic_layers = layers[-1]
    static = w2s.generate(**kwargs, cache_implementation="static")
    assert torch.equal(layers[-1], dynamic_layers)
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, want in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("policy", ["generated", "all"])
def test_static_cache_steers_like_the_dynamic_cache_on_other_architectures(family, policy):
    """Qwen2 passes a mapping of masks (full / sliding window) to its layers: it crashed the engine."""
    model = make_model(family)
    w2s = W2SSteeringModel(model, make_bundle(model, seed=3), tokenizer=make_tokenizer())
    kwargs = dict(**_batch(w2s), max_new_tokens=4, steering_policy=policy, steering_layer=[1, 2, 3],
                  output_scores=True, return_dict_in_generate=True, **GREEDY)
    dynamic = w2s.generate(**kwargs)
    static = w2s.generate(**kwargs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, want in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with w2s.disable_steering():
        assert not torch.equal(w2s.generate(**kwargs).sequences, dynamic.sequences), "it steers"


# ------------------------------------------------------------------ 4. chunked prefill


def test_chunked_prefill_routes_on_the_whole_prompt(w2s, monkeypatch):
    batch = _batch(w2s, ROUTED_PROMPTS)
    kwargs = dict(**batch, max_new_tokens=4, output_scores=True, return_dict_in_generate=True, **GREEDY)
    predicted = w2s.predict_layers(batch["input_ids"], batch["attention_mask"])
    layers = _steered_layers(monkeypatch)
    whole = w2s.generate(**kwargs)
    assert torch.equal(layers[-1].float().argmax(-1), predicted)
    chunked = w2s.generate(**kwargs, prefill_chunk_size=4)
    assert torch.equal(layers[-1].float().argmax(-1), predicted)
    assert torch.equal(chunked.sequences, whole.sequences)
    for got, want in zip(chunked.scores, whole.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ 5. continuing from a cache


def test_continuing_from_a_cache_routes_on_the_whole_input(w2s, monkeypatch):
    batch = _batch(w2s, ROUTED_PROMPTS)
    first = w2s.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    follow_up = torch.full((len(ROUTED_PROMPTS), 3), 5)  # routed alone, these tokens would go elsewhere
    ids = torch.cat([first.sequences, follow_up], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones(ids.shape[0], ids.shape[1] - batch["input_ids"].shape[1],
                                                          dtype=torch.long)], 1)
    layers = _steered_layers(monkeypatch)
    w2s.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
    assert torch.equal(layers[-1].float().argmax(-1), w2s.predict_layers(ids, mask))
    uncached_layers = layers[-1]
    cached = w2s.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values,
                          max_new_tokens=4, **GREEDY)
    assert torch.equal(layers[-1], uncached_layers)
    assert torch.equal(cached[:, :ids.shape[1]], ids)


# ------------------------------------------------------------------ 6. an interrupt while hooks go in


def _enter_steer(engine: SteeringEngine, route: SteeringRoute, vectors: torch.Tensor, fail_at: int | None) -> int:
    """Enters and leaves `engine.steer`, raising KeyboardInterrupt (as a Ctrl-C would) at its `fail_at`-th step:
    the start of any Python function it calls (torch's hook registration included) or a line of `steer` itself,
    except where a real Ctrl-C is held off (`deferred_interrupts` has put its own SIGINT handler in place).
    Returns how many steps the entry took."""
    steps = 0

    def tracer(frame, event, arg):
        nonlocal steps
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # deferred: a Ctrl-C waits here
            return tracer
        if event == "call" or (event == "line" and frame.f_code.co_name == "steer"):
            steps += 1
            if steps == fail_at:
                raise KeyboardInterrupt
        return tracer

    context = engine.steer(AdditiveIntervention(vectors), route, policy="generated")
    sys.settrace(tracer)
    try:
        context.__enter__()
    finally:
        sys.settrace(None)
    context.__exit__(None, None, None)
    return steps


@pytest.fixture
def interactive_sigint():
    """Python's own Ctrl-C handler, as in an interactive run: a pytest started in the background by a shell
    without job control inherits SIGINT ignored, and Ctrl-C deferral (rightly) leaves an ignored signal alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("interactive_sigint")
def test_an_interrupt_at_any_step_of_entering_steer_leaves_no_hook():
    model = make_model("llama")
    vectors = torch.randn(NUM_LAYERS, model.config.hidden_size)
    route = SteeringRoute.from_layers([1, 3], 2.0, NUM_LAYERS)
    before = hook_state(model)
    total = _enter_steer(SteeringEngine(model), route, vectors, fail_at=None)
    assert total > 10 and hook_state(model) == before
    for fail_at in range(1, total + 1):
        engine = SteeringEngine(model)
        with pytest.raises(KeyboardInterrupt):
            _enter_steer(engine, route, vectors, fail_at)
        assert hook_state(model) == before, f"hooks left after an interrupt at step {fail_at} of {total}"
        assert not engine.has_hooks


def test_an_interrupt_while_the_steering_state_is_built_leaves_no_hook(monkeypatch):
    model = make_model("llama")
    engine = SteeringEngine(model)
    before = hook_state(model)

    def interrupted(self, *args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_ActiveSteering, "__init__", interrupted)
    route = SteeringRoute.from_layers([1, 3], 2.0, NUM_LAYERS)
    with pytest.raises(KeyboardInterrupt), engine.steer(AdditiveIntervention(torch.randn(NUM_LAYERS, 32)), route):
        pass
    assert hook_state(model) == before and not engine.has_hooks


def _interrupt_after(function):
    """`function`, then a real SIGINT to this process: what a Ctrl-C landing right after it delivers."""
    def interrupted(*args, **kwargs):
        result = function(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return result

    return interrupted


@pytest.mark.usefixtures("interactive_sigint")
def test_a_ctrl_c_right_after_a_hook_is_registered_is_raised_after_with_no_hook_left(monkeypatch):
    """The instant between torch handing back a hook's handle and the engine storing it (hooks leaked there)."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    w2s = W2SSteeringModel(model, make_bundle(model), tokenizer=tokenizer)
    hooks_before = hook_state(model)
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook",
                        _interrupt_after(torch.nn.Module.register_forward_hook))
    with pytest.raises(KeyboardInterrupt):
        w2s.generate(**tokenizer(PROMPTS, return_tensors="pt", padding=True), **GENERATE)
    monkeypatch.undo()
    assert hook_state(model) == hooks_before and not w2s.engine._calls


@pytest.mark.usefixtures("interactive_sigint")
def test_a_ctrl_c_while_a_steering_block_closes_leaves_no_block_open(monkeypatch):
    model, tokenizer = make_model("llama"), make_tokenizer()
    w2s = W2SSteeringModel(model, make_bundle(model), tokenizer=tokenizer)

    class InterruptedVar:
        """The blocks' context variable, with a SIGINT arriving as it is read to close a block."""

        def __init__(self, var):
            self.var, self.armed = var, False

        def get(self, *default):
            value = self.var.get(*default)
            if self.armed:
                self.armed = False
                signal.raise_signal(signal.SIGINT)
            return value

        def set(self, value):
            return self.var.set(value)

    blocks = InterruptedVar(call_settings.BLOCKS)
    monkeypatch.setattr(call_settings, "BLOCKS", blocks)
    with pytest.raises(KeyboardInterrupt):
        with w2s.steering(layer=2, strength=3.0):
            blocks.armed = True
    assert w2s._current_override() == call_settings.Override()  # nothing stayed open
