"""The LLM API on a tiny random model with the default model's tokenizer."""

from __future__ import annotations

import pytest

from nextok import SamplingParams
from nextok.kernels import library


def test_text_and_token_ids_give_the_same_result(tiny_llm):
    params = SamplingParams(max_new_tokens=8)
    by_text = tiny_llm.generate("The cat sat on", params)[0]
    by_ids = tiny_llm.generate(prompt_token_ids=[by_text.prompt_token_ids], params=params)[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == tiny_llm.tokenizer.decode(by_text.outputs[0].token_ids)
    assert by_text.prompt == "The cat sat on" and by_ids.prompt is None


def test_outputs_come_back_in_input_order(tiny_llm):
    prompts = ["one", "a longer prompt with more words in it", "three", "four five"]
    params = SamplingParams(max_new_tokens=6)
    together = tiny_llm.generate(prompts, params)
    assert [r.prompt for r in together] == prompts
    for prompt, result in zip(prompts, together):
        assert result.outputs[0].token_ids == tiny_llm.generate(prompt, params)[0].outputs[0].token_ids


def test_stream_concatenates_to_the_generated_text(tiny_llm):
    params = SamplingParams(max_new_tokens=25, do_sample=True, seed=3)
    deltas = list(tiny_llm.stream("Once upon a time", params))
    assert len(deltas) > 1
    assert "".join(deltas) == tiny_llm.generate("Once upon a time", params)[0].outputs[0].text


def _token_boundary_stop(tiny_llm, prompt):
    """A stop string that straddles the boundary between two generated tokens."""
    free = tiny_llm.generate(prompt, SamplingParams(max_new_tokens=20))[0].outputs[0]
    pieces = [tiny_llm.tokenizer.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    for i in range(1, len(pieces) - 1):
        boundary = len(pieces[i - 1])
        if boundary >= 2 and len(pieces[i]) - boundary >= 2:
            stop = free.text[boundary - 2: boundary + 2]
            return free.text, stop
    pytest.skip("the random model produced no two tokens long enough to straddle")


def test_stop_string_split_across_tokens_is_cut(tiny_llm):
    free_text, stop = _token_boundary_stop(tiny_llm, "Tell me about the weather")
    result = tiny_llm.generate("Tell me about the weather", SamplingParams(max_new_tokens=20, stop=[stop]))[0]
    c = result.outputs[0]
    assert c.finish_reason == "stop"
    assert c.text == free_text[: free_text.index(stop)]
    assert stop not in c.text


def test_stop_string_at_the_very_start(tiny_llm):
    free = tiny_llm.generate("Hello", SamplingParams(max_new_tokens=5))[0].outputs[0]
    c = tiny_llm.generate("Hello", SamplingParams(max_new_tokens=5, stop=[free.text[:3]]))[0].outputs[0]
    assert c.text == "" and c.finish_reason == "stop"


def test_streaming_never_shows_text_a_stop_string_removes(tiny_llm):
    free_text, stop = _token_boundary_stop(tiny_llm, "Tell me about the weather")
    streamed = "".join(tiny_llm.stream("Tell me about the weather", SamplingParams(max_new_tokens=20, stop=[stop])))
    assert streamed == free_text[: free_text.index(stop)]


def test_params_per_prompt_and_mismatch_error(tiny_llm):
    results = tiny_llm.generate(["a", "b"], [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=4)])
    assert [len(r.outputs[0].token_ids) for r in results] == [2, 4]
    with pytest.raises(ValueError, match="one per prompt"):
        tiny_llm.generate(["a", "b"], [SamplingParams()])


def test_bad_request_leaves_the_engine_clean(tiny_llm):
    with pytest.raises(ValueError):
        tiny_llm.generate(["fine", ""], SamplingParams(max_new_tokens=3))
    assert not tiny_llm.engine.has_unfinished() and tiny_llm.engine.blocks.num_used == 0


def test_bad_dtype_is_a_clear_error(tiny_model_dir):
    from nextok import LLM

    with pytest.raises(ValueError, match="dtype='float8'"):
        LLM(str(tiny_model_dir), dtype="float8")


@pytest.mark.skipif(library() is None, reason="needs nextok's CPU kernels")
def test_compile_only_warns_where_the_kernels_run_the_model(tiny_model_dir):
    from nextok import LLM

    with pytest.warns(UserWarning, match="compile=True has no effect"):
        llm = LLM(str(tiny_model_dir), dtype="float32", compile=True, kv_cache_memory=16 << 20)
    assert llm.generate("Hello", SamplingParams(max_new_tokens=3))[0].outputs[0].token_ids


# ---------------------------------------------------------------------- failures leave the LLM as it was
PROMPTS = ["The cat sat on", "a longer prompt with more words in it", "three", "four five six"]
MIX = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=10, num_beams=3),
       SamplingParams(max_new_tokens=12, do_sample=True, seed=4, num_return_sequences=2),
       SamplingParams(max_new_tokens=12, repetition_penalty=1.3)]


