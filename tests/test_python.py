"""tests/test_python.py: the Python harness (python/ferry, ctypes over libferry.so) against
the bundled model and the Hugging Face reference outputs: library lookup (pkg-config too),
tokenizer, greedy and sampled generation, streaming and stopping it early, stop strings,
Ctrl-C (SIGINT) during generation, the llama-cpp-python-style completion call, statistics
and the hit rate, offloaded generation on both tiers, batch generation against generating
each prompt alone, benchmarks, errors, closing, and the ctypes struct layouts against the
C compiler's. tests/test_python_install.py covers `pip install ./python`.

Run by CTest with FERRY_LIBRARY_PATH=<libferry.so> and PYTHONPATH=<source>/python; by hand:
    FERRY_LIBRARY_PATH=build/libferry.so PYTHONPATH=python python3 tests/test_python.py
Every model runs on the CPU backend (the GPU has its own suite).
"""
import ctypes
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-moe-code")
REF = os.path.join(ROOT, "tests", "fixtures", "tiny-moe-code.ref.json")
PACKAGE = os.path.join(ROOT, "python", "ferry")

if os.path.join(ROOT, "python") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "python"))
import ferry  # noqa: E402
from ferry import _lib  # noqa: E402

with open(REF) as f:
    CASES = json.load(f)["cases"]
CASE = CASES[0]
# 32 greedy tokens with EOS ignored; the reference text includes the prompt
GREEDY = CASE["greedy_text"][len(CASE["prompt"]):]


def open_model(**kw):
    kw.setdefault("backend", "cpu")
    return ferry.Model(MODEL, **kw)


def python_env(**changes):
    env = dict(os.environ)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_python(code, env):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def copy_package(dst):
    """A copy of the package's sources alone under dst/ferry, away from any build folder."""
    os.makedirs(os.path.join(dst, "ferry"))
    for name in os.listdir(PACKAGE):
        if name.endswith(".py"):
            shutil.copy(os.path.join(PACKAGE, name), os.path.join(dst, "ferry", name))


class LookupTest(unittest.TestCase):
    """Which libferry.so the package loads, each in a fresh interpreter."""

    PRINT_PATH = "import ferry; print(ferry.library_path)"

    def test_env_file_and_folder(self):
        lib = os.path.realpath(ferry.library_path)
        for value in (lib, os.path.dirname(lib)):
            p = run_python(self.PRINT_PATH, python_env(FERRY_LIBRARY_PATH=value,
                                                       PYTHONPATH=os.path.dirname(PACKAGE)))
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(os.path.realpath(p.stdout.strip()), lib)

    def test_env_missing_file_is_a_clear_error(self):
        missing = os.path.join(tempfile.gettempdir(), "no-such-dir-ferry", "libferry.so")
        p = run_python(self.PRINT_PATH, python_env(FERRY_LIBRARY_PATH=missing,
                                                   PYTHONPATH=os.path.dirname(PACKAGE)))
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("LibraryNotFoundError", p.stderr)
        self.assertIn("FERRY_LIBRARY_PATH=" + missing, p.stderr)
        self.assertIn("no such file", p.stderr)
        # the variable is authoritative: no silent fallback to the build folder
        self.assertNotIn(os.path.join("build", "libferry.so"), p.stderr)
        # an ImportError, so `except ImportError` catches it
        p = run_python("try:\n import ferry\nexcept ImportError as e:\n print('caught', "
                       "type(e).__name__)", python_env(FERRY_LIBRARY_PATH=missing,
                                                       PYTHONPATH=os.path.dirname(PACKAGE)))
        self.assertEqual(p.stdout.strip(), "caught LibraryNotFoundError", p.stderr)

    def test_next_to_the_package(self):
        with tempfile.TemporaryDirectory() as tmp:
            copy_package(tmp)
            lib = os.path.join(tmp, "ferry", "libferry.so")
            shutil.copy(ferry.library_path, lib)
            p = run_python(self.PRINT_PATH, python_env(FERRY_LIBRARY_PATH=None, PYTHONPATH=tmp))
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(p.stdout.strip(), lib)

    def test_nothing_found_lists_every_place(self):
        with tempfile.TemporaryDirectory() as tmp:
            copy_package(tmp)
            empty = os.path.join(tmp, "no-pc-files")
            os.makedirs(empty)
            p = run_python(self.PRINT_PATH, python_env(FERRY_LIBRARY_PATH=None, PYTHONPATH=tmp,
                                                       LD_LIBRARY_PATH=None,
                                                       PKG_CONFIG_PATH=empty))
            if p.returncode == 0:
                self.skipTest("a libferry.so is installed on the system: %s" % p.stdout.strip())
            self.assertIn("LibraryNotFoundError", p.stderr)
            for place in (os.path.join(tmp, "ferry", "libferry.so"),
                          os.path.join(tmp, "libferry.so"),
                          os.path.join(os.path.dirname(tmp), "build", "libferry.so"),
                          "pkg-config --variable=libdir ferry",
                          "system's library search path"):
                self.assertIn(place, p.stderr)

    @unittest.skipIf(shutil.which("pkg-config") is None, "no pkg-config")
    def test_installed_ferry_through_pkg_config(self):
        # an installed tree as `cmake --install --prefix P` lays it out: P/lib/libferry.so and
        # P/lib/pkgconfig/ferry.pc; the package alone finds it through PKG_CONFIG_PATH
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "prefix")
            os.makedirs(os.path.join(prefix, "lib", "pkgconfig"))
            lib = os.path.join(prefix, "lib", "libferry.so")
            shutil.copy(ferry.library_path, lib)
            with open(os.path.join(prefix, "lib", "pkgconfig", "ferry.pc"), "w") as f:
                f.write("prefix=%s\nlibdir=${prefix}/lib\nName: ferry\nDescription: test\n"
                        "Version: %s\nLibs: -L${libdir} -lferry\n" % (prefix, ferry.version()))
            pkg = os.path.join(tmp, "pkg")
            copy_package(pkg)
            p = run_python(self.PRINT_PATH, python_env(
                FERRY_LIBRARY_PATH=None, PYTHONPATH=pkg, LD_LIBRARY_PATH=None,
                PKG_CONFIG_PATH=os.path.join(prefix, "lib", "pkgconfig")))
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(p.stdout.strip(), lib)


class ModelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.m = open_model(threads=2)

    @classmethod
    def tearDownClass(cls):
        cls.m.close()

    def test_info(self):
        info = self.m.info
        self.assertEqual((info.n_layers, info.n_experts, info.n_experts_used, info.d_model),
                         (6, 8, 2, 192))
        self.assertEqual(info.n_vocab, 4096)
        self.assertEqual(info.backend, "cpu")
        self.assertTrue(info.device.startswith("cpu"), info.device)
        self.assertEqual(info.bos_id, CASE["ids"][0])

    def test_tokenize_matches_fixture_and_round_trips(self):
        for case in CASES:
            ids = self.m.tokenize(case["prompt"])
            self.assertEqual(ids, case["ids"])
            self.assertEqual(self.m.detokenize(ids), case["prompt"])
            self.assertEqual(self.m.tokenize(case["prompt"], add_special=False), case["ids"][1:])
        self.assertEqual(self.m.tokenize(""), [self.m.info.bos_id])
        self.assertEqual(self.m.detokenize([]), "")

    def test_generate_matches_reference(self):
        text = self.m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False)
        self.assertEqual(text, GREEDY)
        # token ids as a prompt give the same
        self.assertEqual(self.m.generate(CASE["ids"], max_tokens=32, stop_at_eos=False), GREEDY)
        self.assertEqual(self.m.generate(CASE["prompt"], max_tokens=0), "")

    def test_stats_of_the_last_generation(self):
        self.m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False)
        s = self.m.stats()
        for key in ("n_prompt_tokens", "n_decode_tokens", "prefill_seconds", "decode_seconds",
                    "sample_seconds", "prefill_tokens_per_s", "decode_tokens_per_s"):
            self.assertIn(key, s)
        self.assertEqual(s["n_prompt_tokens"], len(CASE["ids"]))
        self.assertEqual(s["n_decode_tokens"], 31)  # the last sampled token is not fed back
        self.assertGreater(s["decode_tokens_per_s"], 0)
        self.assertNotIn("offload", s)  # fully resident

    def test_stream_concatenates_to_generate(self):
        pieces = list(self.m.stream(CASE["prompt"], max_tokens=32, stop_at_eos=False))
        self.assertGreater(len(pieces), 10)
        self.assertTrue(all(pieces))
        self.assertEqual("".join(pieces), GREEDY)
        pieces = list(self.m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False,
                                      stream=True))
        self.assertEqual("".join(pieces), GREEDY)

    def test_break_stops_generation(self):
        # 2000 tokens would take seconds; breaking stops the worker after a few
        got = ""
        for i, piece in enumerate(self.m.stream(CASE["prompt"], max_tokens=2000,
                                                stop_at_eos=False)):
            got += piece
            if i == 2:
                break
        self.assertTrue(GREEDY.startswith(got))
        n = self.m.stats()["n_decode_tokens"]
        self.assertGreaterEqual(n, 2)
        self.assertLess(n, 1000)
        # the model is free again, and gives the same text
        self.assertEqual(self.m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False),
                         GREEDY)

    def test_close_stream_explicitly(self):
        s = self.m.stream(CASE["prompt"], max_tokens=2000, stop_at_eos=False)
        self.assertTrue(GREEDY.startswith(next(s)))
        with self.assertRaises(RuntimeError):  # one generation at a time
            self.m.generate(CASE["prompt"], max_tokens=4)
        s.close()
        s.close()
        self.assertEqual(list(s), [])
        self.assertLess(self.m.stats()["n_decode_tokens"], 1000)
        self.assertEqual(self.m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False),
                         GREEDY)

    def test_sampling_is_reproducible_by_seed(self):
        kw = dict(max_tokens=24, temperature=0.9, top_k=50, top_p=0.95, stop_at_eos=False)
        a = self.m.generate("import os\n", seed=7, **kw)
        b = self.m.generate("import os\n", seed=7, **kw)
        c = self.m.generate("import os\n", seed=8, **kw)
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)
        self.assertEqual("".join(self.m.stream("import os\n", seed=7, **kw)), a)
        # and greedy again afterwards
        self.assertEqual(self.m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False),
                         GREEDY)

    def test_bad_arguments_raise_value_error(self):
        for kw in (dict(max_tokens=-1), dict(temperature=-0.5), dict(temperature=float("nan")),
                   dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(seed=-1)):
            with self.assertRaises(ValueError, msg=str(kw)):
                self.m.generate(CASE["prompt"], **kw)
            with self.assertRaises(ValueError, msg=str(kw)):
                self.m.stream(CASE["prompt"], **kw)  # checked at the call, not at next()
        with self.assertRaises(ValueError):
            self.m.detokenize([2**40])
        with self.assertRaises(ValueError):
            self.m.generate([])

    def test_library_errors_raise_ferry_error(self):
        with self.assertRaises(ferry.FerryError) as cm:
            self.m.detokenize([self.m.info.n_vocab + 5])
        self.assertEqual(cm.exception.status, "FERRY_ERR_INVALID")


class InterruptTest(unittest.TestCase):
    """Ctrl-C (SIGINT to this process) in the middle of a long generation: KeyboardInterrupt
    reaches the caller, the generation stops there, and the Model works afterwards."""

    LONG = 4000  # tokens: seconds of generation, far longer than the delay before the signal

    @classmethod
    def setUpClass(cls):
        cls.m = open_model(threads=2)

    @classmethod
    def tearDownClass(cls):
        cls.m.close()

    def interrupt(self, run):
        """Runs run() with a SIGINT sent from another thread after a delay; returns the
        decode steps the interrupted generation made. Retries with a longer delay when the
        signal came before the generation had decoded anything (a slow machine)."""
        self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)
        for delay in (0.3, 1.0, 3.0):
            self.m.generate(CASE["prompt"], max_tokens=1)  # stats: no decode step
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                with self.assertRaises(KeyboardInterrupt):
                    run()
            finally:
                timer.cancel()
                timer.join()
            n = self.m.stats()["n_decode_tokens"]
            if n > 0:
                self.assertLess(n, self.LONG - 100)  # stopped, not run to the end
                # the handler is Python's own again, and the Model gives the normal result
                self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)
                self.assertEqual(self.m.generate(CASE["prompt"], max_tokens=32,
                                                 stop_at_eos=False), GREEDY)
                return n
        self.fail("the generation never started decoding before the signal")

    def test_generate(self):
        self.interrupt(lambda: self.m.generate(CASE["prompt"], max_tokens=self.LONG,
                                               stop_at_eos=False))

    def test_generate_with_stop_strings_and_completion(self):
        self.interrupt(lambda: self.m.generate(CASE["prompt"], max_tokens=self.LONG,
                                               stop_at_eos=False, stop=["never there"]))
        self.interrupt(lambda: self.m(CASE["prompt"], max_tokens=self.LONG, temperature=0,
                                      stop=["never there"]))

    def test_stream(self):
        def consume_with():
            with self.m.stream(CASE["prompt"], max_tokens=self.LONG, stop_at_eos=False) as s:
                for _ in s:
                    pass

        def consume_for():
            for _ in self.m.stream(CASE["prompt"], max_tokens=self.LONG, stop_at_eos=False):
                pass

        def consume_chunks():
            for _ in self.m(CASE["prompt"], max_tokens=self.LONG, temperature=0, stream=True):
                pass
        for consume in (consume_with, consume_for, consume_chunks):
            self.interrupt(consume)


