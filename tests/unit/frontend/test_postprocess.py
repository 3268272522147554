from __future__ import annotations

import msgspec
import pytest
from tokenizers import Tokenizer

from armature.frontend.errors import ApiError, from_decode_error
from armature.frontend.openai import ChatCompletionChunk, ChatChunkChoice, ChatDelta, chat_request_decoder, json_encoder
from armature.frontend.postprocess import ChoicePostprocessor, EngineStreamError
from armature.frontend.sse import DONE, frame
from armature.protocols.llm import FinishReason, LLMEngineOutput


def _post(tok: Tokenizer, stop: list[str] | None = None, min_tokens: int = 0) -> ChoicePostprocessor:
    eos = tok.token_to_id("<eos>")
    return ChoicePostprocessor(tok, [], stop or [], min_tokens, frozenset({eos}), True, False, keep_text=True)


def _run(post: ChoicePostprocessor, outs: list[LLMEngineOutput]) -> tuple[str, str | None]:
    for out in outs:
        post.process(out)
    return "".join(post.text_parts or []), post.finish_reason


def test_hidden_eos_is_not_shown_and_finishes_with_stop(byte_tok: Tokenizer) -> None:
    eos = byte_tok.token_to_id("<eos>")
    ids = byte_tok.encode("hello").ids
    post = ChoicePostprocessor(byte_tok, [], [], 0, frozenset({eos}), False, False, keep_text=True)
    text, reason = _run(post, [LLMEngineOutput(token_ids=ids), LLMEngineOutput(
        token_ids=[eos], finish_reason=FinishReason.STOP, matched_stop=eos)])  # fmt: skip
    assert text == "hello" and reason == "stop"
    assert post.completion_tokens == len(ids) + 1


def test_stop_string_across_deltas_cuts_and_asks_to_stop_engine(byte_tok: Tokenizer) -> None:
    post = _post(byte_tok, ["STOP"])
    deltas = [post.process(LLMEngineOutput(token_ids=[t])) for t in byte_tok.encode("hello ST").ids]
    assert all(d is None or "S" not in d.text for d in deltas)
    last = post.process(LLMEngineOutput(token_ids=byte_tok.encode("OP more").ids))
    assert last is not None and last.finish_reason == "stop" and last.stopped_early
    assert "".join(post.text_parts or []) == "hello "
    assert post.process(LLMEngineOutput(token_ids=[1])) is None  # nothing after the end


def test_stop_strings_are_ignored_before_min_tokens(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("STOP hello STOP").ids
    post = _post(byte_tok, ["STOP"], min_tokens=3)
    text, reason = _run(post, [LLMEngineOutput(token_ids=[t]) for t in ids])
    assert text.startswith("STOP") and reason == "stop"
    assert "hello" in text


def test_length_flushes_a_held_partial_match(byte_tok: Tokenizer) -> None:
    post = _post(byte_tok, ["STOP"])
    text, reason = _run(post, [LLMEngineOutput(token_ids=byte_tok.encode("end ST").ids, finish_reason=FinishReason.LENGTH)])
    assert text == "end ST" and reason == "length"


def test_worker_error_raises(byte_tok: Tokenizer) -> None:
    with pytest.raises(EngineStreamError, match="boom"):
        _post(byte_tok).process(LLMEngineOutput(error="boom", finish_reason=FinishReason.ERROR))


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        chat_request_decoder.decode(b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":-1}')
    err = from_decode_error(info.value)
    assert isinstance(err, ApiError) and err.status == 400 and err.param == "temperature"
    body = msgspec.json.decode(err.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(msgspec.DecodeError) as info2:
        chat_request_decoder.decode(b"{nope")
    assert "Malformed JSON" in from_decode_error(info2.value).message


def test_sse_framing_is_one_data_line_per_chunk() -> None:
    chunk = ChatCompletionChunk("id1", "chat.completion.chunk", 1, "m", [ChatChunkChoice(0, ChatDelta(content="a\nb"))])
    raw = frame(json_encoder.encode(chunk))
    assert raw.startswith(b"data: {") and raw.endswith(b"}\n\n") and raw.count(b"\n") == 2
    decoded = msgspec.json.decode(raw[6:-2])
    assert decoded["choices"][0] == {"index": 0, "delta": {"content": "a\nb"}, "logprobs": None, "finish_reason": None}
    assert DONE == b"data: [DONE]\n\n"
