"""tests/test_interrupt.py: long operations of the `ferry` command on a terminal and when they
are stopped.

Progress: under a pseudo-terminal (stderr a pty) pack, synth, perplexity, trace and the first
NVMe run draw one line with done/total; with stderr a pipe, or with --quiet, nothing.
Interruption: SIGINT or SIGTERM during `ferry pack`, `ferry synth` and the first NVMe run
leaves no temporary file and the command dies of the signal; a stale temporary of a dead
process is removed by the next run, a live one's is left, an old-style one is named with its
rm command; synth starts over in a folder of its own leftovers; four processes starting at
once on one fresh NVMe cache folder write the pack once and print the same text.

Run by CTest as: python3 tests/test_interrupt.py FERRY_BINARY BUILD_DIR
"""
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-moe-code")
FERRY = None
BUILD = None

# A model whose pack (~200 MB) takes long enough to stop a command while it writes.
MEDIUM = ["--preset", "tiny", "--hidden", "512", "--intermediate", "2048", "--layers", "4",
          "--experts", "8", "--heads", "8", "--kv-heads", "2"]
PROGRESS = re.compile(rb"\rferry: ([a-z ]+) +\d+% \(([0-9.]+ of [0-9.]+ [KMGT]iB|\d+ of \d+ "
                      rb"[a-z]+)\)")


def env_with(**extra):
    env = dict(os.environ)
    env.setdefault("FERRY_BACKEND", "cpu")
    env.update(extra)
    return env


def run_pipe(*args, env=None):
    p = subprocess.run([FERRY, *args], capture_output=True, timeout=300, env=env or env_with())
    return p.returncode, p.stdout, p.stderr


def run_pty(*args, env=None):
    """Runs ferry with stderr on a pseudo-terminal (stdout a pipe): (rc, stdout, stderr)."""
    master, slave = os.openpty()
    p = subprocess.Popen([FERRY, *args], stdout=subprocess.PIPE, stderr=slave,
                         stdin=subprocess.DEVNULL, env=env or env_with())
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = p.stdout.read()
    p.stdout.close()
    return p.wait(timeout=300), out, err


def temporaries(folder):
    return sorted(glob.glob(os.path.join(folder, "*.tmp")))


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


class Stopped(Exception):
    """The command finished before it could be stopped mid-write."""


