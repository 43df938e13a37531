"""tests/test_serve_openai.py: `ferry serve` through the official OpenAI Node SDK (npm
`openai`, tests/test_serve_openai.mjs): models.list, completions.create plain and streamed,
chat.completions.create plain, streamed and through the SDK's stream helper, stop strings,
the SDK's typed errors (BadRequestError for n: 2, NotFoundError, AuthenticationError), and an
aborted stream, on tiny-moe-code (with an API key and the Mistral-style template fixture) and
on tiny-qwen3_moe (its own Qwen3 template, no key: the SDK's Authorization header must be
accepted). Every text is compared with `ferry run`'s, computed here and passed in as JSON.

Run by CTest as: python3 tests/test_serve_openai.py FERRY_BINARY BUILD_DIR
The npm package is installed once into BUILD_DIR/serve-npm (an exact version); without node
or npm the test is skipped (exit 77; scripts/install-deps.sh installs them), and an npm install
that fails (no registry) fails the test, unless FERRY_OFFLINE=1 asks to skip it.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import npm_util  # noqa: E402
import test_serve as ts  # noqa: E402  the servers, the baselines and their helpers

NPM_PACKAGES = ["openai@6.49.0"]  # 7.x needs Node 22; 6.x runs on the Node 20 of the CI
SKIP = 77


def server_cases(name, model, port, key, keyed, completions, chats, template):
    """The JSON the .mjs gets for one server: each case with its ferry run baseline."""
    out = {"name": name, "url": "http://127.0.0.1:%d/v1" % port, "model": name, "key": key,
           "keyed": keyed, "completions": [], "chats": [], "stops": [], "chat_stops": []}
    for prompt, n in completions:
        b = ts.BASE.get(model, prompt, n)
        out["completions"].append({"prompt": prompt, "max_tokens": n, "text": b["text"],
                                   "finish": b["finish"], "prompt_tokens": len(b["prompt_ids"]),
                                   "completion_tokens": len(b["ids"])})
    for user, n in chats:
        b = ts.BASE.get(model, user, n, chat=True, template=template)
        out["chats"].append({"user": user, "max_tokens": n, "text": b["text"],
                             "finish": b["finish"], "prompt_tokens": len(b["prompt_ids"])})
    prompt, n = completions[0]
    text = ts.BASE.get(model, prompt, n)["text"]
    s, idx = ts.stop_string_in(text, len(text) // 3)
    out["stops"].append({"prompt": prompt, "max_tokens": n, "stop": [s], "text": text[:idx]})
    user, n = chats[0]
    text = ts.BASE.get(model, user, n, chat=True, template=template)["text"]
    if len(text) > 8:
        s, idx = ts.stop_string_in(text, 2)
        out["chat_stops"].append({"user": user, "max_tokens": n, "stop": s, "text": text[:idx]})
    return out


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: test_serve_openai.py FERRY_BINARY BUILD_DIR")
    ts.FERRY, ts.BUILD = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    os.environ.setdefault("FERRY_BACKEND", "cpu")
    prefix = os.path.join(ts.BUILD, "serve-npm")
    if not npm_util.ensure_npm("test_serve_openai", prefix, NPM_PACKAGES,
                               ["openai/package.json"]):
        return SKIP
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    print("test_serve_openai: %s, node %s, %s" % (ts.FERRY, node, NPM_PACKAGES[0]), flush=True)
    if not os.path.isdir(ts.QWEN):
        print("test_serve_openai: the tiny-qwen3_moe fixture is missing at %s" % ts.QWEN)
        return 1
    key = "sk-ferry-test-4242"
    servers = []
    try:
        tiny = ts.Server(ts.MODEL, "--chat-template", ts.TEMPLATE, "--api-key", key,
                         "--max-seqs", "4")
        servers.append(tiny)
        qwen = ts.Server(ts.QWEN, "--max-seqs", "4")
        servers.append(qwen)
        cases = {"servers": [
            server_cases("tiny-moe-code", ts.MODEL, tiny.port, key, True,
                         [("def fibonacci(n):", 32), ("class Stack:\n    def __init__(self):", 24),
                          (ts.EOS_NOW, 8)],
                         [(ts.CHAT_PROMPTS[0], 32), (ts.CHAT_PROMPTS[1], 16)], ts.TEMPLATE),
            server_cases("tiny-qwen3_moe", ts.QWEN, qwen.port, "unused-key", False,
                         [("Hello there", 24), ("\u4f60\u597d\uff0c\u4e16\u754c", 16)],
                         [("What is 2+2?", 20), ("Say hi.", 12)], None),
        ]}
        p = subprocess.run(["node", os.path.join(ts.ROOT, "tests", "test_serve_openai.mjs"),
                            prefix], input=json.dumps(cases), text=True, capture_output=True,
                           timeout=600 * ts.SLOW)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
        rc = 0 if p.returncode == 0 else 1
        rep = ts.Report()
        for s, name in ((tiny, "tiny-moe-code server"), (qwen, "qwen3 server")):
            ts.stop_checked(rep, s, name)
        if rep.failures:
            rc = 1
    finally:
        for s in servers:
            s.kill()
    return rc


if __name__ == "__main__":
    sys.exit(main())
