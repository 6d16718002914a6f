"""The Gemini request translation and validation, pure (the HTTP tests are tests/test_gemini_*.py)."""
from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.translate.gemini.request import for_target, to_chat, wants_thoughts
from proxy.translate.gemini.response import to_response, usage_metadata
from proxy.translate.gemini.validate import validate
from proxy.translate.tools import ToolNames


def chat_of(body: dict, **kwargs) -> dict:
    return to_chat(validate(body), ToolNames(), **kwargs)


def test_text_turns_system_instruction_and_generation_config():
    chat = chat_of({
        "systemInstruction": {"parts": [{"text": "Be terse."}, {"text": "Answer in English."}]},
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}, {"role": "model", "parts": [{"text": "Hello"}]},
                     {"role": "user", "parts": [{"text": "Bye"}]}],
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "topK": 40, "stopSequences": ["END"], "seed": 7,
                             "maxOutputTokens": 99},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]})
    assert chat["messages"] == [{"role": "system", "content": "Be terse.\n\nAnswer in English."},
                                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "Bye"}]
    assert (chat["temperature"], chat["top_p"], chat["top_k"], chat["stop"], chat["seed"]) == (
        0.2, 0.9, 40, ["END"], 7)
    assert "max_tokens" not in chat  # per target: for_target clamps it
    out = for_target(chat, "qwen", 50, stream=True)
    assert (out["model"], out["max_tokens"], out["stream"], out["stream_options"]) == (
        "qwen", 50, True, {"include_usage": True})


def test_snake_case_spellings_read_like_camel_case():
    chat = chat_of({"system_instruction": {"parts": [{"text": "S"}]},
                    "contents": [{"role": "user",
                                  "parts": [{"inline_data": {"mime_type": "image/png", "data": "AAA"}}]}],
                    "generation_config": {"max_output_tokens": 5, "thinking_config": {"thinking_budget": 100}}})
    assert chat["messages"][0] == {"role": "system", "content": "S"}
    assert chat["messages"][1]["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]
    assert chat["reasoning_effort"] == "low"


def test_function_calls_and_responses_pair_by_id_or_by_name():
    body = {"contents": [
        {"role": "user", "parts": [{"text": "list"}]},
        {"role": "model", "parts": [{"text": "ok"}, {"functionCall": {"name": "ls", "args": {"d": "."}}},
                                    {"functionCall": {"id": "x9", "name": "cat", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"id": "x9", "name": "cat", "response": {"output": "meow"}}},
                                   {"functionResponse": {"name": "ls", "response": {"files": ["a"]}}},
                                   {"text": "thanks"}]}],
        "tools": [{"functionDeclarations": [
            {"name": "ls", "description": "list", "parameters": {"type": "OBJECT", "properties": {
                "d": {"type": "STRING", "nullable": True}}, "required": ["d"], "propertyOrdering": ["d"]}},
            {"name": "cat", "parametersJsonSchema": {"type": "object"}}]}, {"googleSearch": {}}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["ls"]}}}
    chat = chat_of(body)
    assistant, cat, ls, user = chat["messages"][1:]
    assert assistant["content"] == "ok"
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in assistant["tool_calls"]] == [
        ("call_1_1", "ls", '{"d":"."}'), ("x9", "cat", "{}")]
    assert cat == {"role": "tool", "tool_call_id": "x9", "content": "meow"}
    assert ls == {"role": "tool", "tool_call_id": "call_1_1", "content": '{"files":["a"]}'}
    assert user == {"role": "user", "content": "thanks"}
    # ANY with one allowed name: only that tool, forced; the OpenAPI schema written as JSON Schema
    assert chat["tools"] == [{"type": "function", "function": {"name": "ls", "description": "list", "parameters": {
        "type": "object", "properties": {"d": {"type": ["string", "null"]}}, "required": ["d"]}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "ls"}}


@pytest.mark.parametrize(("mode", "choice"), [("AUTO", None), ("NONE", "none"), ("ANY", "required"),
                                              ("VALIDATED", None)])
def test_function_calling_modes(mode, choice):
    chat = chat_of({"contents": [{"parts": [{"text": "x"}]}],
                    "tools": [{"functionDeclarations": [{"name": "a"}, {"name": "b"}]}],
                    "toolConfig": {"functionCallingConfig": {"mode": mode}}})
    assert chat.get("tool_choice") == choice
    assert [t["function"]["name"] for t in chat["tools"]] == ["a", "b"]
    assert chat["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_json_output_thinking_and_thought_parts():
    body = {"contents": [{"role": "user", "parts": [{"text": "q"}]},
                         {"role": "model", "parts": [{"text": "mull", "thought": True, "thoughtSignature": "c2ln"},
                                                     {"text": "a"}]},
                         {"role": "user", "parts": [{"text": "q2"}]}],
            "generationConfig": {"responseMimeType": "application/json",
                                 "responseSchema": {"type": "OBJECT", "properties": {"n": {"type": "INTEGER"}}},
                                 "thinkingConfig": {"includeThoughts": True, "thinkingLevel": "HIGH"}}}
    chat = chat_of(body)
    assert chat["messages"][1] == {"role": "assistant", "content": "a"}  # thoughts dropped without replay
    assert chat_of(body, reasoning_replay=True)["messages"][1]["reasoning_content"] == "mull"
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}}, "strict": True}}
    assert chat["reasoning_effort"] == "high"
    assert wants_thoughts(validate(body))
    body["generationConfig"] = {"responseMimeType": "application/json", "thinkingConfig": {"thinkingBudget": 0}}
    chat = chat_of(body)
    assert chat["response_format"] == {"type": "json_object"} and "reasoning_effort" not in chat


