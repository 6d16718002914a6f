"""The fold, fixture by fixture: each SSE file with the exact chat.completion it must give.

Expected answers were worked out by reading each capture (tests/fixtures/real,
provenance in its README) or crafted file, not by running the fold.
Fragments (captures cut by whoever posted them) must be reported as cut off;
their quirk is then checked by completing them with a finish chunk.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.errors import StreamError
from proxy.fold.chat import fold_chat, fold_chat_chunks

FIXTURES = Path(__file__).parent / "fixtures"


def read(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def msg(content=None, **extra) -> dict:
    # refusal is a required nullable field of the schema: null when none was streamed
    return {"role": "assistant", "content": content, "refusal": None, **extra}


def choice(message: dict, finish: str, index: int = 0, logprobs=None, **extra) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish, **extra}


def call(id_, name, arguments) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def completion(id_, created, model, choices, **extra) -> dict:
    return {"id": id_, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            **extra}


GROQ_TEXT_USAGE = {"queue_time": 0.041905864, "prompt_tokens": 45, "prompt_time": 0.003940145,
                   "completion_tokens": 662, "completion_time": 2.652230333, "total_tokens": 707,
                   "total_time": 2.656170478}
GROQ_TOOL_USAGE = {"queue_time": 0.041520249, "prompt_tokens": 210, "prompt_time": 0.010407901,
                   "completion_tokens": 15, "completion_time": 0.046601227, "total_tokens": 225,
                   "total_time": 0.057009128}

COMPLETE = {
    # tool-call index starts at 1; empty-args fragment; text before the call.
    "real/anthropic-compat-tool-index1.sse": completion(
        "msg_sanitized", 0, "claude-haiku-4-5-20251001",
        [choice(msg("Reading it.", tool_calls=[call("toolu_sanitized", "read_file", '{"path": "a.txt"}')]),
                "tool_calls")]),
    # empty first chunk (choices [], id ""), obfuscation dropped, filter results kept (last non-null).
    "real/azure-prompt-filter-first.sse": completion(
        "chatcmpl-CYPS1lijGoK8gd9lYzY3r9Sx50nbt", 1762317021, "gpt-5-nano-2025-08-07",
        [choice(msg("Capital of Denmark.", refusal=None), "stop", content_filter_results={})],
        system_fingerprint=None,
        usage={"completion_tokens": 78, "completion_tokens_details": {
            "accepted_prediction_tokens": 0, "audio_tokens": 0, "reasoning_tokens": 64,
            "rejected_prediction_tokens": 0}, "prompt_tokens": 15,
            "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0}, "total_tokens": 93},
        prompt_filter_results=[{"prompt_index": 0, "content_filter_results": {
            "hate": {"filtered": False, "severity": "safe"}, "jailbreak": {"filtered": False, "detected": False},
            "self_harm": {"filtered": False, "severity": "safe"}, "sexual": {"filtered": False, "severity": "safe"},
            "violence": {"filtered": False, "severity": "safe"}}}]),
    # reasoning then streamed tool arguments; usage on the finish chunk; no [DONE].
    "real/deepseek-reasoning-tool-call.sse": completion(
        "cca85624-4056-401f-b220-d77601d1f70d", 1764664568, "deepseek-reasoner",
        [choice(msg(None, reasoning_content=(
            "The user is asking for the weather in San Francisco. I need to use the weather tool to get this "
            "information. Let me invoke the weather tool with the location parameter set to \"San Francisco\"."),
            tool_calls=[call("call_00_ioIn7yN9p1ZOMNpDLwd4MgAF", "weather", '{"location": "San Francisco"}')]),
            "tool_calls")],
        system_fingerprint="fp_eaab8d114b_prod0820_fp8_kvcache",
        usage={"prompt_tokens": 339, "completion_tokens": 83, "total_tokens": 422,
               "prompt_tokens_details": {"cached_tokens": 320}, "completion_tokens_details": {"reasoning_tokens": 39},
               "prompt_cache_hit_tokens": 320, "prompt_cache_miss_tokens": 19}),
    # groq: x_groq on first and last chunk, last non-null wins; middle chunks dropped by the capture.
    "real/groq-text.sse": completion(
        "chatcmpl-7eb08824-fb8d-47af-a1f0-3aa786f2d1f3", 1770770839, "llama-3.3-70b-versatile",
        [choice(msg('Introducing "L light.'), "stop")], system_fingerprint="fp_f8b414701e",
        usage=GROQ_TEXT_USAGE, x_groq={"id": "req_01kh52ndshfr2azv0xe6tnv4fx", "usage": GROQ_TEXT_USAGE}),
    # a whole tool call in one delta, index after function.
    "real/groq-tool-call.sse": completion(
        "chatcmpl-b610d559-f156-4aca-8827-24b4fe6af54f", 1770770843, "llama-3.3-70b-versatile",
        [choice(msg(None, tool_calls=[call("tk85n1k4m", "weather", "{}")]), "tool_calls")],
        system_fingerprint="fp_f8b414701e", usage=GROQ_TOOL_USAGE,
        x_groq={"id": "req_01kh52nj5yfcat8hrmvrk2j2hj", "usage": GROQ_TOOL_USAGE}),
    # usage and non-standard timings on the finish chunk itself.
    "real/llamacpp-final-timings.sse": completion(
        "chatcmpl-yPk7z9nC22CofOlh100qQdHVEDMNYCb1", 1754524122, "gpt-oss:20b", [choice(msg(None), "stop")],
        system_fingerprint="b6097-9515c613",
        usage={"completion_tokens": 247, "prompt_tokens": 1085, "total_tokens": 1332},
        timings={"prompt_n": 1085, "prompt_ms": 203.378, "prompt_per_token_ms": 0.18744516129032257,
                 "prompt_per_second": 5334.893646313762, "predicted_n": 247, "predicted_ms": 933.63,
                 "predicted_per_token_ms": 3.7798785425101213, "predicted_per_second": 264.5587652496171}),
    "real/llamacpp-gptoss-full.sse": completion(
        "chatcmpl-vNFkZJhOjej6wdhkhSEvVAqZIJRwLI6x", 1754518951, "gpt-3.5-turbo",
        [choice(msg('<|channel|>analysis<|message|>User says "test". Likely wants a test response. We\'ll respond '
                    "acknowledging.<|start|>assistant<|channel|>final<|message|>Got it! If you have any questions "
                    "or need assistance, just let me know."), "stop")],
        system_fingerprint="b6097-9515c613", usage={"completion_tokens": 43, "prompt_tokens": 82, "total_tokens": 125},
        timings={"prompt_n": 1, "prompt_ms": 7.61, "prompt_per_token_ms": 7.61, "prompt_per_second": 131.4060446780552,
                 "predicted_n": 43, "predicted_ms": 152.103, "predicted_per_token_ms": 3.537279069767442,
                 "predicted_per_second": 282.703168247832}),
    # usage on every chunk (cumulative: the last wins); extra empty-args delta on the finish chunk.
    "real/nim-vllm-usage-every-chunk.sse": completion(
        "chat-2267f7e2910a4254bac0650ba74cfc1c", 1733162241, "meta/llama-3.1-8b-instruct:fp8",
        [choice(msg(None, tool_calls=[call("chatcmpl-tool-b3b307239370432d9910d4b79b4dbbaa", "searchGoogle",
                                           '{"query": "latest news on ai"}')]), "tool_calls", stop_reason=128008)],
        usage={"prompt_tokens": 226, "total_tokens": 246, "completion_tokens": 20}),
    # each whole call in its own chunk; role and content "" repeated; no [DONE].
    "real/ollama-parallel-tool-calls.sse": completion(
        "chatcmpl-18", 1744446075, "qwen2.5-coder:7b-instruct-q8_0",
        [choice(msg(None, tool_calls=[call("call_wteop8bt", "run_command", '{"command":"ls"}'),
                                      call("call_rk2xye1l", "run_command", '{"command":"ls -l"}')]), "tool_calls")],
        system_fingerprint="fp_ollama"),
    # obfuscation on every chunk (dropped), usage:null everywhere then a usage chunk.
    "real/openai-usage-obfuscation.sse": completion(
        "chatcmpl-D8Z5oo6uDh67AD85p73ksdT1KxhE0", 1770933892, "gpt-4.1-nano-2025-04-14",
        [choice(msg("**Holiday Name:**.", refusal=None), "stop")], system_fingerprint="fp_de604bd877",
        usage={"prompt_tokens": 16, "completion_tokens": 300, "total_tokens": 316,
               "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                             "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
        service_tier="default"),
    # first tool delta has no arguments key; finish chunk delta content "" plus stop_reason null.
    "real/vllm-tool-call.sse": completion(
        "chatcmpl-d0c68c86be0641129cffa5053c0c217e", 1744513664, "",
        [choice(msg(None, tool_calls=[call("chatcmpl-tool-ca99dda515524c6abe47d1ea22813507", "run_command",
                                           '{"command": "ls"}')]), "tool_calls", stop_reason=None)]),
    # finish_reason key absent on non-final chunks; usage chunk with extra fields.
    "real/xai-reasoning-tool-call.sse": completion(
        "7027d986-3c59-a37a-9a5f-50713e01c8a6", 1770772293, "grok-3-mini",
        [choice(msg(None, reasoning_content="First, the user is asking.",
                    tool_calls=[call("call_79382389", "weather", '{"location":"San Francisco"}')]), "tool_calls")],
        system_fingerprint="fp_2a885414fb",
        usage={"prompt_tokens": 307, "completion_tokens": 26, "total_tokens": 560,
               "prompt_tokens_details": {"text_tokens": 307, "audio_tokens": 0, "image_tokens": 0,
                                         "cached_tokens": 306},
               "completion_tokens_details": {"reasoning_tokens": 227, "audio_tokens": 0,
                                             "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
               "num_sources_used": 0, "cost_in_usd_ticks": 1497500}),
    # crafted: data: without space, CRLF, keep-alive comments, n=2 interleaved, logprobs appended.
    "crafted/tgi-crlf-nospace-n2-logprobs.sse": completion(
        "chatcmpl-7f3a", 1764100000, "Qwen/Qwen2.5-7B-Instruct",
        [choice(msg("Hello world"), "stop", logprobs={"content": [
            {"token": "Hello", "logprob": -0.1, "bytes": [72, 101, 108, 108, 111], "top_logprobs": []},
            {"token": " world", "logprob": -0.1, "bytes": [32, 119, 111, 114, 108, 100], "top_logprobs": []}],
            "refusal": None}),
         choice(msg("Bonjour le monde"), "length", index=1, logprobs={"content": [
             {"token": "Bonjour", "logprob": -0.1, "bytes": [66, 111, 110, 106, 111, 117, 114], "top_logprobs": []},
             {"token": " le monde", "logprob": -0.1, "bytes": [32, 108, 101, 32, 109, 111, 110, 100, 101],
              "top_logprobs": []}], "refusal": None})],
        usage={"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}),
    # crafted: retry/id/event lines, one JSON split over two data: lines, blank data lines, U+2028 kept.
    "crafted/sglang-event-id-multiline.sse": completion(
        "chatcmpl-7f3a", 1764100000, "Qwen/Qwen2.5-7B-Instruct", [choice(msg("line\u2028sep ✓ done"), "stop")]),
    # crafted: the CLIProxyAPI bug: tool calls only, no finish_reason, [DONE] -> "tool_calls".
    "crafted/vllm-parallel-tools-no-finish-reason.sse": completion(
        "chatcmpl-7f3a", 1764100000, "Qwen/Qwen2.5-7B-Instruct",
        [choice(msg(None, tool_calls=[call("call_a1", "get_weather", '{"city": "Paris"}'),
                                      call("call_b2", "get_time", '{"tz": "CET"}')]), "tool_calls")]),
    "crafted/openai-refusal-logprobs.sse": completion(
        "chatcmpl-7f3a", 1764100000, "Qwen/Qwen2.5-7B-Instruct",
        [choice(msg(None, refusal="I can't help with that."), "stop", logprobs={"content": None, "refusal": [
            {"token": "I can't", "logprob": -0.01, "bytes": None, "top_logprobs": []},
            {"token": " help with that.", "logprob": -0.02, "bytes": None, "top_logprobs": []}]})]),
    "crafted/azure-legacy-function-call.sse": completion(
        "chatcmpl-7f3a", 1764100000, "Qwen/Qwen2.5-7B-Instruct",
        [choice(msg(None, function_call={"name": "lookup", "arguments": '{"q": "x"}'}), "function_call")]),
    # crafted: no finish_reason, no usage, [DONE] -> "stop" and no usage key at all (never invented).
    "crafted/lmstudio-no-finish-no-usage.sse": completion(
        "chatcmpl-7f3a", 1764100000, "Qwen/Qwen2.5-7B-Instruct", [choice(msg("Hi there"), "stop")]),
}


@pytest.mark.parametrize("name", sorted(COMPLETE))
def test_fixture_folds_to_its_exact_completion(name):
    assert fold_chat_chunks([read(name)]) == COMPLETE[name]


@pytest.mark.parametrize("name", sorted(COMPLETE))
def test_fold_does_not_depend_on_how_reads_are_split(name):
    data = read(name)
    for size in (1, 7, 64):
        assert fold_chat_chunks([data[i:i + size] for i in range(0, len(data), size)]) == COMPLETE[name]


def test_fold_chat_takes_lines_without_terminators():
    lines = read("real/vllm-tool-call.sse").split(b"\n")
    assert fold_chat(lines) == COMPLETE["real/vllm-tool-call.sse"]


def test_gemini_call_without_index_and_without_chunk_id():
    result = fold_chat_chunks([read("real/gemini-tool-call-no-index.sse")])
    assert result["id"].startswith("chatcmpl-")  # the upstream sent none; clients need one
    del result["id"]
    assert result == {"object": "chat.completion", "created": 1788465147, "model": "gemini-2.5-flash",
                      "choices": [choice(msg(None, tool_calls=[call("function-call-18439433602034082669", "glob",
                                                                    '{"pattern":"*"}')]), "tool_calls")],
                      "usage": {"completion_tokens": 12, "prompt_tokens": 3379, "total_tokens": 3459}}


def test_llamacpp_verbose_tail_with_extra_blank_lines_and_data_spilling_onto_a_second_line():
    result = fold_chat_chunks([read("real/llamacpp-verbose-tool-call-tail.sse")])
    # the capture starts mid-arguments: no id or name was ever sent for the call
    assert result["choices"] == [choice(msg(None, tool_calls=[
        {"type": "function", "function": {"name": None, "arguments": '.nvim"}'}}]), "tool_calls")]
    assert result["timings"]["predicted_n"] == 51
    assert "__verbose" in result  # the spilled JSON was re-joined, not cut


def complete_with(name: str, finish_chunk: dict) -> bytes:
    return read(name) + b"data: " + json.dumps(finish_chunk).encode() + b"\n\ndata: [DONE]\n\n"


FRAGMENTS = {
    # Ollama: finish_reason "" on every non-final chunk is no finish at all.
    "real/ollama-finish-reason-empty-string.sse": (
        {"id": "chatcmpl-693", "object": "chat.completion.chunk", "created": 1715427619, "model": "mistral:latest",
         "system_fingerprint": "fp_ollama", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "?"},
                                                        "finish_reason": "stop"}]},
        completion("chatcmpl-693", 1715427619, "mistral:latest", [choice(msg(" if you have any questions?"), "stop")],
                   system_fingerprint="fp_ollama")),
    "real/llamacpp-first-chunks.sse": (
        {"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}], "created": 1754544631,
         "id": "chatcmpl-5cW7mFM6xD9ZRdrIZBhnCZo8QvLru6aj", "model": "gpt-oss:20b",
         "system_fingerprint": "b6103-3db4da56", "object": "chat.completion.chunk"},
        completion("chatcmpl-5cW7mFM6xD9ZRdrIZBhnCZo8QvLru6aj", 1754544631, "gpt-oss:20b",
                   [choice(msg("<|channel|>"), "stop")], system_fingerprint="b6103-3db4da56")),
    # OpenRouter: comment lines, provider and native_finish_reason, reasoning: null, reasoning_details [].
    "real/openrouter-gemini-first-chunk.sse": (
        {"id": "gen-1753932698-cukvHDojm0vTvKTrYY7r", "provider": "Google", "model": "google/gemini-2.5-flash",
         "object": "chat.completion.chunk", "created": 1753932698,
         "choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop", "native_finish_reason": "STOP",
                      "logprobs": None}]},
        completion("gen-1753932698-cukvHDojm0vTvKTrYY7r", 1753932698, "google/gemini-2.5-flash",
                   [choice(msg("Salut!", reasoning=None, reasoning_details=[]), "stop", native_finish_reason="STOP")],
                   provider="Google")),
    "real/openrouter-processing-comments.sse": (
        {"id": "gen-1739458867-kUKFjpDGCEBBvK6V46PX", "provider": "OpenAI", "model": "openai/gpt-4o-mini",
         "object": "chat.completion.chunk", "created": 1739458867,
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop",
                      "native_finish_reason": "stop", "logprobs": None}], "system_fingerprint": "fp_72ed7ab54c"},
        completion("gen-1739458867-kUKFjpDGCEBBvK6V46PX", 1739458867, "openai/gpt-4o-mini",
                   [choice(msg("亚"), "stop", native_finish_reason="stop")], system_fingerprint="fp_72ed7ab54c",
                   provider="OpenAI")),
    "real/vllm-gptoss-reasoning-fragment.sse": (
        {"id": "chatcmpl-beb39e7777184d59a9463d42e86d9ba2", "object": "chat.completion.chunk",
         "created": 1758892077, "model": "openai/gpt-oss-20b",
         "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "token_ids": None}]},
        completion("chatcmpl-beb39e7777184d59a9463d42e86d9ba2", 1758892077, "openai/gpt-oss-20b",
                   [choice(msg(None, reasoning_content=" need to use the tool"), "stop", token_ids=None)])),
}


@pytest.mark.parametrize("name", sorted(FRAGMENTS))
def test_capture_fragment_is_reported_as_cut_off(name):
    with pytest.raises(StreamError) as info:
        fold_chat_chunks([read(name)])
    assert info.value.status == 502 and info.value.message == "upstream stream ended early"


@pytest.mark.parametrize("name", sorted(FRAGMENTS))
def test_capture_fragment_completed_with_a_finish_chunk(name):
    finish_chunk, expected = FRAGMENTS[name]
    assert fold_chat_chunks([complete_with(name, finish_chunk)]) == expected


@pytest.mark.parametrize("name, status, message, code", [
    ("real/openrouter-error-event.sse", 429, '{\n  "error": {\n    "code": 429,\n    "message": "Resource has been '
     'exhausted (e.g. check quota).",\n    "status": "RESOURCE_EXHAUSTED"\n  }\n}\n', 429),
    ("crafted/vllm-rate-limit-in-stream.sse", 429, "Rate limit reached for requests", "rate_limit_exceeded"),
    ("crafted/vllm-event-error.sse", 502, "CUDA out of memory", 500),
])
def test_error_in_the_stream_becomes_an_error_not_a_success(name, status, message, code):
    with pytest.raises(StreamError) as info:
        fold_chat_chunks([read(name)])
    assert (info.value.status, info.value.message, info.value.code) == (status, message, code)


def test_non_json_data_line_is_a_502_naming_the_problem():
    with pytest.raises(StreamError) as info:
        fold_chat_chunks([read("crafted/proxy-html-in-stream.sse")])
    assert info.value.status == 502
    assert "not JSON" in info.value.message and "502 Bad Gateway" in info.value.message


def test_stream_cut_before_done_and_before_finish_is_never_a_fake_stop():
    with pytest.raises(StreamError) as info:
        fold_chat_chunks([read("crafted/ollama-cut-off.sse")])
    assert info.value.message == "upstream stream ended early" and info.value.retryable


def test_empty_stream_is_cut_off():
    with pytest.raises(StreamError):
        fold_chat_chunks([b": ping\n\n"])


def test_done_without_any_choice_is_an_error():
    with pytest.raises(StreamError) as info:
        fold_chat_chunks([b'data: {"id":"x","choices":[],"usage":{"total_tokens":1}}\n\ndata: [DONE]\n\n'])
    assert "no choices" in info.value.message


def test_json_that_is_not_an_object_is_an_error():
    with pytest.raises(StreamError):
        fold_chat_chunks([b"data: [1,2,3]\n\ndata: [DONE]\n\n"])


def test_answer_over_max_aggregate_bytes_is_a_502():
    piece = {"id": "c", "choices": [{"index": 0, "delta": {"content": "x" * 1000}, "finish_reason": None}]}
    stream = (b"data: " + json.dumps(piece).encode() + b"\n\n") * 50 + b"data: [DONE]\n\n"
    with pytest.raises(StreamError) as info:
        fold_chat_chunks([stream], max_bytes=20_000)
    assert info.value.code == "aggregate_too_large" and not info.value.retryable
    assert fold_chat_chunks([stream], max_bytes=60_000)["choices"][0]["message"]["content"] == "x" * 50_000


def test_data_after_done_is_ignored():
    stream = read("crafted/lmstudio-no-finish-no-usage.sse") + b"data: {not json\n\n"
    assert fold_chat_chunks([stream]) == COMPLETE["crafted/lmstudio-no-finish-no-usage.sse"]


def test_tool_deltas_without_index_new_id_starts_a_new_call():
    chunks = [
        {"id": "g", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"x":'}}]}}]},
        {"id": "g", "choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": "1}"}}]}}]},
        {"id": "g", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}}]}}]},
        {"id": "g", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    calls = fold_chat_chunks([stream])["choices"][0]["message"]["tool_calls"]
    assert calls == [call("c1", "a", '{"x":1}'), call("c2", "b", "{}")]
