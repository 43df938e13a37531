#!/usr/bin/env bash
# Installs the Debian packages ferry builds with, if any is missing.
# Needs root or sudo only when something is missing.
set -euo pipefail

packages=(build-essential cmake pkg-config libcjson-dev check liburing-dev libhwloc-dev libxxhash-dev
          libpcre2-dev libutf8proc-dev libmicrohttpd-dev python3 python3-jinja2
          # pip install ./python in a virtual environment, offline (test_python_install)
          python3-venv python3-pip python3-setuptools python3-wheel
          # clang and its runtime libraries (libFuzzer, the sanitizers): make test-clang, make fuzz
          clang libclang-rt-14-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node and npm: test_tokenizer_ref installs the Hugging Face tokenizers library (its Node
# binding) from npm as the reference for the byte-level tokenizers. Checked as commands, as a
# machine may have them from elsewhere than Debian's packages (NodeSource's nodejs bundles npm).
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
