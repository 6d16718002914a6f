"""Check a Gemini ``GenerateContentRequest`` before it is translated: ``BadRequest`` naming the field, or the
body with its structural keys in one spelling.

Pure. The Gemini API reads both spellings of every field (``systemInstruction``
and ``system_instruction``: protobuf's JSON mapping); clients use both (the
REST docs camelCase, some SDKs snake_case). ``validate`` returns a copy whose
structural objects (the request, contents, parts, tools, configs) use
camelCase keys only, so the translator reads one spelling. What the client
owns (function ``args``, function ``response``, schemas) is never renamed.

Wrong types, unknown roles, a part with no data, missing ``contents`` are a
400 ``INVALID_ARGUMENT`` naming the field path (``contents[1].parts[0].text``),
never a 500. Fields the bridge does not use are accepted and ignored
(``safetySettings``, ``labels``, ``mediaResolution``...), as are tools only
Google's servers run (search grounding, code execution, URL context), which
the translator drops.
"""
from __future__ import annotations

from typing import Any

from ...errors import BadRequest
from ..values import is_int, is_number

ROLES = ("user", "model")
DATA_FIELDS = ("text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
               "codeExecutionResult")
MODES = ("MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED")
_NUMBERS = ("temperature", "topP", "presencePenalty", "frequencyPenalty")
_INTEGERS = ("topK", "maxOutputTokens", "candidateCount", "seed")


def camel(obj: dict) -> dict:
    """``obj`` with its snake_case keys spelled camelCase (one level: values are not touched)."""
    if not any("_" in key for key in obj):
        return obj
    out: dict = {}
    for key, value in obj.items():
        if "_" in key:
            head, *rest = key.split("_")
            key = head + "".join(word[:1].upper() + word[1:] for word in rest)
        out.setdefault(key, value)
    return out


def _fail(message: str, param: str | None = None) -> BadRequest:
    return BadRequest(message, param=param)


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(f"Invalid value at '{where}': expected an object.", where)
    return dict(camel(value))  # a copy: the client's body stays as it came (native providers get it)


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise _fail(f"Invalid value at '{where}': expected a list.", where)
    return value


def _string(obj: dict, name: str, where: str, required: bool = False) -> None:
    value = obj.get(name)
    if value is None:
        if required:
            raise _fail(f"'{where}.{name}' is required.", f"{where}.{name}")
        return
    if not isinstance(value, str):
        raise _fail(f"Invalid value at '{where}.{name}': expected a string.", f"{where}.{name}")


def validate(body: Any, *, count: bool = False) -> dict:
    """The checked body (structural keys camelCase; see the module docstring), or ``BadRequest``.

    ``count``: a ``countTokens`` body, which may hold its request in ``generateContentRequest`` instead.
    """
    body = _object(body, "request")
    if count and body.get("generateContentRequest") is not None:
        inner = validate(_object(body["generateContentRequest"], "generateContentRequest"))
        return {**body, "generateContentRequest": inner}
    contents = body.get("contents")
    if contents is None:
        raise _fail("* GenerateContentRequest.contents: contents is not specified", "contents")
    contents = _list(contents, "contents")
    if not contents:
        raise _fail("* GenerateContentRequest.contents: contents is not specified", "contents")
    out = dict(body)
    out["contents"] = [_content(c, f"contents[{i}]") for i, c in enumerate(contents)]
    system = body.get("systemInstruction")
    if system is not None and not isinstance(system, str):
        out["systemInstruction"] = _content(system, "systemInstruction", system_role=True)
    if body.get("tools") is not None:
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(_list(body["tools"], "tools"))]
    if body.get("toolConfig") is not None:
        out["toolConfig"] = _tool_config(body["toolConfig"])
    if body.get("generationConfig") is not None:
        out["generationConfig"] = _generation_config(body["generationConfig"])
    if body.get("safetySettings") is not None:
        _list(body["safetySettings"], "safetySettings")  # accepted, ignored: a chat server has no such filters
    if body.get("cachedContent") is not None:
        raise _fail("cachedContent is not supported: this server keeps no context caches.", "cachedContent")
    return out


def _content(value: Any, where: str, system_role: bool = False) -> dict:
    content = _object(value, where)
    role = content.get("role")
    if role is not None and not system_role and role not in ROLES:
        shown = role if isinstance(role, str) else type(role).__name__
        raise _fail(f"Please use a valid role: user, model. ('{where}.role' is {shown[:40]!r})", f"{where}.role")
    parts = content.get("parts")
    if parts is None:
        raise _fail(f"'{where}.parts' is required: a content must have at least one part.", f"{where}.parts")
    parts = _list(parts, f"{where}.parts")
    if not parts and not system_role:
        raise _fail(f"'{where}.parts' must not be empty.", f"{where}.parts")
    return {**content, "parts": [_part(p, f"{where}.parts[{j}]") for j, p in enumerate(parts)]}


