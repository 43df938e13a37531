"""tests/test_python_install.py: the Python package installed with pip, as a user does it.

In a fresh virtual environment (Debian's /usr/bin/python3 when it has venv, else this
interpreter; --system-site-packages, so the distribution's setuptools and wheel build
offline), `pip install --no-build-isolation --no-index ROOT/python` builds libferry.so with
CMake and bundles it in the package. Then, in a fresh process with a clean environment (no
FERRY_* variables, no PYTHONPATH, cwd outside the repository): `import ferry` loads the
bundled library, and the bundled model's greedy text, a stop string, the completion call's
text and token counts equal what `ferry run --json` (this build's binary) gives. Checks that
the install left nothing untracked in python/ (its build goes to BUILD_DIR/python-build).
Then the package installed from a copy of python/ outside the source tree (nothing
compiled) finds `cmake --install BUILD_DIR --prefix P` through pkg-config, and says where it
looked when pkg-config has no ferry.pc.

Run by CTest as: python3 tests/test_python_install.py FERRY_BINARY BUILD_DIR
Exits 77 (skipped) only when no interpreter can create a virtual environment with pip.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-moe-code")
PYTHON_DIR = os.path.join(ROOT, "python")
PROMPT = "def fibonacci(n):\n"
N = 24
failures = []


def check(ok, what, detail=""):
    print("%s %s" % ("ok  " if ok else "FAIL", what), flush=True)
    if not ok:
        failures.append("%s: %s" % (what, detail))


def run(cmd, env=None, cwd=None, timeout=600):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError("%s failed (%d):\n%s%s" % (" ".join(cmd), p.returncode,
                                                      p.stdout[-3000:], p.stderr[-3000:]))
    return p.stdout


def interpreter():
    """Debian's python3 when it has venv and ensurepip (the setuptools and wheel of
    python3-setuptools and python3-wheel build offline), else this one; None when neither
    can make a virtual environment with pip."""
    for exe in ("/usr/bin/python3", sys.executable):
        if exe and os.path.exists(exe):
            p = subprocess.run([exe, "-c", "import venv, ensurepip"], capture_output=True)
            if p.returncode == 0:
                return exe
    return None


def make_venv(python, path):
    """A virtual environment with pip that sees the system's setuptools and wheel, or None
    with the reason when venv/ensurepip cannot make one."""
    p = subprocess.run([python, "-m", "venv", "--system-site-packages", path],
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return None, p.stderr.strip()[-1000:]
    return os.path.join(path, "bin", "python"), None


def pip_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FERRY_", "PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def clean_env(tmp, **extra):
    """What a fresh login would have: no FERRY_*, no PYTHONPATH, no LD_LIBRARY_PATH."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def pip_install(venv_python, source, build_dir):
    env = pip_env()
    env["FERRY_PYTHON_BUILD_DIR"] = build_dir
    return run([venv_python, "-m", "pip", "install", "--no-build-isolation", "--no-index",
                source], env=env, cwd=os.path.dirname(build_dir), timeout=1500)


# What the installed package computes, printed as JSON; run with cwd outside the repo.
PROBE = r"""
import json, os, sys
import ferry
model, prompt, n, stop = sys.argv[1:5]
n = int(n)
with ferry.Model(model, backend="cpu", threads=2) as m:
    out = {"library_path": ferry.library_path, "package": os.path.dirname(ferry.__file__),
           "version": ferry.version(),
           "generate": m.generate(prompt, max_tokens=n, stop_at_eos=False),
           "completion": m(prompt, max_tokens=n, temperature=0),
           "stop": m(prompt, max_tokens=n, temperature=0, stop=[stop]),
           "stream": "".join(m.stream(prompt, max_tokens=n, stop_at_eos=False, stop=stop))}
print(json.dumps(out))
"""


def probe(venv_python, tmp, stop, **env):
    out = run([venv_python, "-c", PROBE, MODEL, PROMPT, str(N), stop],
              env=clean_env(tmp, **env), cwd=tmp, timeout=300)
    return json.loads(out)


def untracked_in_python_dir():
    """The untracked (not ignored) files under python/, or None outside a git checkout."""
    if shutil.which("git") is None:
        return None
    p = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=all",
                        "--", "python"], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    return sorted(line[3:] for line in p.stdout.splitlines() if line.startswith("??"))


