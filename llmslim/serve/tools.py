"""Tool calls: the tools in the prompt, forced calls under the functions' schemas, calls found in free text.

    request tools + tool_choice --plan_tools--> ToolPlan:  none     tools in the prompt, no calls returned
                                                          auto     free text; calls the model writes are found (ToolCallStream)
                                                          forced   ("required" / a named function) the output is constrained to
                                                                   {"name": ..., "arguments": {...}} under the function's schema
    messages --render_messages--> what the chat template gets (tools natively, or described in the system message)

The format of a call is Hermes' (Qwen 2.5, Hermes, SmolLM3 and others were trained on it):
`<tool_call>{"name": "f", "arguments": {...}}</tool_call>`. A chat template that takes `tools` renders
them itself; for one that does not (SmolLM2's), the tools and this format are described at the end of
the system message, earlier calls are written into the assistant's text in that format and tool results
are wrapped in `<tool_response>` tags, so a follow-up conversation reads as the model would have written it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from llmslim.serve.grammar import JSON_LAYOUT, GrammarError, Grammars, close_objects

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)
NO_PARAMETERS = {"type": "object", "properties": {}}
SYSTEM_TOOLS = """

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class ToolError(ValueError):
    """A bad `tools` / `tool_choice`; `param` names the request field (HTTP 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    """What a request's tools mean for its generation.

    Args:
        mode: "none", "auto" or "forced".
        tools: the tools as OpenAI sends them (`{"type": "function", "function": {...}}`), parameters filled in.
        grammar: for "forced": the grammar of one call to one of `called` functions.
        called: the function names a forced call may use.
    """

    mode: str
    tools: list[dict]
    grammar: str | None = None
    called: list[str] = field(default_factory=list)

    @property
    def names(self) -> set[str]:
        return {tool["function"]["name"] for tool in self.tools}


def plan_tools(tools: list[dict] | None, tool_choice, grammars: Grammars | None) -> ToolPlan | None:
    """Check `tools` (parameters must be object schemas) and resolve `tool_choice`; compile the grammar of a forced call.

    Args:
        tools: the request's `tools`, as dicts.
        tool_choice: "none", "auto", "required", `{"type": "function", "function": {"name": ...}}`, or None.
        grammars: compiles schemas (only needed for a forced call).

    Raises:
        ToolError: a tool's parameters are not an object schema the grammar engine can use, or tool_choice names no tool.
    """
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError(f"tool_choice {_choice_text(tool_choice)} needs tools: send the functions in tools", "tool_choice")
        return None
    tools = [_with_parameters(tool, i) for i, tool in enumerate(tools)]
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise ToolError(f"tools has two functions of the same name: {sorted(n for n in set(names) if names.count(n) > 1)}", "tools")
    if tool_choice in (None, "auto"):
        return ToolPlan("auto", tools)
    if tool_choice == "none":
        return ToolPlan("none", tools)
    called = names if tool_choice == "required" else [tool_choice["function"]["name"]]
    if called[0] not in names:
        raise ToolError(f"tool_choice names the function {called[0]!r}, which is not in tools ({', '.join(names)})", "tool_choice")
    return ToolPlan("forced", tools, _call_grammar(tools, called, grammars), called)


def _with_parameters(tool: dict, index: int) -> dict:
    function = dict(tool["function"])
    parameters = function.get("parameters")
    field_name = f"tools[{index}].function.parameters"
    if parameters is None:
        parameters = NO_PARAMETERS
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        got = parameters.get("type") if isinstance(parameters, dict) else type(parameters).__name__
        raise ToolError(f"{field_name} must be a JSON schema of type object (the function's named arguments), got {got!r}", field_name)
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _call_grammar(tools: list[dict], called: list[str], grammars: Grammars) -> str:
    """A Lark grammar (llguidance's) of `{"name": <one of called>, "arguments": <its schema>}`."""
    by_name = {tool["function"]["name"]: (i, tool["function"]["parameters"]) for i, tool in enumerate(tools)}
    rules, alternatives = [], []
    for k, name in enumerate(called):
        index, parameters = by_name[name]
        parameters = close_objects(parameters)  # only the declared arguments: the function takes no others
        field_name = f"tools[{index}].function.parameters"
        try:
            grammars.compile_json_schema(parameters, field_name)  # a clear message for this one function
        except GrammarError as err:
            raise ToolError(str(err), field_name) from None
        schema = {**parameters, "x-guidance": JSON_LAYOUT}
        head = json.dumps('{"name": ' + json.dumps(name) + ', "arguments": ')
        rules.append(f'call_{k}: {head} args_{k} "}}"\nargs_{k}: %json {json.dumps(schema)}')
        alternatives.append(f"call_{k}")
    lark = "start: " + " | ".join(alternatives) + "\n" + "\n".join(rules) + "\n"
    try:
        return grammars.compile_lark(lark, "tools")
    except GrammarError as err:
        raise ToolError(str(err), "tools") from None


def _choice_text(choice) -> str:
    return repr(choice) if isinstance(choice, str) else json.dumps(choice)


# ----------------------------------------------------------------------------- prompts


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders `tools` itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in (template if isinstance(template, str) else json.dumps(template))


def render_messages(messages: list, plan: ToolPlan | None, native: bool) -> tuple[list[dict], list[dict] | None]:
    """The messages (and the `tools` argument) for the chat template.

    Args:
        messages: the request's `ChatMessage`s.
        plan: the request's tools, or None.
        native: whether the template renders tools, tool calls and tool results itself (see `supports_tools`).
    """
    if native:
        return [_native_message(m) for m in messages], plan.tools if plan else None
    rendered = [_plain_message(m) for m in messages]
    if plan is not None:
        block = SYSTEM_TOOLS.format(tools="\n".join(json.dumps(tool) for tool in plan.tools))
        if rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + block}
        else:
            rendered.insert(0, {"role": "system", "content": block.lstrip()})
    return rendered, None