def _part(value: Any, where: str) -> dict:
    part = _object(value, where)
    present = [name for name in DATA_FIELDS if part.get(name) is not None]
    if not present:
        raise _fail(f"'{where}' has no data: it must have one of text, inlineData, fileData, functionCall or "
                    "functionResponse.", where)
    if len(present) > 1:
        raise _fail(f"'{where}' has more than one kind of data ({', '.join(present)}); a part holds one.", where)
    kind = present[0]
    if kind == "text":
        _string(part, "text", where)
    elif kind in ("inlineData", "fileData"):
        data = part[kind] = _object(part[kind], f"{where}.{kind}")
        _string(data, "mimeType", f"{where}.{kind}", required=kind == "inlineData")
        _string(data, "data" if kind == "inlineData" else "fileUri", f"{where}.{kind}", required=True)
    elif kind in ("functionCall", "functionResponse"):
        call = part[kind] = _object(part[kind], f"{where}.{kind}")
        _string(call, "name", f"{where}.{kind}", required=True)
        _string(call, "id", f"{where}.{kind}")
        field = "args" if kind == "functionCall" else "response"
        if call.get(field) is not None and not isinstance(call[field], dict):
            raise _fail(f"Invalid value at '{where}.{kind}.{field}': expected an object.", f"{where}.{kind}.{field}")
        if kind == "functionResponse" and call.get("parts") is not None:
            call["parts"] = [_part(p, f"{where}.functionResponse.parts[{k}]")
                             for k, p in enumerate(_list(call["parts"], f"{where}.functionResponse.parts"))]
    if part.get("thought") is not None and not isinstance(part["thought"], bool):
        raise _fail(f"Invalid value at '{where}.thought': expected true or false.", f"{where}.thought")
    return part


def _tool(value: Any, where: str) -> dict:
    tool = _object(value, where)
    declarations = tool.get("functionDeclarations")
    if declarations is None:
        return tool  # googleSearch, codeExecution, urlContext...: Google's server tools, dropped by request
    checked = []
    for k, item in enumerate(_list(declarations, f"{where}.functionDeclarations")):
        at = f"{where}.functionDeclarations[{k}]"
        declaration = _object(item, at)
        _string(declaration, "name", at, required=True)
        if not declaration["name"]:
            raise _fail(f"'{at}.name' must not be empty.", f"{at}.name")
        _string(declaration, "description", at)
        for name in ("parameters", "parametersJsonSchema"):
            if declaration.get(name) is not None and not isinstance(declaration[name], dict):
                raise _fail(f"Invalid value at '{at}.{name}': expected an object.", f"{at}.{name}")
        checked.append(declaration)
    return {**tool, "functionDeclarations": checked}


def _tool_config(value: Any) -> dict:
    config = _object(value, "toolConfig")
    if config.get("functionCallingConfig") is None:
        return config
    calling = _object(config["functionCallingConfig"], "toolConfig.functionCallingConfig")
    mode = calling.get("mode")
    if mode is not None and mode not in MODES:
        raise _fail("Invalid value at 'toolConfig.functionCallingConfig.mode': expected one of "
                    + ", ".join(MODES) + ".", "toolConfig.functionCallingConfig.mode")
    names = calling.get("allowedFunctionNames")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise _fail("Invalid value at 'toolConfig.functionCallingConfig.allowedFunctionNames': expected a list of "
                    "strings.", "toolConfig.functionCallingConfig.allowedFunctionNames")
    return {**config, "functionCallingConfig": calling}


def _generation_config(value: Any) -> dict:
    config = _object(value, "generationConfig")
    for name in _NUMBERS:
        if config.get(name) is not None and not is_number(config[name]):
            raise _fail(f"Invalid value at 'generationConfig.{name}': expected a number.", f"generationConfig.{name}")
    for name in _INTEGERS:
        if config.get(name) is not None and not is_int(config[name]):
            raise _fail(f"Invalid value at 'generationConfig.{name}': expected an integer.",
                        f"generationConfig.{name}")
    if config.get("maxOutputTokens") is not None and config["maxOutputTokens"] < 1:
        raise _fail("generationConfig.maxOutputTokens must be at least 1.", "generationConfig.maxOutputTokens")
    if config.get("candidateCount") not in (None, 1):
        raise _fail("generationConfig.candidateCount: only 1 candidate is supported by this server.",
                    "generationConfig.candidateCount")
    stops = config.get("stopSequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise _fail("Invalid value at 'generationConfig.stopSequences': expected a list of strings.",
                    "generationConfig.stopSequences")
    if config.get("responseMimeType") is not None and not isinstance(config["responseMimeType"], str):
        raise _fail("Invalid value at 'generationConfig.responseMimeType': expected a string.",
                    "generationConfig.responseMimeType")
    for name in ("responseSchema", "responseJsonSchema"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise _fail(f"Invalid value at 'generationConfig.{name}': expected an object.", f"generationConfig.{name}")
    if config.get("thinkingConfig") is not None:
        thinking = config["thinkingConfig"] = _object(config["thinkingConfig"], "generationConfig.thinkingConfig")
        where = "generationConfig.thinkingConfig"
        if thinking.get("includeThoughts") is not None and not isinstance(thinking["includeThoughts"], bool):
            raise _fail(f"Invalid value at '{where}.includeThoughts': expected true or false.",
                        f"{where}.includeThoughts")
        if thinking.get("thinkingBudget") is not None and not is_int(thinking["thinkingBudget"]):
            raise _fail(f"Invalid value at '{where}.thinkingBudget': expected an integer.", f"{where}.thinkingBudget")
        _string(thinking, "thinkingLevel", where)
    return config
