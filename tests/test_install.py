"""tests/test_install.py: ferry installed as a library people build on.

Installs the build (cmake --install BUILD --prefix TMP) and checks: the files (bin/ferry,
lib/libferry.so.MAJOR with its soname, lib/libferry.a, include/ferry.h, the pkg-config file,
the CMake package); that libferry.so exports exactly the functions include/ferry.h declares
(no internals, no C++ symbols); then builds examples/generate.c against the installed tree
with pkg-config (shared, and static with --static) and with CMake (find_package(ferry),
target ferry::ferry), and runs each on the bundled model.

Run by CTest as: python3 tests/test_install.py BUILD_DIR
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-moe-code")
EXAMPLE = os.path.join(ROOT, "examples", "generate.c")
failures = []


def check(ok, what, detail=""):
    print("%s %s" % ("ok  " if ok else "FAIL", what))
    if not ok:
        failures.append("%s: %s" % (what, detail))


def run(cmd, env=None, cwd=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if p.returncode != 0:
        raise RuntimeError("%s failed (%d):\n%s%s" % (" ".join(cmd), p.returncode,
                                                      p.stdout[-2000:], p.stderr[-2000:]))
    return p.stdout


def header_functions():
    text = open(os.path.join(ROOT, "include", "ferry.h")).read()
    return set(re.findall(r"\n[a-z][a-z0-9_ *]*[ *](ferry_[a-z0-9_]+)\(", text))


def run_example(binary, env, what):
    out = run([binary, MODEL, "def fibonacci(n):", "8"], env=env)
    check(out.startswith("def fibonacci(n):") and len(out) > len("def fibonacci(n):"),
          "%s generates" % what, out[:200])


def main():
    build = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="ferry-install-") as tmp:
        prefix = os.path.join(tmp, "prefix")
        run(["cmake", "--install", build, "--prefix", prefix])
        libdir = os.path.join(prefix, "lib")
        expect = ["bin/ferry", "include/ferry.h", "lib/libferry.a", "lib/libferry.so",
                  "lib/pkgconfig/ferry.pc", "lib/cmake/ferry/ferryConfig.cmake",
                  "lib/cmake/ferry/ferryConfigVersion.cmake"]
        for f in expect:
            check(os.path.exists(os.path.join(prefix, f)), "installed " + f)
        sonames = [f for f in os.listdir(libdir) if re.fullmatch(r"libferry\.so\.\d+", f)]
        check(len(sonames) == 1, "installed libferry.so.MAJOR", os.listdir(libdir))
        so = os.path.join(libdir, "libferry.so")
        dyn = run(["readelf", "-d", so])
        check(sonames and "[%s]" % sonames[0] in dyn, "the soname is " +
              (sonames[0] if sonames else "?"), dyn)

        exported = set()
        for line in run(["nm", "-D", "--defined-only", so]).splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "TtDdBbRrWwVvi" and parts[2] != "FERRY_0":
                exported.add(parts[2].split("@")[0])
        declared = header_functions()
        check(len(declared) >= 30, "include/ferry.h declares %d functions" % len(declared))
        extra = sorted(exported - declared)
        missing = sorted(declared - exported)
        check(not extra, "libferry.so exports nothing but ferry.h's functions", extra[:20])
        check(not missing, "libferry.so exports every function of ferry.h", missing[:20])

        run([os.path.join(prefix, "bin", "ferry"), "version"])
        check(True, "the installed ferry command runs")

        env = dict(os.environ)
        env["PKG_CONFIG_PATH"] = os.path.join(libdir, "pkgconfig")
        cc = os.environ.get("CC", "cc")
        cflags = run(["pkg-config", "--cflags", "ferry"], env=env).split()
        libs = run(["pkg-config", "--libs", "ferry"], env=env).split()
        shared_bin = os.path.join(tmp, "generate-shared")
        run([cc, "-o", shared_bin, EXAMPLE] + cflags + libs)
        run_env = dict(env, LD_LIBRARY_PATH=libdir)
        run_example(shared_bin, run_env, "examples/generate.c built with pkg-config")

        # libferry.a, not the .so beside it, then what ferry.pc says a static libferry needs:
        # its Requires.private (linked as the system has them) and Libs.private
        requires = [line.split()[0] for line in
                    run(["pkg-config", "--print-requires-private", "ferry"], env=env).splitlines()
                    if line.strip()]
        deps = run(["pkg-config", "--libs"] + requires, env=env).split()
        static_libs = run(["pkg-config", "--static", "--libs", "ferry"], env=env).split()
        private = [f for f in static_libs if f in ("-lpthread", "-lm", "-lstdc++", "-ldl", "-lrt")
                   or f.startswith("-lcu") or (f.startswith("-L") and "cuda" in f)]
        static_bin = os.path.join(tmp, "generate-static")
        run([cc, "-o", static_bin, EXAMPLE] + cflags + [os.path.join(libdir, "libferry.a")] +
            deps + private)
        needed = run(["readelf", "-d", static_bin])
        check("libferry.so" not in needed, "the static build does not need libferry.so")
        run_example(static_bin, dict(os.environ), "examples/generate.c linked statically")

        proj = os.path.join(tmp, "proj")
        os.makedirs(proj)
        shutil.copy(EXAMPLE, proj)
        with open(os.path.join(proj, "CMakeLists.txt"), "w") as f:
            f.write("cmake_minimum_required(VERSION 3.20)\nproject(uses_ferry C)\n"
                    "find_package(ferry 0 REQUIRED)\nadd_executable(generate generate.c)\n"
                    "target_link_libraries(generate PRIVATE ferry::ferry)\n")
        pb = os.path.join(tmp, "proj-build")
        run(["cmake", "-S", proj, "-B", pb, "-DCMAKE_PREFIX_PATH=" + prefix])
        run(["cmake", "--build", pb])
        run_example(os.path.join(pb, "generate"), dict(os.environ),
                    "examples/generate.c built with find_package(ferry)")
    if failures:
        print("\n%d failures:" % len(failures))
        for f in failures:
            print("  " + f)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