def main():
    ferry_bin = os.path.abspath(sys.argv[1])
    build = os.path.abspath(sys.argv[2])
    python = interpreter()
    if python is None:
        print("skipped: no python3 here can create a virtual environment (venv, ensurepip: "
              "Debian's python3-venv)")
        return 77

    # what `ferry run` gives: greedy text and ids, and the text before a stop string
    cli = json.loads(run([ferry_bin, "run", MODEL, "-p", PROMPT, "-n", str(N), "--ignore-eos",
                          "--json", "--backend", "cpu", "--threads", "2"]))
    text = cli["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cli_stop = json.loads(run([ferry_bin, "run", MODEL, "-p", PROMPT, "-n", str(N),
                               "--ignore-eos", "--json", "--backend", "cpu", "--threads", "2",
                               "--stop", stop]))["text"]
    check(cli_stop == text[:text.index(stop)], "ferry run --stop cuts the text", cli_stop)

    with tempfile.TemporaryDirectory(prefix="ferry-pip-") as tmp:
        venv_python, why = make_venv(python, os.path.join(tmp, "venv"))
        if venv_python is None:
            print("skipped: %s -m venv failed (venv/ensurepip unavailable): %s" % (python, why))
            return 77
        p = subprocess.run([venv_python, "-c", "import setuptools, wheel"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            check(False, "the virtual environment has setuptools and wheel to build offline "
                  "(Debian: python3-setuptools, python3-wheel)", p.stderr[-500:])
            return 1

        before = untracked_in_python_dir()
        pip_install(venv_python, PYTHON_DIR, os.path.join(build, "python-build"))
        check(True, "pip install --no-build-isolation --no-index ./python")
        after = untracked_in_python_dir()
        if before is not None:
            check(after == before, "the install left no untracked file in python/",
                  sorted(set(after) - set(before)))
        for leftover in ("build", "ferry.egg-info"):
            check(not os.path.exists(os.path.join(PYTHON_DIR, leftover)),
                  "no python/%s from the install" % leftover)

        got = probe(venv_python, tmp, stop)
        pkg = got["package"]
        check(pkg.startswith(os.path.join(tmp, "venv")), "ferry imported from the venv", pkg)
        check(got["library_path"] == os.path.join(pkg, "libferry.so"),
              "the bundled libferry.so is loaded, no environment variable",
              got["library_path"])
        check(got["generate"] == text, "generate() equals ferry run",
              (got["generate"], text))
        c = got["completion"]
        check(c["object"] == "text_completion" and c["model"] == "tiny-moe-code"
              and c["choices"][0]["text"] == text
              and c["choices"][0]["finish_reason"] == "length",
              "model(prompt) gives ferry run's text, finish_reason length", c)
        check(c["usage"] == {"prompt_tokens": len(cli["prompt_ids"]),
                             "completion_tokens": len(cli["ids"]),
                             "total_tokens": len(cli["prompt_ids"]) + len(cli["ids"])},
              "model(prompt)'s usage counts ferry run's tokens", c["usage"])
        s = got["stop"]
        check(s["choices"][0]["text"] == cli_stop and s["choices"][0]["finish_reason"] == "stop",
              "model(prompt, stop=...) equals ferry run --stop", s["choices"][0])
        check(got["stream"] == cli_stop, "stream(stop=...) equals ferry run --stop",
              got["stream"])

        # outside a source tree: nothing compiled, an installed ferry found by pkg-config
        copy = os.path.join(tmp, "python-copy")
        shutil.copytree(PYTHON_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
        venv2_python, why = make_venv(python, os.path.join(tmp, "venv2"))
        check(venv2_python is not None, "a second virtual environment", why)
        if venv2_python is not None:
            pip_install(venv2_python, copy, os.path.join(tmp, "unused-build"))
            site = run([venv2_python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                        "['platlib'], sysconfig.get_paths()['purelib'])"]).split()
            bundled = [d for d in site if os.path.exists(os.path.join(d, "ferry", "libferry.so"))]
            check(not bundled, "installed outside a source tree, the package bundles no "
                  "library", bundled)
            prefix = os.path.join(tmp, "prefix")
            run(["cmake", "--install", build, "--prefix", prefix])
            pc_dir = os.path.join(prefix, "lib", "pkgconfig")
            got2 = probe(venv2_python, tmp, stop, PKG_CONFIG_PATH=pc_dir)
            check(got2["library_path"] == os.path.join(prefix, "lib", "libferry.so"),
                  "the installed libferry.so found through pkg-config", got2["library_path"])
            check(got2["generate"] == text and got2["stream"] == cli_stop,
                  "and it generates ferry run's text")
            p = subprocess.run([venv2_python, "-c", "import ferry"],
                               env=clean_env(tmp, PKG_CONFIG_PATH=os.path.join(tmp, "none")),
                               cwd=tmp, capture_output=True, text=True, timeout=120)
            if p.returncode == 0:
                print("note: a libferry is installed on this system; the not-found message "
                      "is not checked")
            else:
                check("LibraryNotFoundError" in p.stderr
                      and "pkg-config --variable=libdir ferry" in p.stderr
                      and "pip install ./python" in p.stderr,
                      "without ferry.pc, the ImportError says where it looked", p.stderr[-2000:])

    if failures:
        print("\n%d failure(s):" % len(failures))
        for f in failures:
            print("  " + f)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