class StopTest(unittest.TestCase):
    """stop=[...]: the text ends before the first occurrence, generation stops there, and a
    stream never shows any part of a stop string."""

    @classmethod
    def setUpClass(cls):
        cls.m = open_model(threads=2)
        cls.pieces = list(cls.m.stream(CASE["prompt"], max_tokens=32, stop_at_eos=False))

    @classmethod
    def tearDownClass(cls):
        cls.m.close()

    def generate(self, stop, **kw):
        return self.m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False, stop=stop, **kw)

    def test_text_ends_before_the_stop_string(self):
        p = self.pieces
        self.assertEqual("".join(p), GREEDY)
        # a stop string across three pieces
        stop = p[10][-1:] + p[11] + p[12][:1]
        cut = GREEDY[:GREEDY.index(stop)]
        self.assertEqual(self.generate(["never there", stop]), cut)
        # generation stopped at the token that completed it
        self.assertLess(self.m.stats()["n_decode_tokens"], 31)
        self.assertEqual(self.generate(stop), cut)  # one str
        self.assertEqual(self.generate((stop,)), cut)
        # the earliest of several
        later = p[20]
        self.assertEqual(self.generate([later, stop]), cut)
        self.assertEqual(self.generate(["never there"]), GREEDY)
        self.assertEqual(self.generate([]), GREEDY)
        # the stop string right at the start: nothing
        self.assertEqual(self.generate([GREEDY[:3]]), "")

    def test_stream_holds_back_partial_matches(self):
        p = self.pieces
        stop = p[10][-1:] + p[11] + p[12][:1]
        cut = GREEDY[:GREEDY.index(stop)]
        s = self.m.stream(CASE["prompt"], max_tokens=32, stop_at_eos=False, stop=[stop])
        got = list(s)
        self.assertEqual("".join(got), cut)  # nothing of the stop string was ever yielded
        self.assertEqual(s.finish_reason, "stop")
        self.assertLess(s.n_tokens, 32)
        # a prefix that never completes is held back while it could, then handed out
        partial = p[10] + p[11] + "\x01never"
        s = self.m.stream(CASE["prompt"], max_tokens=32, stop_at_eos=False, stop=partial)
        got = list(s)
        self.assertEqual("".join(got), GREEDY)
        self.assertEqual((s.finish_reason, s.n_tokens), ("length", 32))
        # p[10] was held back until p[12] showed it was not the stop string
        self.assertLess(len(got), len(p))
        self.assertNotIn(p[10], got)
        # generate(stream=True) passes stop on
        self.assertEqual("".join(self.m.generate(CASE["prompt"], max_tokens=32,
                                                 stop_at_eos=False, stream=True,
                                                 stop=[stop])), cut)

    def test_matcher_across_pieces(self):
        m = ferry._StopMatcher(("abc", "xyz"))
        self.assertEqual([m.feed(x) for x in ("1a", "b", "d", "xy", "ab", "c", "9")],
                         ["1", "", "abd", "", "xy", "", ""])
        self.assertTrue(m.stopped)
        self.assertEqual(m.flush(), "")
        m = ferry._StopMatcher(("abc",))
        self.assertEqual([m.feed(x) for x in ("zab", "ab")], ["z", "ab"])
        self.assertEqual(m.flush(), "ab")  # the end: what was held back
        m = ferry._StopMatcher(("ü€",))  # characters, not bytes
        self.assertEqual([m.feed(x) for x in ("aü", "b€ü", "€c")], ["a", "üb€", ""])

    def test_bad_stop_strings(self):
        for stop, error in (("", ValueError), (["a", ""], ValueError), ([1], TypeError),
                            (b"x", TypeError), ({"a"}, TypeError)):
            with self.assertRaises(error, msg=repr(stop)):
                self.generate(stop)
            with self.assertRaises(error, msg=repr(stop)):
                self.m.stream(CASE["prompt"], stop=stop)
            with self.assertRaises(error, msg=repr(stop)):
                self.m(CASE["prompt"], stop=stop)