def _tokens(results):
    return [[c.token_ids for c in r.outputs] for r in results]


def _idle(llm) -> bool:
    return not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


def test_ctrl_c_during_generate_leaves_the_llm_working(tiny_llm, monkeypatch):
    """SIGINT in the middle of a step is raised when the step is done; generate takes its requests out
    of the engine, and the same LLM then gives what a fresh one gives."""
    import os
    import signal

    expected = _tokens(tiny_llm.generate(PROMPTS, MIX))
    real_step = tiny_llm.engine.step
    steps = []

    def step():
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside the step
        return real_step()

    monkeypatch.setattr(tiny_llm.engine, "step", step)
    with pytest.raises(KeyboardInterrupt):
        tiny_llm.generate(PROMPTS, MIX)
    monkeypatch.undo()
    assert len(steps) == 3 and _idle(tiny_llm)
    assert _tokens(tiny_llm.generate(PROMPTS, MIX)) == expected


def test_an_interrupt_raised_inside_the_step_is_cleaned_up(tiny_llm, monkeypatch):
    """Where the interrupt cannot be deferred (another thread, a KeyboardInterrupt raised by code), the
    step ends its requests and generate removes them: nothing is left behind."""
    from nextok.engine.runner import ModelRunner

    expected = _tokens(tiny_llm.generate(PROMPTS, MIX))
    real_run = ModelRunner.run
    calls = []

    def run(runner, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_run(runner, batch)

    monkeypatch.setattr(ModelRunner, "run", run)
    with pytest.raises(KeyboardInterrupt):
        tiny_llm.generate(PROMPTS, MIX)
    monkeypatch.undo()
    assert _idle(tiny_llm)
    assert _tokens(tiny_llm.generate(PROMPTS, MIX)) == expected


def test_a_request_that_fails_ends_alone(tiny_llm, monkeypatch):
    from nextok.sampling import selection

    real = selection.apply_penalties

    def failing(scores, batch):
        if any(p.repetition_penalty == 1.3 for p in batch.params):
            raise ArithmeticError("injected")
        return real(scores, batch)

    expected = _tokens(tiny_llm.generate(PROMPTS, MIX))
    monkeypatch.setattr(selection, "apply_penalties", failing)
    results = tiny_llm.generate(PROMPTS, MIX)
    monkeypatch.undo()
    assert results[3].error == "ArithmeticError: injected" and results[3].error_type == "server_error"
    assert results[3].outputs[0].finish_reason == "error"
    assert _tokens(results[:3]) == expected[:3] and _idle(tiny_llm)
    with pytest.raises(RuntimeError, match="generation failed: ArithmeticError: injected"):
        monkeypatch.setattr(selection, "apply_penalties", failing)
        list(tiny_llm.stream("four five six", MIX[3]))
    monkeypatch.undo()
    assert _idle(tiny_llm)