def interrupt_mid_write(args, folder, sig, env=None):
    """Starts ferry ARGS, waits for a temporary in folder, stops the process (SIGSTOP), and if
    the temporary is still there sends sig and lets it go on: returns its wait status. Raises
    Stopped when the write ended first."""
    p = subprocess.Popen([FERRY, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=env or env_with())
    try:
        deadline = time.monotonic() + 120
        while not temporaries(folder):
            if p.poll() is not None:
                raise Stopped("exited with %d before writing: %s" %
                              (p.returncode, p.stderr.read().decode()))
            if time.monotonic() > deadline:
                raise AssertionError("no temporary appeared in %s" % folder)
            time.sleep(0.0005)
        os.kill(p.pid, signal.SIGSTOP)
        _, status = os.waitpid(p.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            p.returncode = os.waitstatus_to_exitcode(status)
            raise Stopped("finished before SIGSTOP")
        if not temporaries(folder):  # it renamed the file before it stopped
            os.kill(p.pid, signal.SIGCONT)
            p.wait(timeout=120)
            raise Stopped("renamed before SIGSTOP")
        os.kill(p.pid, sig)
        os.kill(p.pid, signal.SIGCONT)
        rc = p.wait(timeout=120)
        return rc, p.stderr.read().decode()
    finally:
        if p.returncode is None:
            p.kill()
            p.wait()
        p.stderr.close()


class InterruptTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp_dir = tempfile.TemporaryDirectory(dir=BUILD, prefix="interrupt-")
        cls.tmp = cls.tmp_dir.name
        cls.medium = os.path.join(cls.tmp, "medium")
        rc, _, err = run_pipe("synth", cls.medium, *MEDIUM, "--quiet")
        if rc != 0:
            raise AssertionError("synth of the medium model failed: %s" % err.decode())
        cls.text = os.path.join(cls.tmp, "in.txt")
        with open(os.path.join(ROOT, "tests", "fixtures", "heldout-python.txt")) as f, \
                open(cls.text, "w") as g:
            g.write(f.read()[:3000])

    @classmethod
    def tearDownClass(cls):
        cls.tmp_dir.cleanup()

    def scratch(self, name):
        path = os.path.join(self.tmp, name)
        os.makedirs(path)
        return path

    # ---- progress -------------------------------------------------------------------

    def assert_progress(self, err, what, unit):
        lines = [(m.group(1).strip().decode(), m.group(2).decode()) for m in PROGRESS.finditer(err)]
        self.assertTrue(any(w == what and u.endswith(unit) for w, u in lines),
                        "no '%s' line in %s units: %r" % (what, unit, err[-2000:]))
        self.assertIn(b"\r\x1b[K", err)  # the line is taken down

    def test_progress_on_a_terminal(self):
        out = os.path.join(self.tmp, "progress.pack")
        rc, _, err = run_pty("pack", self.medium, out)
        self.assertEqual(rc, 0, err)
        self.assert_progress(err, "loading the model", "layers")
        self.assert_progress(err, "packing experts", "MiB")
        done = [m for m in PROGRESS.finditer(err) if m.group(1).strip() == b"packing experts"]
        self.assertTrue(any(b" of 192.0 MiB" in m.group(0) for m in done), err)

        rc, _, err = run_pty("synth", os.path.join(self.tmp, "progress-synth"), "--preset",
                             "tiny")
        self.assertEqual(rc, 0, err)
        self.assert_progress(err, "writing the checkpoint", "MiB")
        rc, out, err = run_pty("perplexity", MODEL, "--text", self.text, "--window", "256")
        self.assertEqual(rc, 0, err)
        self.assertIn(b"perplexity:", out)
        self.assert_progress(err, "computing perplexity", "tokens")
        trace = os.path.join(self.tmp, "progress.trace")
        rc, _, err = run_pty("trace", MODEL, "--input", self.text, "--out", trace,
                             "--seq-len", "128")
        self.assertEqual(rc, 0, err)
        self.assert_progress(err, "tracing routing", "tokens")
        cache = self.scratch("progress-cache")
        rc, _, err = run_pty("run", self.medium, "-p", "x", "-n", "2", "--offload", "nvme",
                             "--gpu-mem", "64M", env=env_with(FERRY_CACHE_DIR=cache))
        self.assertEqual(rc, 0, err)
        self.assert_progress(err, "packing experts", "MiB")
        self.assertIn(b"writing the packed expert file", err)

    def test_no_progress_on_a_pipe_or_with_quiet(self):
        cache = self.scratch("quiet-cache")
        cache_env = env_with(FERRY_CACHE_DIR=cache)
        commands = [
            (["pack", self.medium, os.path.join(self.tmp, "quiet.pack")], None),
            (["synth", os.path.join(self.tmp, "quiet-synth-%d"), "--preset", "tiny"], None),
            (["perplexity", MODEL, "--text", self.text, "--window", "256"], None),
            (["trace", MODEL, "--input", self.text, "--out", os.path.join(self.tmp, "q.trace"),
              "--seq-len", "128"], None),
            (["run", self.medium, "-p", "x", "-n", "2", "--offload", "nvme", "--gpu-mem",
              "64M"], cache_env),
            (["bench", MODEL, "--prompt-len", "4", "--gen-len", "2", "--repeat", "1",
              "--bandwidth-size", "1M"], None),
        ]
        for i, (args, env) in enumerate(commands):
            for how in ("pipe", "quiet"):
                a = [x.replace("%d", how) for x in args]
                if how == "pipe":
                    rc, _, err = run_pipe(*a, env=env)
                else:
                    rc, _, err = run_pty(*a, "--quiet", env=env)
                self.assertEqual(rc, 0, (a, how, err))
                self.assertNotIn(b"\r", err.replace(b"\r\n", b"\n"), (a, how, err))
                self.assertIsNone(PROGRESS.search(err), (a, how, err))
                if args[0] == "run" and how == "pipe":  # the next one finds the pack
                    self.assertIn(b"writing the packed expert file", err)
        # every command that loads a model takes --quiet
        prompts = os.path.join(self.tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            f.write('{"prompt": "def f(x):", "max_tokens": 2}\n')
        rc, _, err = run_pty("batch", MODEL, "--prompts", prompts, "--out",
                             os.path.join(self.tmp, "out.jsonl"), "--quiet")
        self.assertEqual(rc, 0, err)
        self.assertIsNone(PROGRESS.search(err), err)

    # ---- interruption ---------------------------------------------------------------

    def interrupt(self, make_args, folder_of, sig, env_of=None):
        """Interrupts a fresh write of make_args(k) with sig (up to 5 tries, each with a
        fresh target); returns (rc, stderr, folder)."""
        for k in range(5):
            args, folder = make_args(k), folder_of(k)
            try:
                rc, err = interrupt_mid_write(args, folder, sig, env_of(k) if env_of else None)
                return rc, err, folder
            except Stopped:
                continue
        self.fail("%s finished each time before it could be stopped" % make_args(0))

    def test_signal_during_pack_leaves_no_temporary(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            folder = self.scratch("pack-%d" % sig)
            rc, err, _ = self.interrupt(
                lambda k: ["pack", self.medium, os.path.join(folder, "m%d.pack" % k)],
                lambda k: folder, sig)
            self.assertEqual(rc, -sig, err)
            self.assertEqual(temporaries(folder), [])
            self.assertEqual(glob.glob(os.path.join(folder, "*.pack")), [])

    def test_signal_during_synth_leaves_no_temporary(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            base = self.scratch("synth-%d" % sig)
            rc, err, folder = self.interrupt(
                lambda k: ["synth", os.path.join(base, "m%d" % k), *MEDIUM],
                lambda k: os.path.join(base, "m%d" % k), sig)
            self.assertEqual(rc, -sig, err)
            self.assertEqual(os.listdir(folder), [])
            # the folder it leaves is empty: a new run writes into it
            rc, _, err = run_pipe("synth", folder, "--preset", "tiny")
            self.assertEqual(rc, 0, err)

    def test_signal_during_first_nvme_run_leaves_no_temporary(self):
        base = self.scratch("nvme-signal")
        caches = [os.path.join(base, "cache%d" % k) for k in range(5)]
        rc, err, cache = self.interrupt(
            lambda k: ["run", self.medium, "-p", "x", "-n", "2", "--offload", "nvme",
                       "--gpu-mem", "64M"],
            lambda k: caches[k], signal.SIGINT,
            lambda k: env_with(FERRY_CACHE_DIR=caches[k]))
        self.assertEqual(rc, -signal.SIGINT, err)
        self.assertEqual(temporaries(cache), [])
        self.assertEqual(glob.glob(os.path.join(cache, "*.pack")), [])

    def test_stale_temporaries(self):
        folder = self.scratch("stale")
        out = os.path.join(folder, "m.pack")
        dead = "%s.%d.tmp" % (out, dead_pid())
        live = "%s.%d.tmp" % (out, os.getpid())
        old = out + ".tmp"
        for path in (dead, live, old):
            with open(path, "wb") as f:
                f.write(b"partial")
        rc, _, err = run_pipe("pack", MODEL, out)
        err = err.decode()
        self.assertEqual(rc, 0, err)
        self.assertFalse(os.path.exists(dead))
        self.assertIn("removed %s, a temporary file left by process" % dead, err)
        self.assertTrue(os.path.exists(live), "a running writer's temporary was removed")
        self.assertTrue(os.path.exists(old))
        self.assertIn("rm -f '%s'" % old, err)
        self.assertTrue(os.path.getsize(out) > 0)
        # the same for files written through core/fileio (a routing trace)
        trace = os.path.join(folder, "t.trace")
        stale = "%s.%d.tmp" % (trace, dead_pid())
        with open(stale, "wb") as f:
            f.write(b"partial")
        rc, _, err = run_pipe("trace", MODEL, "--input", self.text, "--out", trace,
                              "--seq-len", "128")
        self.assertEqual(rc, 0, err)
        self.assertFalse(os.path.exists(stale))
        self.assertEqual(sorted(temporaries(folder)), sorted([live, old]))

    def test_synth_starts_over_in_its_leftovers(self):
        folder = self.scratch("leftovers")
        pid = dead_pid()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            with open(os.path.join(folder, "%s.%d.tmp" % (name, pid)), "wb") as f:
                f.write(b"partial")
        rc, _, err = run_pipe("synth", folder, "--preset", "tiny")
        self.assertEqual(rc, 0, err)
        self.assertIn(b"starting over", err)
        self.assertEqual(temporaries(folder), [])
        self.assertTrue(os.path.exists(os.path.join(folder, "model.safetensors")))

        # a running writer's folder, an older ferry's temporary, another file: refused
        for name, msg in (("model.safetensors.%d.tmp" % os.getpid(), "is being written by "
                           "process %d" % os.getpid()),
                          ("model.safetensors.tmp", "rm -f '"),
                          ("notes.txt", "is not empty (it holds notes.txt)")):
            other = self.scratch("leftovers-%s" % name)
            with open(os.path.join(other, name), "wb") as f:
                f.write(b"x")
            rc, _, err = run_pipe("synth", other, "--preset", "tiny")
            self.assertEqual(rc, 2, err)
            self.assertIn(msg, err.decode())
            self.assertEqual(os.listdir(other), [name])

    def test_four_processes_share_one_nvme_pack(self):
        cache = self.scratch("shared-cache")
        env = env_with(FERRY_CACHE_DIR=cache)
        args = [FERRY, "run", self.medium, "-p", "def f(x):", "-n", "6", "--ignore-eos",
                "--offload", "nvme", "--gpu-mem", "64M", "--threads", "1"]
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, env=env) for _ in range(4)]
        results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read().decode())
                   for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        for rc, _, err in results:
            self.assertEqual(rc, 0, err)
        self.assertEqual(len({out for _, out, _ in results}), 1, results)
        writers = [err for _, _, err in results if "no --pack given: writing" in err]
        self.assertEqual(len(writers), 1, [err for _, _, err in results])
        self.assertEqual(temporaries(cache), [])
        self.assertEqual(len(glob.glob(os.path.join(cache, "*.pack"))), 1)
        # and the pack is used as it is from then on
        rc, out, err = run_pipe(*args[1:], env=env)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, results[0][1])
        self.assertNotIn(b"writing the packed expert file", err)


if __name__ == "__main__":
    FERRY = os.path.abspath(sys.argv.pop(1))
    BUILD = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