class CompletionTest(unittest.TestCase):
    """model(prompt, ...) and Model.create_completion: llama-cpp-python's call, OpenAI's
    text_completion shape."""

    @classmethod
    def setUpClass(cls):
        cls.m = open_model(threads=2)

    @classmethod
    def tearDownClass(cls):
        cls.m.close()

    def check_shape(self, out, text, finish, n_completion, prompt=CASE["prompt"]):
        self.assertEqual(set(out), {"id", "object", "created", "model", "choices", "usage"})
        self.assertTrue(out["id"].startswith("cmpl-"), out["id"])
        self.assertEqual(out["object"], "text_completion")
        self.assertIsInstance(out["created"], int)
        self.assertLessEqual(abs(out["created"] - time.time()), 60)
        self.assertEqual(out["model"], "tiny-moe-code")
        self.assertEqual(out["choices"], [{"text": text, "index": 0, "logprobs": None,
                                           "finish_reason": finish}])
        n_prompt = len(self.m.tokenize(prompt))
        self.assertEqual(out["usage"], {"prompt_tokens": n_prompt,
                                        "completion_tokens": n_completion,
                                        "total_tokens": n_prompt + n_completion})

    def test_greedy_completion(self):
        out = self.m(CASE["prompt"], max_tokens=32, temperature=0)
        self.check_shape(out, GREEDY, "length", 32)
        out2 = self.m.create_completion(CASE["prompt"], max_tokens=32, temperature=0)
        self.check_shape(out2, GREEDY, "length", 32)
        self.assertNotEqual(out["id"], out2["id"])
        self.check_shape(self.m(CASE["ids"], max_tokens=32, temperature=0), GREEDY, "length", 32)
        self.assertEqual(self.m(CASE["prompt"], max_tokens=4, temperature=0,
                                model="mine")["model"], "mine")

    def test_stop_string_finishes_with_stop(self):
        stop = GREEDY[len(GREEDY) // 2:len(GREEDY) // 2 + 3]
        cut = GREEDY[:GREEDY.index(stop)]
        out = self.m(CASE["prompt"], max_tokens=32, temperature=0, stop=[stop])
        self.assertEqual(out["choices"][0]["text"], cut)
        self.assertEqual(out["choices"][0]["finish_reason"], "stop")
        self.assertLess(out["usage"]["completion_tokens"], 32)

    def test_end_of_sequence_finishes_with_stop(self):
        # a sampled run that ends at EOS (found by seed): finish "stop", EOS counted
        for seed in range(64):
            out = self.m("x", max_tokens=64, temperature=1.5, seed=seed)
            if out["choices"][0]["finish_reason"] == "stop":
                break
        else:
            self.fail("no seed below 64 ended at EOS within 64 tokens")
        n = out["usage"]["completion_tokens"]
        self.assertLess(n, 64)
        ids = self.m.generate_batch(["x"], max_tokens=64, temperature=1.5, top_p=0.95, top_k=40,
                                    seed=seed).ids[0]
        self.assertEqual(len(ids), n)
        self.assertEqual(ids[-1], self.m.info.eos_id)
        self.assertEqual(out["choices"][0]["text"],
                         self.m.generate("x", max_tokens=64, temperature=1.5, top_p=0.95,
                                         top_k=40, seed=seed))
        # EOS as the last allowed token is still "stop"
        out = self.m("x", max_tokens=n, temperature=1.5, seed=seed)
        self.assertEqual(out["choices"][0]["finish_reason"], "stop")

    def test_sampling_defaults_and_seed(self):
        # llama-cpp-python's defaults: temperature 0.8, top_p 0.95, top_k 40
        a = self.m(CASE["prompt"], max_tokens=16, seed=5)["choices"][0]["text"]
        self.assertEqual(a, self.m.generate(CASE["prompt"], max_tokens=16, temperature=0.8,
                                            top_p=0.95, top_k=40, seed=5))
        self.assertEqual(a, self.m(CASE["prompt"], max_tokens=16, seed=5)["choices"][0]["text"])
        # seed None draws a seed: it runs, and greedy ignores it
        self.assertEqual(self.m(CASE["prompt"], max_tokens=8)["usage"]["completion_tokens"], 8)
        self.assertEqual(self.m(CASE["prompt"], max_tokens=32, temperature=0, seed=None)
                         ["choices"][0]["text"], GREEDY)

    def test_unlimited_max_tokens_fills_the_context(self):
        with open_model(ctx=48) as m:
            n_prompt = len(m.tokenize(CASE["prompt"]))
            for max_tokens in (None, 0, -1):
                out = m(CASE["prompt"], max_tokens=max_tokens, temperature=0)
                self.assertEqual(out["usage"]["completion_tokens"], 48 - n_prompt + 1)
                self.assertEqual(out["choices"][0]["finish_reason"], "length")
                self.assertTrue(out["choices"][0]["text"].startswith(GREEDY))

    def test_stream_chunks(self):
        chunks = list(self.m(CASE["prompt"], max_tokens=32, temperature=0, stream=True))
        self.assertGreater(len(chunks), 10)
        self.assertEqual(len({c["id"] for c in chunks}), 1)
        for c in chunks[:-1]:
            self.assertEqual(set(c), {"id", "object", "created", "model", "choices"})
            self.assertEqual(c["object"], "text_completion")
            self.assertIsNone(c["choices"][0]["finish_reason"])
            self.assertTrue(c["choices"][0]["text"])
        self.check_shape(chunks[-1], "", "length", 32)
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks), GREEDY)
        stop = GREEDY[len(GREEDY) // 2:len(GREEDY) // 2 + 3]
        chunks = list(self.m.create_completion(CASE["prompt"], max_tokens=32, temperature=0,
                                               stop=stop, stream=True))
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks),
                         GREEDY[:GREEDY.index(stop)])
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")

    def test_breaking_out_of_a_stream_stops_it(self):
        for i, _ in enumerate(self.m(CASE["prompt"], max_tokens=2000, temperature=0,
                                     stream=True)):
            if i == 2:
                break
        self.assertLess(self.m.stats()["n_decode_tokens"], 1000)
        self.assertEqual(self.m(CASE["prompt"], max_tokens=32, temperature=0)
                         ["choices"][0]["text"], GREEDY)

    def test_arguments(self):
        m = self.m
        with self.assertRaises(TypeError):
            m(CASE["prompt"], 16)  # llama-cpp-python's second positional is suffix
        with self.assertRaises(TypeError) as cm:
            m(CASE["prompt"], max_tokenz=4)
        self.assertIn("max_tokenz", str(cm.exception))
        for kw in (dict(min_p=0.05), dict(echo=True), dict(logprobs=3), dict(suffix="x"),
                   dict(grammar="root ::= x"), dict(mirostat_mode=2), dict(repeat_penalty=1.1),
                   dict(frequency_penalty=0.5), dict(logit_bias={1: 2.0}),
                   dict(stopping_criteria=lambda *a: False), dict(typical_p=0.5),
                   dict(presence_penalty=0.1), dict(tfs_z=0.9),
                   dict(logits_processor=lambda *a: None)):
            with self.assertRaises(ValueError, msg=str(kw)) as cm:
                m(CASE["prompt"], max_tokens=4, **kw)
            self.assertIn(next(iter(kw)), str(cm.exception))
            with self.assertRaises(ValueError, msg=str(kw)):
                m(CASE["prompt"], max_tokens=4, stream=True, **kw)  # checked at the call
        with self.assertRaises(ValueError) as cm:
            m(CASE["prompt"], echo=True, min_p=0.1)
        self.assertIn("echo, min_p", str(cm.exception))
        # the values that change nothing are accepted
        out = m(CASE["prompt"], max_tokens=32, temperature=0, suffix=None, min_p=0.0,
                typical_p=1.0, logprobs=None, echo=False, frequency_penalty=0.0,
                presence_penalty=0, repeat_penalty=1.0, tfs_z=1.0, mirostat_mode=0,
                mirostat_tau=5.0, mirostat_eta=0.1, stopping_criteria=None,
                logits_processor=None, grammar=None, logit_bias={})
        self.assertEqual(out["choices"][0]["text"], GREEDY)
        for kw, error in ((dict(max_tokens=2.5), TypeError), (dict(temperature=-1), ValueError),
                          (dict(top_p=0), ValueError), (dict(seed=-1), ValueError),
                          (dict(model=3), TypeError), (dict(max_tokens=True), TypeError)):
            with self.assertRaises(error, msg=str(kw)):
                m(CASE["prompt"], **kw)

    def test_hit_rate_definition(self):
        self.assertEqual(ferry.hit_rate(3, 1, 4), 3 / 8)
        self.assertEqual(ferry.hit_rate(0, 0, 0), 0.0)
        self.assertEqual(ferry.hit_rate(0, 0, 5), 0.0)
        self.assertEqual(ferry.hit_rate(2, 0, 0), 1.0)


FAMILIES = os.path.join(ROOT, "..", "shared", "fixtures", "moe-families")


class FamiliesTest(unittest.TestCase):
    """The other MoE families through the same API: nothing in Python names a family."""

    def test_generate_matches_reference(self):
        for name in ("tiny-qwen3_moe", "tiny-qwen2_moe", "tiny-olmoe"):
            with open(os.path.join(FAMILIES, name + ".ref.json")) as f:
                case = json.load(f)["cases"][0]
            want = case["greedy_text"][len(case["prompt"]):]
            for kw in ({}, {"gpu_mem": "64M", "slots": 2, "hybrid": "off"}):
                with ferry.Model(os.path.join(FAMILIES, name), threads=2, backend="cpu",
                                 **kw) as m:
                    self.assertEqual(m.tokenize(case["prompt"]), case["ids"], name)
                    text = m.generate(case["prompt"], max_tokens=16, stop_at_eos=False)
                    self.assertEqual(text, want, "%s %s" % (name, kw))


