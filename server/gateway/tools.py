"""Function tools on chat completions (docs/api.md §1.1, "Tools"), served honestly: MGM was not trained to decide
when to call a tool, so ``tool_choice: "auto"`` (the default once ``tools`` is given) is a clear 400; a *named* choice
or ``"required"`` is served through the engine's structured outputs — the answer is constrained to the function's
JSON-schema arguments (``"required"`` with several tools: to ``{"name", "arguments"}`` of one of them) and returned
as OpenAI ``tool_calls``; ``"none"`` drops the tools. Earlier ``tool`` results and assistant ``tool_calls`` turns are
written into the conversation as text, which MGM's template can render."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from server.errors import APIError
from server.gateway import sse


def _function(spec: Any, i: int) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, dict) or spec.get("type") != "function":
        kind = spec.get("type") if isinstance(spec, dict) else None
        raise APIError(400, f"Tool type {kind!r} is not supported on chat completions: only 'function' tools.",
                       param=f"tools[{i}].type", code="unsupported_tool")
    fn = spec.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise APIError(400, "A function tool needs function.name.", param=f"tools[{i}].function.name",
                       code="missing_required_parameter")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise APIError(400, "function.parameters must be a JSON schema object.",
                       param=f"tools[{i}].function.parameters", code="invalid_type")
    return fn["name"], params


def _as_text(messages: list[dict[str, Any]]) -> None:
    """Tool turns as text MGM's template renders: a tool result becomes a user turn, an assistant's calls its text."""
    for m in messages:
        if m.get("role") == "tool":
            content, name = m.get("content"), m.get("name") or "tool"
            text = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict))
            m.clear()
            m.update(role="user", content=f"Tool result ({name}): {text}")
        elif m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [f"{c.get('function', {}).get('name')}({c.get('function', {}).get('arguments')})"
                     for c in m.pop("tool_calls") if isinstance(c, dict)]
            m["content"] = ((m.get("content") or "") + " " + "; ".join(f"Called {c}" for c in calls)).strip()
        m.pop("tool_call_id", None)


@dataclass
class ToolPlan:
    """A request whose answer must be a function call: the names it may call and how the answer is shaped."""

    names: list[str]
    named: bool  # one named function: the answer is its arguments

    @classmethod
    def prepare(cls, body: dict[str, Any]) -> ToolPlan | None:
        """Reads ``tools`` / ``tool_choice`` off ``body`` (and writes tool turns as text); adds the structured output
        the engine must follow. None when the request calls no tool."""
        tools = body.pop("tools", None)
        choice = body.pop("tool_choice", None)
        body.pop("parallel_tool_calls", None)
        _as_text(body["messages"])
        if tools is None:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools.", param="tool_choice", code="invalid_value")
            return None
        if not isinstance(tools, list) or not tools:
            raise APIError(400, "tools must be a non-empty list of function tools.", param="tools",
                           code="invalid_value")
        functions = dict(_function(spec, i) for i, spec in enumerate(tools))
        if choice == "none":
            return None
        if choice in (None, "auto"):
            raise APIError(400, "tool_choice 'auto' is not supported: Mini-Gemini was not trained to decide when to "
                           "call a tool. Name the function ({\"type\": \"function\", \"function\": {\"name\": …}}) or "
                           "send tool_choice 'required'; the answer is then constrained to the function's arguments.",
                           param="tool_choice", code="unsupported_tool_choice")
        if choice == "required":
            names = list(functions)
        elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            if name not in functions:
                raise APIError(400, f"tool_choice names {name!r}, which tools does not list.", param="tool_choice",
                               code="invalid_value")
            names = [name]
        else:
            raise APIError(400, "tool_choice must be 'none', 'required' or {\"type\": \"function\", \"function\": "
                           "{\"name\": …}}.", param="tool_choice", code="invalid_value")
        named = isinstance(choice, dict) or len(names) == 1
        schema = functions[names[0]] if named else {"anyOf": [
            {"type": "object", "properties": {"name": {"const": n}, "arguments": functions[n]},
             "required": ["name", "arguments"], "additionalProperties": False} for n in names]}
        body["structured_outputs"] = {"json": schema}  # compact JSON: mgm engine turns vLLM's free whitespace off
        return cls(names, named)

    def _call(self, text: str) -> dict[str, Any]:
        """One call from the constrained answer. Grammar backends let raw control characters into JSON strings,
        which strict parsers refuse: the arguments are re-serialised (a cut-off answer is passed on as it is)."""
        name, arguments = self.names[0], text
        try:
            parsed = json.loads(text, strict=False)
            if self.named:
                arguments = json.dumps(parsed)
            else:
                name, arguments = parsed["name"], json.dumps(parsed["arguments"])
        except (ValueError, KeyError, TypeError):
            pass  # the engine stopped early (length): the text as it is, under the first name
        return {"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": name, "arguments": arguments}}

    def shape(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A completion whose choices carry ``tool_calls`` instead of text."""
        for choice in payload.get("choices") or []:
            message = choice.get("message") or {}
            message["tool_calls"] = [self._call(message.get("content") or "")]
            message["content"] = None
            if choice.get("finish_reason") == "stop":
                choice["finish_reason"] = "tool_calls"
        return payload

    @staticmethod
    def stream(shaped: dict[str, Any], include_usage: bool) -> list[bytes]:
        """A completion shaped by :meth:`shape` as a chat stream (each call's arguments in one delta), then ``[DONE]``."""
        head = {"id": shaped.get("id"), "object": "chat.completion.chunk",
                "created": shaped.get("created") or int(time.time()), "model": shaped.get("model")}
        events = []
        for choice in shaped.get("choices") or []:
            index = choice.get("index", 0)
            calls = [{"index": k, **c} for k, c in enumerate(choice["message"]["tool_calls"])]
            events.append(sse.encode({**head, "choices": [{"index": index, "delta": {
                "role": "assistant", "content": None, "tool_calls": calls}, "logprobs": None, "finish_reason": None}]}))
            events.append(sse.encode({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                           "finish_reason": choice.get("finish_reason")}]}))
        if include_usage and shaped.get("usage"):
            events.append(sse.encode({**head, "choices": [], "usage": shaped["usage"]}))
        return [*events, sse.DONE_EVENT]