def test_images_on_a_text_only_model_and_other_media():
    body = {"contents": [{"role": "user", "parts": [
        {"text": "look"}, {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklG"}},
        {"fileData": {"mimeType": "application/pdf", "fileUri": "gs://b/f.pdf"}}]}]}
    assert chat_of(body)["messages"][0]["content"][1] == {"type": "image_url",
                                                          "image_url": {"url": "data:image/jpeg;base64,/9j/"}}
    assert chat_of(body, vision=False)["messages"][0]["content"] == (
        "look\n\n[image omitted]\n\n[audio/wav data omitted]\n\n[file gs://b/f.pdf omitted]")


@pytest.mark.parametrize(("body", "field"), [
    ({}, "contents"),
    ({"contents": []}, "contents"),
    ({"contents": "hi"}, "contents"),
    ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "contents[0].role"),
    ({"contents": [{"role": ["user"], "parts": [{"text": "x"}]}]}, "contents[0].role"),
    ({"contents": [{"role": "user"}]}, "contents[0].parts"),
    ({"contents": [{"role": "user", "parts": []}]}, "contents[0].parts"),
    ({"contents": [{"role": "user", "parts": [{"text": 5}]}]}, "contents[0].parts[0].text"),
    ({"contents": [{"role": "user", "parts": [{}]}]}, "contents[0].parts[0]"),
    ({"contents": [{"role": "user", "parts": [{"text": "a", "inlineData": {}}]}]}, "contents[0].parts[0]"),
    ({"contents": [{"parts": [{"inlineData": {"mimeType": "image/png"}}]}]}, "contents[0].parts[0].inlineData.data"),
    ({"contents": [{"parts": [{"functionCall": {"args": {}}}]}]}, "contents[0].parts[0].functionCall.name"),
    ({"contents": [{"parts": [{"functionResponse": {"name": "f", "response": "x"}}]}]},
     "contents[0].parts[0].functionResponse.response"),
    ({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"temperature": "hot"}},
     "generationConfig.temperature"),
    ({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": 0}},
     "generationConfig.maxOutputTokens"),
    ({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"candidateCount": 2}},
     "generationConfig.candidateCount"),
    ({"contents": [{"parts": [{"text": "x"}]}], "tools": [{"functionDeclarations": [{"description": "d"}]}]},
     "tools[0].functionDeclarations[0].name"),
    ({"contents": [{"parts": [{"text": "x"}]}], "toolConfig": {"functionCallingConfig": {"mode": "SOMETIMES"}}},
     "toolConfig.functionCallingConfig.mode"),
    ([1, 2], "request"),
])
def test_bad_bodies_are_400s_naming_the_field(body, field):
    with pytest.raises(BadRequest) as raised:
        validate(body)
    assert raised.value.param == field
    assert field.split("[")[0].split(".")[0] in raised.value.message


def test_answer_parts_finish_and_usage():
    completion = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me look.", "reasoning_content": "think",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "ls", "arguments": '{"d": "."'}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 8, "completion_tokens_details": {"reasoning_tokens": 3},
                  "prompt_tokens_details": {"cached_tokens": 4}}}
    answer = to_response(completion, "gemini-2.5-pro", ToolNames(), thoughts=True, response_id="r1")
    assert answer == {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "think", "thought": True}, {"text": "Let me look."},
        {"functionCall": {"id": "c1", "name": "ls", "args": {"d": "."}}}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 18,
                          "thoughtsTokenCount": 3, "cachedContentTokenCount": 4},
        "modelVersion": "gemini-2.5-pro", "responseId": "r1"}
    completion["choices"][0]["finish_reason"] = "length"
    answer = to_response(completion, "m", ToolNames())
    assert answer["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert [p for p in answer["candidates"][0]["content"]["parts"] if p.get("thought")] == []
    assert usage_metadata(None, 12) == {"promptTokenCount": 12, "candidatesTokenCount": 0, "totalTokenCount": 12}


def test_json_schemas_with_gemini_type_names_are_written_as_json_schema():
    """Gemini CLI 0.61.0 sends upper-case OpenAPI type names in responseJsonSchema and parametersJsonSchema;
    constrained decoders of chat servers know only JSON Schema's lower-case ones."""
    schema = {"type": "OBJECT", "properties": {"score": {"type": "INTEGER"}}, "required": ["score"]}
    chat = chat_of({"contents": [{"parts": [{"text": "x"}]}],
                    "tools": [{"functionDeclarations": [{"name": "f", "parametersJsonSchema": schema}]}],
                    "generationConfig": {"responseMimeType": "application/json", "responseJsonSchema": schema}})
    expected = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    assert chat["response_format"]["json_schema"]["schema"] == expected
    assert chat["tools"][0]["function"]["parameters"] == expected