class ErrorTest(unittest.TestCase):
    def test_missing_model_dir_names_config_json(self):
        missing = os.path.join(tempfile.gettempdir(), "no-such-model-ferry")
        with self.assertRaises(ferry.FerryError) as cm:
            ferry.Model(missing, backend="cpu")
        e = cm.exception
        self.assertIsInstance(e, Exception)
        self.assertEqual(e.status, "FERRY_ERR_IO")
        self.assertEqual(e.code, 2)
        self.assertIn("config.json", e.message)
        self.assertTrue(str(e).startswith("FERRY_ERR_IO: "), str(e))
        self.assertIn(missing, str(e))

    def test_bad_options_raise_before_the_library(self):
        # a missing folder with a bad option: ValueError, so nothing reached ferry_model_open
        missing = os.path.join(tempfile.gettempdir(), "no-such-model-ferry")
        for kw in (dict(policy="nope"), dict(backend="tpu"), dict(offload="tape"),
                   dict(predictor="oracle"), dict(reader="mmap"), dict(lookahead=4),
                   dict(threads=-1), dict(gpu_mem="12Q"), dict(gpu_mem=-5), dict(ctx=-1),
                   dict(host_cache="lots"), dict(slots=-2)):
            with self.assertRaises(ValueError, msg=str(kw)) as cm:
                ferry.Model(missing, **kw)
            self.assertNotIsInstance(cm.exception, ferry.FerryError)
        with self.assertRaises(TypeError):
            ferry.Model(missing, threads="2")

    def test_parse_size(self):
        self.assertEqual(ferry.parse_size("20M"), 20 << 20)
        self.assertEqual(ferry.parse_size("1.5G"), 3 << 29)
        self.assertEqual(ferry.parse_size("512MiB"), 512 << 20)
        self.assertEqual(ferry.parse_size("4096"), 4096)
        self.assertEqual(ferry.parse_size(123), 123)
        for bad in ("", "G", "12Q", "-1M", "0", "1e30"):
            with self.assertRaises(ValueError, msg=bad):
                ferry.parse_size(bad)

    def test_context_overflow_from_the_library_and_from_a_stream(self):
        with open_model(ctx=16) as m:
            with self.assertRaises(ferry.FerryError) as cm:
                m.generate(CASE["prompt"], max_tokens=32)
            self.assertEqual(cm.exception.status, "FERRY_ERR_INVALID")
            self.assertIn("the context holds 16", cm.exception.message)
            # the worker's error, with the message read on the worker's thread
            s = m.stream(CASE["prompt"], max_tokens=32)
            with self.assertRaises(ferry.FerryError) as cm:
                next(s)
            self.assertEqual(cm.exception.status, "FERRY_ERR_INVALID")
            self.assertIn("the context holds 16", cm.exception.message)
            self.assertEqual(list(s), [])
            # what fits still runs
            first4 = m.detokenize(CASE["ids"] + CASE["greedy_ids"][:4])[len(CASE["prompt"]):]
            self.assertEqual(m.generate(CASE["prompt"], max_tokens=4, stop_at_eos=False),
                             first4)


class LifetimeTest(unittest.TestCase):
    def test_context_manager_closes(self):
        with open_model() as m:
            self.assertFalse(m.closed)
            self.assertEqual(m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False),
                             GREEDY)
        self.assertTrue(m.closed)
        for use in (lambda: m.generate("x"), lambda: m.stream("x"), lambda: m.tokenize("x"),
                    lambda: m.detokenize([1]), lambda: m.stats(), lambda: m.info,
                    lambda: m.generate_batch(["x"])):
            with self.assertRaises(ValueError):
                use()
        m.close()
        m.close()
        self.assertIn("closed", repr(m))

    def test_close_during_a_stream(self):
        m = open_model()
        s = m.stream(CASE["prompt"], max_tokens=2000, stop_at_eos=False)
        self.assertTrue(GREEDY.startswith(next(s)))
        m.close()  # stops the worker after its current token, then frees
        self.assertTrue(m.closed)
        with self.assertRaises(ValueError):
            next(s)
        self.assertEqual(list(s), [])


class PerplexityTest(unittest.TestCase):
    def test_perplexity_matches_the_cli_definition(self):
        with open(os.path.join(ROOT, "tests", "fixtures", "heldout-python.txt")) as f:
            text = f.read()[:3000]
        with open_model() as m:
            r = m.perplexity(text, window=256)
            self.assertGreater(r["n_scored"], 500)
            self.assertEqual(r["window"], 256)
            self.assertAlmostEqual(r["perplexity"], math.exp(r["nll"]), places=9)
            self.assertGreater(r["perplexity"], 1.0)
            self.assertLess(r["perplexity"], m.perplexity("qzx vkj wpq " * 100)["perplexity"])
            with self.assertRaises(ValueError):
                m.perplexity(text, window=1)
            with self.assertRaises(ferry.FerryError) as e:
                m.perplexity("", window=64)
            self.assertIn("no tokens", str(e.exception))


