#!/usr/bin/env python3
"""Render chat-template fixtures with Hugging Face transformers' own renderer.

Usage:
    python tools/gen_chat_template_fixtures.py [--out tests/fixtures/chat_templates]

For every template in ``<out>/templates/*.jinja`` listed in ``TEMPLATES`` below, the script renders a set of
conversations with ``transformers.utils.chat_template_utils.render_jinja_template`` (the function behind
``apply_chat_template``) and writes ``<out>/<name>.json``: the template's file, bos/eos tokens and, per case, the
messages, flags and the exact expected string, or the message of the error the template raised. It also writes
``<out>/strftime.json`` (Python ``strftime`` outputs for fixed instants) and ``<out>/broken.json`` (the syntax error
Jinja2 reports for ``templates/broken.jinja``). ``crates/frontend/tests/chat_template_fixtures.rs`` must reproduce
every string byte for byte.

What the script does to inputs, and why (the Rust renderer does the same, see crates/frontend/src/chat_template.rs):
- Messages go through ``_normalize_chat_messages`` first, as ``apply_chat_template`` does (keys whose value is
  None are dropped).
- Only ``bos_token``/``eos_token`` are passed as special tokens (``apply_chat_template`` passes the tokenizer's whole
  special-token map; the templates here use no other).
- For templates that take plain-string content (``content_parts: False``), a content given as a list of
  ``{"type": "text", "text": ...}`` parts is joined with "\\n" before rendering, as cleave (and vLLM) do; templates
  with ``content_parts: True`` get the list as it is.
- Every JSON object's keys are sorted (recursively) before rendering, so that both renderers see the same key order:
  cleave's serde_json has no ``preserve_order`` feature, so its maps iterate in sorted order.
- ``strftime_now`` is pinned: ``datetime`` inside transformers' chat-template module is replaced by a subclass whose
  ``now()`` returns ``NOW`` (naive, read as UTC); the Rust test pins its clock to the same instant. Templates that
  take ``date_string`` get it as a template kwarg in some cases.

Requirements: transformers (5.x) and jinja2 (>= 3.1.6). No network access and no tokenizer files are needed.
Deterministic: two runs give byte-identical files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import jinja2
import transformers
import transformers.utils.chat_template_utils as ctu
from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

# 2024-09-05T13:07:09Z. A Thursday, day 249 of a leap year, afternoon (exercises %a, %j, %p, %I).
NOW = dt.datetime(2024, 9, 5, 13, 7, 9)


class _FixedDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: D102 - mirrors datetime.now
        return NOW if tz is None else NOW.replace(tzinfo=dt.timezone.utc).astimezone(tz)


ctu.datetime = _FixedDatetime

# name -> (Hugging Face model the template comes from, bos_token, eos_token, content_parts)
TEMPLATES = {
    "llama3_8b_instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "<|begin_of_text|>", "<|eot_id|>", False),
    "llama3_1_8b_instruct": ("meta-llama/Llama-3.1-8B-Instruct", "<|begin_of_text|>", "<|eot_id|>", False),
    "llama3_2_3b_instruct": ("meta-llama/Llama-3.2-3B-Instruct", "<|begin_of_text|>", "<|eot_id|>", False),
    "qwen2_7b_instruct": ("Qwen/Qwen2-7B-Instruct", None, "<|im_end|>", False),
    "qwen2_5_3b_instruct": ("Qwen/Qwen2.5-3B-Instruct", None, "<|im_end|>", False),
    "mistral_7b_instruct_v0_3": ("mistralai/Mistral-7B-Instruct-v0.3", "<s>", "</s>", False),
    "gemma3_1b_it": ("google/gemma-3-1b-it", "<bos>", "<eos>", True),
    "cleave_default": ("(none: cleave's default for preset models)", None, "<|im_end|>", False),
    "synthetic": ("(none: written for these tests)", "<s>", "</s>", False),
}

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
SYSTEM_USER = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
USER_ONLY = [{"role": "user", "content": "Hello there"}]
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "  Tell me a joke.\n"},
]
PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "Answer in one line."}]},
    {"role": "user", "content": [{"type": "text", "text": "Describe a cat"}, {"type": "text", "text": "briefly."}]},
]
NON_ASCII = [
    {"role": "user", "content": 'Grüße aus Köln — 你好，世界 🌍 "quoted" \\ back\tslash'},
    {"role": "assistant", "content": "Ça va très bien, merci ! ✓"},
    {"role": "user", "content": "Ünïcödé again <tag> & 'single'"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]
TOOL_CALL = {"id": "abc123DEF", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "What's the weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "abc123DEF", "name": "get_weather", "content": '{"temperature": 21, "unit": "celsius"}'},
]
SYNTHETIC_MESSAGES = [
    {"role": "system", "content": "  Hi from the system, Zoë.  "},
    {
        "role": "user",
        "content": "Hello world of templates",
        "meta": {"name": "Zoë", "tags": ["a", "b"], "score": 0.5, "ok": True, "none": None, "nested": {"k": "v's"}, "n": 3},
    },
    {"role": "user", "content": "repeated"},
    {"role": "user", "content": "repeated"},
    {"role": "stop", "content": "stop here"},
    {"role": "user", "content": "never rendered"},
]


def case(name, messages, add_generation_prompt, tools=None, kwargs=None):
    return {"name": name, "messages": messages, "add_generation_prompt": add_generation_prompt, "tools": tools,
            "kwargs": kwargs or {}}


def common_cases():
    return [
        case("system_user_prompt", SYSTEM_USER, True),
        case("system_user_no_prompt", SYSTEM_USER, False),
        case("user_only_prompt", USER_ONLY, True),
        case("multi_turn_prompt", MULTI_TURN, True),
        case("multi_turn_no_prompt", MULTI_TURN, False),
        case("content_parts", PARTS, True),
        case("non_ascii", NON_ASCII, True),
    ]


def cases_for(name):
    if name == "synthetic":
        return [
            case("synthetic", SYNTHETIC_MESSAGES, True),
            case("reasoning_aliases", [{"role": "user", "content": "Q"},
                                       {"role": "assistant", "content": "A", "reasoning": "Because."}], False),
            case("synthetic_extra_kwargs", SYNTHETIC_MESSAGES[:1], False, kwargs={"extra": {"b": [1, 2.0, None], "a": "ü"}}),
        ]
    cases = common_cases()
    if name == "llama3_1_8b_instruct":
        cases += [
            case("tools_in_user_message", TOOL_CONVERSATION, True, tools=TOOLS),
            case("tools_in_system_message", [SYSTEM] + TOOL_CONVERSATION, True, tools=TOOLS,
                 kwargs={"tools_in_user_message": False}),
            case("date_string_kwarg", SYSTEM_USER, True, kwargs={"date_string": "01 Jan 2025"}),
            # OpenAI clients send `"tool_calls": null`; transformers drops null keys, so `'tool_calls' in message` is
            # false here.
            case("null_fields_dropped", [{"role": "user", "content": "Hi", "tool_calls": None},
                                         {"role": "assistant", "content": "Hello", "tool_calls": None, "name": None},
                                         {"role": "user", "content": "Bye"}], True),
            case("error_two_tool_calls", [USER_ONLY[0], {"role": "assistant", "tool_calls": [TOOL_CALL, TOOL_CALL]}],
                 False, tools=TOOLS),
        ]
    if name == "llama3_2_3b_instruct":
        cases += [
            case("tools_in_user_message", TOOL_CONVERSATION, True, tools=TOOLS),
            case("date_string_kwarg", SYSTEM_USER, True, kwargs={"date_string": "01 Jan 2025"}),
        ]
    if name == "qwen2_5_3b_instruct":
        cases += [
            case("tools", TOOL_CONVERSATION, True, tools=TOOLS),
            case("tools_with_system", [SYSTEM] + TOOL_CONVERSATION, True, tools=TOOLS),
        ]
    if name == "mistral_7b_instruct_v0_3":
        cases += [
            case("tools", TOOL_CONVERSATION + [{"role": "assistant", "content": "It is 21 °C."},
                                                {"role": "user", "content": "Thanks"}], True, tools=TOOLS),
            case("error_not_alternating", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True),
            case("error_unknown_role", [{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}], True),
            case("error_bad_tool_call_id",
                 [USER_ONLY[0], {"role": "assistant", "tool_calls": [dict(TOOL_CALL, id="short")]}], False, tools=TOOLS),
        ]
    if name == "gemma3_1b_it":
        cases += [
            case("error_not_alternating", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True),
        ]
    return cases


def sort_keys(value):
    if isinstance(value, dict):
        return {k: sort_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sort_keys(v) for v in value]
    return value


def flatten_text_parts(messages):
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            assert all(part["type"] == "text" for part in content)
            message = dict(message, content="\n".join(part["text"] for part in content))
        out.append(message)
    return out


def render(source, bos, eos, content_parts, c):
    messages = _normalize_chat_messages(sort_keys(c["messages"]))
    if not content_parts:
        messages = flatten_text_parts(messages)
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=sort_keys(c["tools"]),
            chat_template=source,
            add_generation_prompt=c["add_generation_prompt"],
            **special,
            **sort_keys(c["kwargs"]),
        )
    except jinja2.exceptions.TemplateError as e:
        return {"expected_error": str(e)}
    return {"expected": rendered[0]}


def strftime_cases():
    formats = ["%d %b %Y", "%Y-%m-%d %H:%M:%S", "%a %A %b %B", "%j %p %I %y", "%-d %-m %-H %-I %-M %-S %-j", "%e|%%|%D",
               "%H:%M %p, %A %d %B %Y"]
    instants = [
        dt.datetime(2024, 9, 5, 13, 7, 9),
        dt.datetime(2024, 7, 26, 0, 0, 0),
        dt.datetime(2000, 2, 29, 23, 59, 59),
        dt.datetime(1999, 12, 31, 12, 0, 1),
        dt.datetime(2038, 1, 19, 3, 14, 8),
        dt.datetime(2025, 1, 1, 9, 5, 0),
    ]
    out = []
    for instant in instants:
        unix = int(instant.replace(tzinfo=dt.timezone.utc).timestamp())
        for fmt in formats:
            out.append({"unix_seconds": unix, "format": fmt, "expected": instant.strftime(fmt)})
    return out


def write_json(path, obj):
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    path.write_text(text, encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/fixtures/chat_templates", type=Path)
    args = parser.parse_args()
    out: Path = args.out
    versions = {"transformers": transformers.__version__, "jinja2": jinja2.__version__, "now_utc": NOW.isoformat()}

    for name, (model, bos, eos, content_parts) in TEMPLATES.items():
        template_file = f"templates/{name}.jinja"
        source = (out / template_file).read_text(encoding="utf-8")
        cases = []
        for c in cases_for(name):
            result = render(source, bos, eos, content_parts, c)
            entry = {k: sort_keys(v) for k, v in c.items() if k != "tools" or v is not None}
            entry.update(result)
            cases.append(entry)
        fixture = {"model": model, "template_file": template_file, "bos_token": bos, "eos_token": eos,
                   "content_parts": content_parts, "generated_with": versions, "cases": cases}
        write_json(out / f"{name}.json", fixture)
        n_err = sum("expected_error" in c for c in cases)
        print(f"{name}: {len(cases)} cases ({n_err} errors)", file=sys.stderr)

    broken = (out / "templates/broken.jinja").read_text(encoding="utf-8")
    try:
        ctu._compile_jinja_template(broken)
        raise SystemExit("templates/broken.jinja compiled; it must not")
    except jinja2.exceptions.TemplateSyntaxError as e:
        write_json(out / "broken.json", {"template_file": "templates/broken.jinja", "jinja2_error": str(e),
                                         "jinja2_error_line": e.lineno, "generated_with": versions})

    write_json(out / "strftime.json", {"generated_with": versions, "cases": strftime_cases()})


if __name__ == "__main__":
    main()