def _native_message(message) -> dict:
    out = message.for_template()
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in message.tool_calls
        ]  # templates take arguments as a mapping (transformers' chat template documentation)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def _plain_message(message) -> dict:
    out = message.for_template()
    if message.tool_calls:
        calls = [format_call(c.function.name, _arguments(c.function.arguments)) for c in message.tool_calls]
        out["content"] = "\n".join(([out["content"]] if out["content"] else []) + calls)
    if message.role == "tool":
        out["content"] = f"<tool_response>\n{out['content']}\n</tool_response>"
    return out


def format_call(name: str, arguments: dict) -> str:
    """One call as the model writes it (Hermes' format)."""
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CALL_CLOSE}"


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # not JSON: the template gets it as it came


# ----------------------------------------------------------------------------- answers


def openai_call(name: str, arguments) -> dict:
    """A `tool_calls` entry: arguments as JSON text, and a fresh id."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def forced_calls(text: str) -> list[dict]:
    """The call in the output of a forced generation (complete, so it parses: the grammar made it)."""
    call = json.loads(text)
    return [openai_call(call["name"], call["arguments"])]


def find_calls(text: str, names: set[str]) -> tuple[str, list[dict]]:
    """The text outside `<tool_call>` blocks, and the calls in them; no calls (and all of `text`) unless every block
    holds a JSON call `{"name": <one of names>, "arguments": {...}}` (a last block may lack its closing tag)."""
    blocks = list(_CALL_BLOCK.finditer(text))
    calls = []
    for block in blocks:
        try:
            call = json.loads(block.group(1))
        except json.JSONDecodeError:
            return text, []
        arguments = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
        if not isinstance(arguments, dict) or call.get("name") not in names:
            return text, []
        calls.append(openai_call(call["name"], arguments))
    return _CALL_BLOCK.sub("", text).strip() if calls else text, calls


class ToolCallStream:
    """Streams the text of an `auto` choice, holding back whatever may be a tool call (from `<tool_call>` on) until the end."""

    def __init__(self, names: set[str]):
        self.names = names
        self._held = ""
        self._text = ""  # all of it

    def push(self, text: str) -> str:
        """The part of `text` (and of what was held back) that can be sent now."""
        self._text += text
        self._held += text
        if CALL_OPEN in self._held:
            return ""  # from the opening tag on, everything waits for the end
        keep = next((k for k in range(min(len(CALL_OPEN) - 1, len(self._held)), 0, -1) if CALL_OPEN.startswith(self._held[-k:])), 0)
        ready, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return ready

    def finish(self) -> tuple[str, list[dict]]:
        """The held-back text still to send, and the calls found in the whole output."""
        _, calls = find_calls(self._text, self.names)
        if not calls:
            return self._held, []
        return _CALL_BLOCK.sub("", self._held).strip(), calls


class ToolOutput:
    """What one choice sends, given the request's tools: text as it comes, or held back and read as tool calls at the end.

    Args:
        plan: the request's tools (None or mode "none": the text passes through unchanged).
    """

    def __init__(self, plan: ToolPlan | None):
        self.mode = plan.mode if plan is not None else "none"
        self._stream = ToolCallStream(plan.names) if self.mode == "auto" else None
        self._text = ""

    def push(self, text: str) -> str:
        """The part of the new `text` to send now."""
        if self.mode == "auto":
            return self._stream.push(text)
        if self.mode == "forced":
            self._text += text
            return ""
        return text

    def finish(self, finish_reason: str) -> tuple[str, list[dict] | None, str]:
        """(text still to send, the tool calls or None, the finish reason: "tool_calls" when there are calls)."""
        if self.mode == "forced":
            if finish_reason == "stop":  # the grammar completed the call
                return "", forced_calls(self._text), "tool_calls"
            return self._text, None, finish_reason  # cut short ("length"): the text as it is, no call claimed
        if self.mode == "auto":
            text, calls = self._stream.finish()
            return (text, calls, "tool_calls") if calls else (text, None, finish_reason)
        return "", None, finish_reason