class OffloadTest(unittest.TestCase):
    def check_offload_stats(self, m, tier):
        s = m.stats()
        self.assertEqual(s["n_decode_tokens"], 31)
        o = s["offload"]
        self.assertEqual(o["tier"], tier)
        self.assertEqual(o["budget_bytes"], 20 << 20)
        self.assertGreater(o["n_slots"], 0)
        self.assertEqual(o["slots_bytes"], o["n_slots"] * o["slot_bytes"])
        self.assertGreater(o["hits"] + o["misses"], 0)
        self.assertGreater(o["misses"], 0)
        self.assertGreater(o["bytes_to_device"], 0)
        # one definition everywhere: an expert computed on the CPU is not a hit
        self.assertIn("cpu_experts", o)
        self.assertAlmostEqual(o["hit_rate"],
                               o["hits"] / (o["hits"] + o["misses"] + o["cpu_experts"]))
        self.assertEqual(len(o["layers"]), 6)
        self.assertEqual(sum(layer["misses"] for layer in o["layers"]), o["misses"])
        self.assertEqual(len(o["precision"]), 4)
        self.assertEqual(o["predictor"], "gate")
        return o

    def test_ram_tier_gives_the_same_text(self):
        with open_model(gpu_mem="20M", hybrid="off") as m:
            self.assertEqual(m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False),
                             GREEDY)
            o = self.check_offload_stats(m, "ram")
            self.assertEqual(o["bytes_from_disk"], 0)
            # a sampled run makes a new context inside the same budget
            kw = dict(max_tokens=16, temperature=0.8, seed=3, stop_at_eos=False)
            self.assertEqual(m.generate("import os\n", **kw), m.generate("import os\n", **kw))
            self.assertEqual("".join(m.stream(CASE["prompt"], max_tokens=32,
                                              stop_at_eos=False)), GREEDY)

    def test_hybrid_modes_give_the_same_text(self):
        for kw in (dict(hybrid="cpu-experts"), dict(gpu_mem="20M", hybrid="auto", slots=4),
                   dict(hybrid="cpu-experts", cpu_kernels="reference")):
            with open_model(**kw) as m:
                self.assertEqual(m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False),
                                 GREEDY, kw)
                o = m.stats()["offload"]
                self.assertEqual(o["hybrid"], kw["hybrid"])
                self.assertEqual(sum(layer["cpu_experts"] for layer in o["layers"]),
                                 o["cpu_experts"])
                uses = o["hits"] + o["misses"] + o["cpu_experts"]
                self.assertGreater(uses, 0)
                self.assertAlmostEqual(o["hit_rate"], o["hits"] / uses)
                if kw["hybrid"] == "cpu-experts":
                    self.assertGreater(o["cpu_experts"], 0)
                    self.assertEqual(o["hits"] + o["misses"], 0)
                    self.assertEqual(o["hit_rate"], 0.0)  # every expert on the CPU: no hit
        with self.assertRaises(ValueError):
            open_model(hybrid="sometimes")
        with self.assertRaises(ValueError):
            open_model(cpu_kernels="mmx")

    def test_nvme_tier_gives_the_same_text(self):
        with tempfile.TemporaryDirectory() as tmp:
            pack = os.path.join(tmp, "tiny.pack")
            ferry.pack_model(MODEL, pack)
            with open_model(gpu_mem=20 << 20, offload="nvme", pack=pack, reader="pread",
                            hybrid="off", host_cache="2M", policy="lfu") as m:
                self.assertEqual(m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False),
                                 GREEDY)
                o = self.check_offload_stats(m, "nvme")
                self.assertFalse(o["uses_uring"])
                self.assertGreater(o["bytes_from_disk"], 0)

    def test_quantized_pack(self):
        with tempfile.TemporaryDirectory() as tmp:
            pack = os.path.join(tmp, "q4.pack")
            ferry.pack_model(MODEL, pack, quant="q4")
            texts = []
            for kw in ({}, {"gpu_mem": 20 << 20, "hybrid": "off"}, {"hybrid": "cpu-experts"}):
                with open_model(pack=pack, **kw) as m:
                    texts.append(m.generate(CASE["prompt"], max_tokens=24, stop_at_eos=False))
            self.assertEqual(len(set(texts)), 1)
            with self.assertRaises(ValueError):
                ferry.pack_model(MODEL, pack, quant="q2")
            with self.assertRaises(ferry.FerryError):
                open_model(pack=os.path.join(tmp, "missing.pack"))

    def test_quantized_dense_weights(self):
        texts = []
        for kw in ({}, {"gpu_mem": 20 << 20, "hybrid": "off"}, {"hybrid": "cpu-experts"}):
            with open_model(quant_dense="q8", **kw) as m:
                texts.append(m.generate(CASE["prompt"], max_tokens=24, stop_at_eos=False))
        self.assertEqual(len(set(texts)), 1)
        with self.assertRaises(ValueError):
            open_model(quant_dense="q3")

    def test_budget_too_small_is_a_ferry_error(self):
        with self.assertRaises(ferry.FerryError) as cm:
            open_model(gpu_mem="1M")
        self.assertEqual(cm.exception.status, "FERRY_ERR_NOMEM")


BATCH_PROMPTS = [case["prompt"] for case in CASES[:3]]  # 11, 14 and 32 tokens
BATCH_STATS = {"steps", "tokens", "layer_batches", "expert_loads", "expert_bytes",
               "bytes_to_device", "hits", "misses", "seconds", "cpu_experts", "hit_rate"}


