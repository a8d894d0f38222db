"""Render chat-template cases with Jinja2 exactly as Hugging Face transformers does
(ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, tojson = json.dumps with
ensure_ascii=False) and write them as a golden file for mmrun's minijinja renderer.

Run once (needs only jinja2): python3 src/data/testdata/make_chat_golden.py
"""
import json
import os

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = open(os.path.join(HERE, "..", "minimind_chat_template.jinja"), encoding="utf-8").read()


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers/utils/chat_template_utils.py
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.filters["tojson"] = tojson
tmpl = env.from_string(TEMPLATE)

weather = {"name": "get_weather", "description": "Weather <today> & 'tomorrow'",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1}},
                          "required": ["city"]}}
calc = {"type": "function", "function": {"name": "calc", "description": "计算器", "parameters": {"x": 1.5, "ok": True, "none": None}}}

cases = [
    dict(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
    dict(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True, open_thinking=True),
    dict(messages=[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                   {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
                   {"role": "system", "content": "late system"}, {"role": "user", "content": "q3"}], add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans", "reasoning_content": "\n\nthink\n"}]),
    dict(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nplan A\n</think>\n\n\nfinal"}]),
    dict(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "pre<think>x</think>mid</think>\nlast"}]),
    dict(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nleading newlines"}]),
    dict(messages=[{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "北京天气?"},
                   {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京", "days": 2}}]},
                   {"role": "tool", "content": "{\"temp\": 25}"},
                   {"role": "assistant", "content": "25度。"}], tools=[weather, calc]),
    dict(messages=[{"role": "user", "content": "two calls"},
                   {"role": "assistant", "content": "Let me check.", "tool_calls": [
                       {"type": "function", "function": {"name": "calc", "arguments": "{\"x\": 2}"}},
                       {"name": "get_weather", "arguments": {"city": "<Paris> & 'Lyon'"}}]},
                   {"role": "tool", "content": "4"}, {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "third"},
                   {"role": "user", "content": "thanks"}], tools=[calc], add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "no system but tools"}, {"role": "assistant", "content": "ok"}], tools=[weather]),
    dict(messages=[{"role": "user", "content": "<tool_response>x</tool_response>"}, {"role": "assistant", "content": "y"}]),
    dict(messages=[{"role": "user", "content": "tabs\tand \"quotes\" \\ backslash\r\n"}, {"role": "assistant", "content": "🙂 ok"}]),
]

# The licence-clean real SFT file (minimind PR #802 fixtures, Apache-2.0), if present.
real = os.path.join(HERE, "..", "..", "..", "..", "shared", "data", "minimind_pr802", "tiny_sft.jsonl")
if os.path.exists(real):
    for line in open(real, encoding="utf-8"):
        cases.append(dict(messages=json.loads(line)["conversations"]))

with open(os.path.join(HERE, "chat_golden.jsonl"), "w", encoding="utf-8") as out:
    for c in cases:
        c.setdefault("tools", None)
        c.setdefault("add_generation_prompt", False)
        c.setdefault("open_thinking", False)
        rendered = tmpl.render(**c)
        out.write(json.dumps({**c, "rendered": rendered}, ensure_ascii=False) + "\n")
print(len(cases), "cases")
