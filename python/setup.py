"""python/setup.py: builds the ferry package and the libferry.so it carries.

`pip install ./python` (pyproject.toml: setuptools) runs this. In the ferry source tree (the
folder above this one, with CMakeLists.txt and include/ferry.h), build_py compiles the
shared library with CMake (target `ferry`: libferry.so; FERRY_TESTS=OFF, FERRY_CUDA=OFF
unless $FERRY_CMAKE_ARGS says otherwise, e.g. "-DFERRY_CUDA=AUTO") and copies it into the
package as ferry/libferry.so, where ferry/_lib.py looks first; the wheel is then tagged for
this platform. Outside a source tree (the python folder copied elsewhere), nothing is
compiled: the package is pure Python and finds an installed libferry at import time
(pkg-config, the system's search path; see ferry/_lib.py).

Where the build goes: $FERRY_PYTHON_BUILD_DIR, else build-python/ in the source tree (git
ignores /build-*/). The CMake build folder and setuptools' own build and egg-info folders
all live there, so an install leaves nothing untracked in the tree, and a second install
rebuilds only what changed.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(HERE)
IN_SOURCE_TREE = (os.path.isfile(os.path.join(SOURCE, "CMakeLists.txt"))
                  and os.path.isfile(os.path.join(SOURCE, "include", "ferry.h")))
BUILD = os.path.abspath(os.environ.get("FERRY_PYTHON_BUILD_DIR")
                        or os.path.join(SOURCE, "build-python"))


def version():
    """The library's version: project(ferry VERSION x.y.z) in CMakeLists.txt, else what
    pkg-config says of an installed ferry, else 0.0.0."""
    if IN_SOURCE_TREE:
        with open(os.path.join(SOURCE, "CMakeLists.txt")) as f:
            m = re.search(r"project\(\s*ferry\s+VERSION\s+([0-9][0-9.]*)", f.read())
        if m:
            return m.group(1)
    try:
        out = subprocess.run(["pkg-config", "--modversion", "ferry"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "0.0.0"


def run(cmd):
    print("ferry setup.py: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr,
          flush=True)
    subprocess.run(cmd, check=True)


class BuildWithLibrary(build_py):
    """build_py, then libferry.so built with CMake and copied into the package."""

    def run(self):
        super().run()
        if not IN_SOURCE_TREE:
            print("ferry setup.py: %s is not a ferry source tree: no libferry.so bundled; "
                  "`import ferry` will look for an installed one (pkg-config, the system's "
                  "library path)" % SOURCE, file=sys.stderr)
            return
        if shutil.which("cmake") is None:
            raise SystemExit("ferry setup.py: building libferry.so needs cmake (and a C "
                             "compiler and ferry's build dependencies, README.md)")
        cmake_build = os.path.join(BUILD, "cmake")
        run(["cmake", "-S", SOURCE, "-B", cmake_build, "-DCMAKE_BUILD_TYPE=Release",
             "-DFERRY_TESTS=OFF", "-DFERRY_CUDA=OFF"]
            + shlex.split(os.environ.get("FERRY_CMAKE_ARGS", "")))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        run(["cmake", "--build", cmake_build, "--target", "ferry", "--parallel", jobs])
        lib = os.path.join(cmake_build, "libferry.so")
        if not os.path.isfile(lib):
            raise SystemExit("ferry setup.py: the build made no %s" % lib)
        dest = os.path.join(self.build_lib, "ferry", "libferry.so")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        # one file: the library itself, not the libferry.so -> .so.0 -> .so.0.1.0 links
        shutil.copyfile(os.path.realpath(lib), dest)
        os.chmod(dest, 0o755)


class LibraryDistribution(Distribution):
    """A distribution whose wheel is tagged for this platform when it carries libferry.so."""

    def has_ext_modules(self):
        return IN_SOURCE_TREE


options = {}
if IN_SOURCE_TREE:
    # setuptools' build/ and ferry.egg-info/ next to the CMake build, out of the tree
    options = {"build": {"build_base": os.path.join(BUILD, "setuptools")},
               "egg_info": {"egg_base": os.path.join(BUILD, "setuptools")}}
    os.makedirs(os.path.join(BUILD, "setuptools"), exist_ok=True)

setup(version=version(), cmdclass={"build_py": BuildWithLibrary},
      distclass=LibraryDistribution, options=options, zip_safe=False)