class BatchTest(unittest.TestCase):
    """Model.generate_batch against the documented invariant: every sequence's output is
    the same as generating its prompt alone, whatever the batching, order or placement."""

    N = 24  # tokens per prompt

    @classmethod
    def setUpClass(cls):
        cls.m = open_model(threads=2)
        cls.alone = [cls.m.generate(p, max_tokens=cls.N, stop_at_eos=False)
                     for p in BATCH_PROMPTS]

    @classmethod
    def tearDownClass(cls):
        cls.m.close()

    def check_batch(self, m, **kw):
        r = m.generate_batch(BATCH_PROMPTS, max_tokens=self.N, stop_at_eos=False, **kw)
        self.assertIsInstance(r, ferry.BatchResult)
        self.assertEqual(r.texts, self.alone, kw)
        self.assertEqual([len(ids) for ids in r.ids], [self.N] * 3)
        for prompt, ids, text in zip(BATCH_PROMPTS, r.ids, r.texts):
            self.assertEqual(m.detokenize(m.tokenize(prompt) + ids), prompt + text)
        s = r.stats
        self.assertEqual(set(s), BATCH_STATS)
        n_prompt = sum(len(m.tokenize(p)) for p in BATCH_PROMPTS)
        # every prompt token, and every generated token but the last, runs once
        self.assertEqual(s["tokens"], n_prompt + 3 * (self.N - 1))
        self.assertGreaterEqual(s["steps"], self.N)
        self.assertGreaterEqual(s["layer_batches"], s["steps"] * 6)
        self.assertGreaterEqual(s["expert_loads"], s["layer_batches"])
        self.assertLessEqual(s["expert_loads"], s["layer_batches"] * 8)
        self.assertGreater(s["expert_bytes"], 0)
        self.assertGreater(s["seconds"], 0)
        self.assertEqual(s["hit_rate"], ferry.hit_rate(s["hits"], s["misses"], s["cpu_experts"]))
        return r

    def test_greedy_matches_each_prompt_alone(self):
        r = self.check_batch(self.m)
        self.assertTrue(GREEDY.startswith(r.texts[0]))
        self.assertEqual(r.ids[0], CASE["greedy_ids"][:self.N])
        self.assertEqual((r.stats["bytes_to_device"], r.stats["hits"], r.stats["misses"]),
                         (0, 0, 0))  # resident

    def test_without_reordering_and_with_small_batches(self):
        base = self.check_batch(self.m)
        for kw in (dict(reorder=False), dict(max_batch=3, chunk=5),
                   dict(max_batch=1, chunk=1, reorder=False)):
            r = self.check_batch(self.m, **kw)
            self.assertEqual(r.ids, base.ids, kw)
        small = self.check_batch(self.m, max_batch=3, chunk=5)
        self.assertGreater(small.stats["layer_batches"], base.stats["layer_batches"])
        self.assertGreater(small.stats["steps"], base.stats["steps"])  # prompts in chunks

    def test_before_and_after_generate_resident_and_offloaded(self):
        # The Model makes its context at open; generate_batch's contexts must fit beside it
        # (offloaded: in the budget its slots left), and generate() must work after them.
        for kw in ({}, dict(gpu_mem=20 << 20, hybrid="off")):
            for batch_first in (True, False):
                with open_model(**kw) as m:
                    what = "%r, batch first: %s" % (kw, batch_first)
                    if not batch_first:
                        self.assertEqual(m.generate(BATCH_PROMPTS[1], max_tokens=self.N,
                                                    stop_at_eos=False), self.alone[1], what)
                    r = self.check_batch(m)
                    if kw:
                        self.assertGreater(r.stats["misses"], 0, what)
                        self.assertGreater(r.stats["bytes_to_device"], 0, what)
                        self.assertEqual(r.stats["cpu_experts"], 0, what)
                    self.assertEqual(m.generate(CASE["prompt"], max_tokens=32,
                                                stop_at_eos=False), GREEDY, what)
                    self.assertEqual(m.stats()["n_decode_tokens"], 31, what)
                    self.assertEqual(self.check_batch(m, reorder=False).ids, r.ids, what)
                    self.assertEqual("offload" in m.stats(), bool(kw), what)

    def test_offloaded_batch_too_large_for_the_budget(self):
        with open_model(gpu_mem=20 << 20, hybrid="off") as m:
            with self.assertRaises(ferry.FerryError) as cm:
                m.generate_batch(["x"] * 64, max_tokens=1000)
            self.assertEqual(cm.exception.status, "FERRY_ERR_NOMEM")
            self.assertIn("gpu-mem", cm.exception.message)
            # the Model's own context is made again
            self.assertEqual(m.generate(CASE["prompt"], max_tokens=32, stop_at_eos=False),
                             GREEDY)
            self.assertEqual(self.check_batch(m).texts, self.alone)

    def test_per_prompt_max_tokens(self):
        full = self.m.generate_batch(BATCH_PROMPTS, max_tokens=self.N, stop_at_eos=False)
        counts = [1, 5, 12]
        r = self.m.generate_batch(BATCH_PROMPTS, max_tokens=counts, stop_at_eos=False)
        self.assertEqual([len(ids) for ids in r.ids], counts)
        for i, k in enumerate(counts):
            self.assertEqual(r.ids[i], full.ids[i][:k])
            self.assertEqual(r.texts[i], self.m.generate(BATCH_PROMPTS[i], max_tokens=k,
                                                         stop_at_eos=False))
        r = self.m.generate_batch(BATCH_PROMPTS[:1], max_tokens=(3,), stop_at_eos=False)
        self.assertEqual(r.ids, [full.ids[0][:3]])

    def test_sampling_and_eos_match_each_prompt_alone(self):
        kw = dict(temperature=0.9, top_k=50, top_p=0.95, seed=7, stop_at_eos=False)
        r = self.m.generate_batch(BATCH_PROMPTS, max_tokens=16, **kw)
        self.assertEqual(r.texts, [self.m.generate(p, max_tokens=16, **kw)
                                   for p in BATCH_PROMPTS])
        self.assertNotEqual(r.ids, self.m.generate_batch(BATCH_PROMPTS, max_tokens=16,
                                                         **dict(kw, seed=8)).ids)
        # stop_at_eos on (the default) as generate() has it
        r = self.m.generate_batch(BATCH_PROMPTS, max_tokens=48)
        self.assertEqual(r.texts, [self.m.generate(p, max_tokens=48) for p in BATCH_PROMPTS])

    def test_bad_arguments(self):
        m = self.m
        for args, kw, error in (
                (([],), {}, ValueError),
                ((BATCH_PROMPTS[0],), {}, TypeError),        # a str, not a list of them
                ((["a", 3],), {}, TypeError),
                (([b"a"],), {}, TypeError),
                ((None,), {}, TypeError),
                ((["a"],), dict(max_tokens=0), ValueError),
                ((["a"],), dict(max_tokens=-3), ValueError),
                ((["a"],), dict(max_tokens=2.5), TypeError),
                ((["a", "b"],), dict(max_tokens=[4]), ValueError),
                ((["a", "b"],), dict(max_tokens=[4, 5, 6]), ValueError),
                ((["a", "b"],), dict(max_tokens=[4, 0]), ValueError),
                ((["a"],), dict(max_tokens=[True]), TypeError),
                ((["a"],), dict(max_batch=0), ValueError),
                ((["a"],), dict(max_batch=-1), ValueError),
                ((["a"],), dict(chunk=0), ValueError),
                ((["a"],), dict(temperature=-1.0), ValueError),
                ((["a"],), dict(top_p=0), ValueError),
                ((["a"],), dict(seed=-1), ValueError),
                ((["a"],), dict(max_tokens=5000), ValueError)):  # beyond 4096 positions
            with self.assertRaises(error, msg="%r %r" % (args, kw)) as cm:
                m.generate_batch(*args, **kw)
            self.assertNotIsInstance(cm.exception, ferry.FerryError)
        with self.assertRaises(TypeError):
            m.generate_batch(["a"], 4, 0.5)  # sampling options are keywords
        # one generation at a time
        s = m.stream(CASE["prompt"], max_tokens=2000, stop_at_eos=False)
        next(s)
        with self.assertRaises(RuntimeError):
            m.generate_batch(["a"], max_tokens=2)
        s.close()
        self.assertEqual(m.generate_batch(["a"], max_tokens=2).stats["tokens"],
                         len(m.tokenize("a")) + 1)


BENCH_FAST = dict(backend="cpu", threads=2, prompt_len=8, gen_len=8, repeat=1,
                  bandwidth_size="8M")


class BenchTest(unittest.TestCase):
    def check_fields(self, r):
        self.assertEqual(set(r), {name for name, _ in _lib.BenchResult._fields_})
        self.assertEqual(set(r["bw"]), {name for name, _ in _lib.Bandwidths._fields_})
        self.assertEqual(r["backend"], "cpu")
        self.assertTrue(r["device"].startswith("cpu"), r["device"])
        bw = r["bw"]
        self.assertEqual(bw["n_bytes"], 8 << 20)
        self.assertGreater(bw["device_gbps"], 0)
        self.assertGreater(bw["host_read_gbps"], 0)
        self.assertGreater(bw["disk_gbps"], 0)
        self.assertIsInstance(bw["disk_direct"], bool)
        self.assertTrue(bw["disk_path"].startswith(MODEL), bw["disk_path"])

    def test_decode(self):
        r = ferry.bench(MODEL, **BENCH_FAST)
        self.check_fields(r)
        self.assertGreater(r["decode_tokens_per_s"], 0)
        self.assertGreater(r["prefill_tokens_per_s"], 0)
        self.assertGreater(r["latency_median_ms"], 0)
        self.assertGreaterEqual(r["latency_p90_ms"], r["latency_median_ms"])
        self.assertGreater(r["bound_tokens_per_s"], 0)
        self.assertAlmostEqual(r["fraction_of_bound"],
                               r["decode_tokens_per_s"] / r["bound_tokens_per_s"])
        self.assertGreater(r["dense_bytes_per_token"], 0)
        self.assertEqual(r["expert_bytes_per_token"], 6 * 2 * 3 * 192 * 384 * 2)  # bf16
        self.assertIs(r["offload"], False)
        self.assertEqual(r["hybrid"], "off")
        self.assertEqual(r["batch_tokens_per_s"], 0)

    def test_prefill_and_batch_modes(self):
        r = ferry.bench(MODEL, mode="prefill", **dict(BENCH_FAST, gen_len=0))
        self.assertGreater(r["prefill_tokens_per_s"], 0)
        self.assertEqual(r["decode_tokens_per_s"], 0)
        r = ferry.bench(MODEL, mode="batch", batch=2, **BENCH_FAST)
        self.check_fields(r)
        self.assertGreater(r["batch_tokens_per_s"], 0)
        self.assertGreater(r["batch_expert_loads_per_token"], 0)

    def test_offloaded(self):
        r = ferry.bench(MODEL, gpu_mem="20M", hybrid="off", **BENCH_FAST)
        self.assertIs(r["offload"], True)
        self.assertGreaterEqual(r["hit_rate"], 0)
        self.assertLessEqual(r["hit_rate"], 1)
        self.assertGreater(r["moved_bytes_per_token"], 0)
        self.assertGreater(r["decode_tokens_per_s"], 0)

    def test_errors(self):
        for kw in (dict(mode="train"), dict(prompt_len=0), dict(gen_len=0), dict(repeat=0),
                   dict(batch=0), dict(bandwidth_size="lots"), dict(policy="nope"),
                   dict(gpu_mem="12Q")):
            with self.assertRaises(ValueError, msg=str(kw)):
                ferry.bench(MODEL, **dict(BENCH_FAST, **kw))
        for kw in (dict(ctx=64), dict(temperature=0.5), dict(prompt_len="8")):
            with self.assertRaises(TypeError, msg=str(kw)):
                ferry.bench(MODEL, **dict(BENCH_FAST, **kw))
        missing = os.path.join(tempfile.gettempdir(), "no-such-model-ferry")
        with self.assertRaises(ferry.FerryError) as cm:
            ferry.bench(missing, **BENCH_FAST)
        self.assertEqual(cm.exception.status, "FERRY_ERR_IO")
        self.assertIn("config.json", cm.exception.message)
        # lengths the library refuses
        for kw in (dict(prompt_len=4000, gen_len=200), dict(repeat=5000)):
            with self.assertRaises(ferry.FerryError, msg=str(kw)) as cm:
                ferry.bench(MODEL, **dict(BENCH_FAST, **kw))
            self.assertEqual(cm.exception.status, "FERRY_ERR_INVALID")


def _kind(t):
    """A type's kind as the C program below prints it: a nested struct is its C name."""
    kinds = {ctypes.c_int32: "i32", ctypes.c_int64: "i64", ctypes.c_uint64: "u64",
             ctypes.c_float: "f32", ctypes.c_double: "f64", ctypes.c_char_p: "cstr",
             ctypes.c_char: "char", ctypes.POINTER(ctypes.c_float): "f32*"}
    kinds.update((S, cname) for cname, S in _lib.STRUCTS.items())
    return kinds.get(t, "?" + t.__name__)


def _find_cc():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


@unittest.skipIf(_find_cc() is None, "no C compiler (cc, gcc, clang) to read ferry.h's layouts")
class StructLayoutTest(unittest.TestCase):
    """Every mirrored struct: size, alignment, and each field's offset, size and type as the
    C compiler lays out include/ferry.h. The program is written from the mirrors' field
    names, so a field the header lacks fails to compile. A nested struct field's kind is its C
    type's name, and the nested struct is itself in STRUCTS, so its fields are checked too."""

    maxDiff = None

    def test_structs_match_c(self):
        structs = "".join('%s: "%s", ' % (cname, cname) for cname in _lib.STRUCTS)
        lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "ferry.h"',
                 "#define KIND(x) _Generic((x), int32_t: \"i32\", int64_t: \"i64\", "
                 "uint64_t: \"u64\", float: \"f32\", double: \"f64\", char *: \"cstr\", "
                 "const char *: \"cstr\", char: \"char\", float *: \"f32*\", " + structs +
                 "default: \"other\")",
                 "int main(void)", "{"]
        expected = []
        for cname, S in _lib.STRUCTS.items():
            lines.append('    printf("%s %%zu %%zu\\n", sizeof(%s), _Alignof(%s));'
                         % (cname, cname, cname))
            expected.append("%s %d %d" % (cname, ctypes.sizeof(S), ctypes.alignment(S)))
            for field, t in S._fields_:
                member = "((%s *)0)->%s" % (cname, field)
                if issubclass(t, ctypes.Array):
                    elem, n = "%s[0]" % member, t._length_
                    kind = _kind(t._type_)
                else:
                    elem, n = member, 1
                    kind = _kind(t)
                lines.append('    printf("%s.%s %%zu %%zu %%zu %%s\\n", offsetof(%s, %s), '
                             'sizeof(%s), sizeof(%s) / sizeof(%s), KIND(%s));'
                             % (cname, field, cname, field, member, member, elem, elem))
                f = getattr(S, field)
                expected.append("%s.%s %d %d %d %s" % (cname, field, f.offset, f.size, n, kind))
        lines += ["    return 0;", "}"]
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = os.path.join(tmp, "layout.c"), os.path.join(tmp, "layout")
            with open(src, "w") as f:
                f.write("\n".join(lines) + "\n")
            p = subprocess.run([_find_cc(), "-std=c11", "-Wall", "-I",
                                os.path.join(ROOT, "include"), src, "-o", exe],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 0, "compiling the layout program:\n" + p.stderr)
            got = subprocess.run([exe], capture_output=True, text=True, timeout=60,
                                 check=True).stdout.splitlines()
        self.assertEqual(got, expected)

    def test_nested_structs_are_mirrored(self):
        # the kinds the program above compares for nested fields, and that each is checked
        self.assertEqual(_kind(_lib.ContextParams), "ferry_context_params")
        self.assertEqual(_kind(_lib.Bandwidths), "ferry_bandwidths")
        for S in _lib.STRUCTS.values():
            for field, t in S._fields_:
                if issubclass(t, ctypes.Structure):
                    self.assertIn(t, _lib.STRUCTS.values(), "%s.%s" % (S.__name__, field))


if __name__ == "__main__":
    unittest.main(verbosity=2)
