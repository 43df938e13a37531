"""tests/test_cli.py: the `ferry` command end to end, against the bundled model and the
Hugging Face reference outputs: streamed text, --json, --logits, --stats, sampling
options, and the errors for bad options and bad model directories.

Run by CTest as: python3 tests/test_cli.py FERRY_BINARY
"""
import json
import math
import re
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-moe-code")
REF = os.path.join(ROOT, "tests", "fixtures", "tiny-moe-code.ref.json")
FERRY = None


def ferry(*args, check=True):
    p = subprocess.run([FERRY, *args], capture_output=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError("ferry %s failed (%d): %s" % (args, p.returncode, p.stderr.decode()))
    return p


def short_heldout(tmp):
    """The first 3000 characters of the held-out text, as a file in tmp."""
    text = os.path.join(tmp, "in.txt")
    with open(os.path.join(ROOT, "tests", "fixtures", "heldout-python.txt")) as f, \
            open(text, "w") as g:
        g.write(f.read()[:3000])
    return text


def perplexity_everywhere(test, *args):
    """`ferry perplexity MODEL --window 256 ARGS` resident, offloaded and with cpu-experts:
    asserts the three print the same perplexity (lossless) and returns it."""
    base = ["perplexity", MODEL, "--window", "256", *args]
    runs = [ferry(*base, *extra).stdout.decode()
            for extra in ([], ["--gpu-mem", "20M", "--hybrid", "off"],
                          ["--hybrid", "cpu-experts"])]
    test.assertEqual(len({r.split(", ")[0] for r in runs}), 1, runs)
    return float(re.search(r"perplexity: ([0-9.]+)", runs[0]).group(1))


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(REF) as f:
            cls.ref = json.load(f)["cases"]

    def test_run_streams_reference_greedy_text(self):
        case = self.ref[0]
        p = ferry("run", MODEL, "-p", case["prompt"], "-n", "32", "--ignore-eos",
                  "--threads", "2")
        self.assertEqual(p.stdout.decode(), case["greedy_text"] + "\n")

    def test_json_has_ids_text_and_stats(self):
        case = self.ref[1]
        p = ferry("run", MODEL, "-p", case["prompt"], "-n", "32", "--ignore-eos", "--json")
        out = json.loads(p.stdout)
        self.assertEqual(out["prompt_ids"], case["ids"])
        self.assertEqual(out["ids"], case["greedy_ids"])
        self.assertEqual(case["prompt"] + out["text"], case["greedy_text"])
        self.assertEqual(out["stats"]["prompt_tokens"], len(case["ids"]))
        self.assertEqual(out["stats"]["decode_tokens"], 31)
        self.assertGreater(out["stats"]["decode_tokens_per_s"], 0)
        self.assertEqual(out["finish_reason"], "length")
        self.assertIn(out["backend"], ("cpu", "cuda"))
        self.assertNotIn("offload", out)

    def test_json_carries_everything_stats_prints(self):
        p = ferry("run", MODEL, "-p", "def f(x):", "-n", "12", "--ctx", "256", "--gpu-mem", "8M",
                  "--slots", "4", "--hybrid", "auto", "--backend", "cpu", "--json", "--stats")
        out, err = json.loads(p.stdout), p.stderr.decode()
        self.assertEqual(out["backend"], "cpu")
        self.assertIn("backend: cpu (%s)" % out["device"], err)
        self.assertIn("finish: %s" % out["finish_reason"], err)
        self.assertIn(out["finish_reason"], ("eos", "length"))
        o = out["offload"]
        plan = o["memory_plan"]
        self.assertIn("memory plan: budget %.1f MiB" % (plan["budget_bytes"] / 2**20), err)
        self.assertIn("+ %d expert slots x" % plan["n_slots"], err)
        x = o["experts"]
        self.assertEqual(x["uses"], x["hits"] + x["misses"] + x["cpu_experts"])
        self.assertIn("%d uses: %d in a slot, %d fetched, %d on the CPU; hit rate %.1f%%"
                      % (x["uses"], x["hits"], x["misses"], x["cpu_experts"],
                         100 * x["hit_rate"]), err)
        self.assertEqual(o["hybrid"]["mode"], "auto")
        self.assertIn("hybrid auto: %d experts computed" % o["hybrid"]["cpu_experts"], err)
        self.assertIn("prefetch: %d issued, %d used, %d wasted"
                      % (o["prefetch"]["issued"], o["prefetch"]["used"],
                         o["prefetch"]["wasted"]), err)
        for la in o["predictor"]["lookahead"]:
            self.assertIn("lookahead %d: precision@2 %.3f recall@2 %.3f (%d)"
                          % (la["distance"], la["precision"], la["recall"], la["predictions"]),
                          err)
        rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/(\d+)/(\d+)\s+(\d+)",
                          err, re.M)
        self.assertEqual(len(rows), len(o["layers"]))
        for row, la in zip(rows, o["layers"]):
            self.assertEqual([int(v) for v in row],
                             [la[k] for k in ("layer", "hits", "fetched", "on_cpu",
                                              "prefetch_issued", "prefetch_used",
                                              "prefetch_wasted", "evictions")])

    def test_logits_file_matches_reference(self):
        case = self.ref[2]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "logits.f32")
            ferry("run", MODEL, "-p", case["prompt"], "-n", "1", "--logits", path)
            with open(path, "rb") as f:
                data = f.read()
        ref = case["last_logits"]
        self.assertEqual(len(data), 4 * len(ref))
        got = struct.unpack("<%df" % len(ref), data)
        num = sum((a - b) ** 2 for a, b in zip(got, ref))
        den = sum(b * b for b in ref)
        self.assertLess(math.sqrt(num / den), 1e-4)

    def test_stats_go_to_stderr(self):
        p = ferry("run", MODEL, "-p", "def fibonacci(n):", "-n", "8", "--stats")
        err = p.stderr.decode()
        self.assertRegex(err, r"prefill: \d+ tokens in [0-9.]+ s \([0-9.]+ tokens/s\)")
        self.assertRegex(err, r"decode:  7 tokens in [0-9.]+ s \([0-9.]+ tokens/s\)")
        self.assertNotIn("tokens/s", p.stdout.decode())

    def test_sampling_is_reproducible_by_seed(self):
        args = ["run", MODEL, "-p", "import os\n", "-n", "24", "--temp", "0.9", "--top-k", "50",
                "--top-p", "0.95", "--json", "--ignore-eos"]
        a = json.loads(ferry(*args, "--seed", "7").stdout)["ids"]
        b = json.loads(ferry(*args, "--seed", "7").stdout)["ids"]
        c = json.loads(ferry(*args, "--seed", "8").stdout)["ids"]
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_prompt_from_file(self):
        case = self.ref[3]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "prompt.txt")
            with open(path, "w") as f:
                f.write(case["prompt"])
            out = json.loads(ferry("run", MODEL, "-f", path, "-n", "4", "--json").stdout)
        self.assertEqual(out["prompt_ids"], case["ids"])
        self.assertEqual(out["ids"], case["greedy_ids"][:4])

    def test_context_too_small_is_an_error(self):
        p = ferry("run", MODEL, "-p", "def fibonacci(n):", "-n", "64", "--ctx", "16", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("context holds 16", p.stderr.decode())
        self.assertEqual(p.stdout, b"")  # the prompt is not echoed first

    def test_invalid_utf8_is_one_error_everywhere(self):
        with tempfile.TemporaryDirectory() as tmp:
            bad = os.path.join(tmp, "bad.txt")
            with open(bad, "wb") as f:
                f.write(b"def f(x):\n    return x\xff\xfe + 1\n")
            prompts = os.path.join(tmp, "p.jsonl")
            with open(prompts, "wb") as f:
                f.write(b'{"prompt": "ok"}\n{"prompt": "\xc3"}\n')
            for args in (["run", MODEL, "-f", bad], ["perplexity", MODEL, "--text", bad],
                         ["trace", MODEL, "--input", bad, "--out", os.path.join(tmp, "t")],
                         ["batch", MODEL, "--prompts", prompts, "--out",
                          os.path.join(tmp, "o.jsonl")]):
                p = ferry(*args, check=False)
                self.assertNotEqual(p.returncode, 0, args)
                self.assertIn("is not UTF-8 text", p.stderr.decode(), args)
                self.assertEqual(p.stdout, b"", args)

    def test_batch_refuses_fields_it_does_not_honour(self):
        with tempfile.TemporaryDirectory() as tmp:
            prompts = os.path.join(tmp, "p.jsonl")
            with open(prompts, "w") as f:
                f.write('{"prompt": "def f():", "max_tokens": 4}\n'
                        '{"prompt": "x", "temperature": 0.7}\n')
            p = ferry("batch", MODEL, "--prompts", prompts, "--out", os.path.join(tmp, "o"),
                      check=False)
            self.assertIn(p.returncode, (1, 2))
            self.assertIn("line 2: the field 'temperature' is not supported", p.stderr.decode())

    def test_batch_out_stdout_and_rescue(self):
        with tempfile.TemporaryDirectory() as tmp:
            prompts = os.path.join(tmp, "p.jsonl")
            with open(prompts, "w") as f:
                f.write('{"prompt": "def f():", "max_tokens": 4}\n'
                        '{"prompt": "import os", "max_tokens": 3, "id": "b"}\n')
            out = os.path.join(tmp, "o.jsonl")
            ferry("batch", MODEL, "--prompts", prompts, "--out", out)
            with open(out) as f:
                want = f.read()
            p = ferry("batch", MODEL, "--prompts", prompts, "--out", "-")
            self.assertEqual(p.stdout.decode(), want)
            self.assertEqual(len(want.splitlines()), 2)
            # an output path that cannot be written fails before any work ...
            p = ferry("batch", MODEL, "--prompts", prompts, "--out",
                      os.path.join(tmp, "no", "such", "dir.jsonl"), check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("cannot write", p.stderr.decode())
            self.assertNotIn("backend:", p.stderr.decode())
            # ... and one that fails at the end (a folder is in the way of the rename) leaves
            # the results in $TMPDIR, named, and no temporary behind
            blocked = os.path.join(tmp, "blocked")
            os.makedirs(os.path.join(blocked, "x"))
            rescue_dir = os.path.join(tmp, "rescue")
            os.mkdir(rescue_dir)
            env = dict(os.environ, TMPDIR=rescue_dir)
            p = subprocess.run([FERRY, "batch", MODEL, "--prompts", prompts, "--out", blocked],
                               capture_output=True, timeout=300, env=env)
            self.assertEqual(p.returncode, 1)
            m = re.search(r"the results are in (\S+) instead", p.stderr.decode())
            self.assertIsNotNone(m, p.stderr.decode())
            with open(m.group(1)) as f:
                self.assertEqual(f.read(), want)
            self.assertEqual(sorted(os.listdir(tmp)),
                             ["blocked", "o.jsonl", "p.jsonl", "rescue"])

    def test_offloaded_runs_print_the_same_text(self):
        args = ["run", MODEL, "-p", "def fibonacci(n):", "-n", "40", "--ctx", "256"]
        want = ferry(*args).stdout
        with tempfile.TemporaryDirectory() as tmp:
            pack = os.path.join(tmp, "tiny.pack")
            p = ferry("pack", MODEL, pack)
            self.assertEqual(p.stdout, b"")
            self.assertGreater(os.path.getsize(pack), 20 * 1024 * 1024)
            for extra in (["--gpu-mem", "8M"],
                          ["--gpu-mem", "8M", "--prefetch", "off", "--policy", "lfu"],
                          ["--gpu-mem", "12M", "--policy", "layer-lru"],
                          ["--gpu-mem", "8M", "--offload", "nvme", "--pack", pack,
                           "--host-cache", "4M", "--reader", "pread"],
                          ["--gpu-mem", "64M", "--offload", "nvme", "--pack", pack]):
                p = ferry(*args, *extra, "--stats")
                self.assertEqual(p.stdout, want, extra)
                err = p.stderr.decode()
                self.assertRegex(err, r"memory plan: budget [0-9.]+ MiB = dense [0-9.]+ MiB", extra)
                self.assertRegex(err, r"hit rate [0-9.]+%, [0-9.]+ MiB moved to the device", extra)
                self.assertRegex(err, r"prefetch: \d+ issued, \d+ used, \d+ wasted", extra)
                if "nvme" in extra:
                    self.assertRegex(err, r"nvme tier \((io_uring|pread)\)")
                    self.assertNotIn(" 0.0 MiB read from disk", err)

    def test_quantized_packs(self):
        with tempfile.TemporaryDirectory() as tmp:
            text = short_heldout(tmp)
            sizes, ppl = {}, {}
            for quant in (None, "q8", "q4"):
                pack = os.path.join(tmp, "%s.pack" % quant)
                p = ferry("pack", MODEL, pack, *(["--quant", quant] if quant else []))
                self.assertEqual(p.stdout, b"")
                sizes[quant] = os.path.getsize(pack)
                ppl[quant] = perplexity_everywhere(self, "--text", text, "--pack", pack)
                out = ferry("run", MODEL, "-p", "def fibonacci(n):", "-n", "24", "--pack", pack)
                self.assertGreater(len(out.stdout), 20)
            # 5 and 8.5 bits per weight against 16
            self.assertLess(sizes["q4"], 0.36 * sizes[None])
            self.assertLess(sizes["q8"], 0.56 * sizes[None])
            plain = ferry("perplexity", MODEL, "--text", text, "--window", "256").stdout.decode()
            self.assertEqual(ppl[None], float(re.search(r"perplexity: ([0-9.]+)", plain).group(1)))
            self.assertLess(abs(ppl["q8"] / ppl[None] - 1), 0.002)
            self.assertLess(abs(ppl["q4"] / ppl[None] - 1), 0.03)
            for args, msg in [(["--quant", "q3"], "--quant takes q8 or q4"),
                              (["--quant"], "--quant takes q8 or q4"),
                              (["--bogus"], "unknown option '--bogus'")]:
                p = ferry("pack", MODEL, os.path.join(tmp, "x.pack"), *args, check=False)
                self.assertEqual(p.returncode, 2, args)
                self.assertIn(msg, p.stderr.decode(), args)
            self.assertFalse(os.path.exists(os.path.join(tmp, "x.pack")))
            p = ferry("run", MODEL, "-p", "x", "--pack", os.path.join(tmp, "none.pack"),
                      check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("none.pack", p.stderr.decode())

    def test_quantized_dense_weights(self):
        with tempfile.TemporaryDirectory() as tmp:
            text = short_heldout(tmp)
            ppl = {q: perplexity_everywhere(self, "--text", text, "--quant-dense", q)
                   for q in ("as-stored", "q8", "q4")}
            plain = ferry("perplexity", MODEL, "--text", text, "--window", "256").stdout.decode()
            self.assertEqual(ppl["as-stored"],
                             float(re.search(r"perplexity: ([0-9.]+)", plain).group(1)))
            self.assertNotEqual(ppl["q8"], ppl["as-stored"])
            self.assertLess(abs(ppl["q8"] / ppl["as-stored"] - 1), 0.005)
            self.assertLess(abs(ppl["q4"] / ppl["as-stored"] - 1), 0.05)
            out = ferry("run", MODEL, "-p", "def fibonacci(n):", "-n", "24", "--quant-dense", "q4")
            self.assertGreater(len(out.stdout), 20)
            p = ferry("run", MODEL, "-p", "x", "--quant-dense", "q2", check=False)
            self.assertEqual(p.returncode, 2)
            self.assertIn("--quant-dense", p.stderr.decode())
            self.assertIn("as-stored, q8 or q4", p.stderr.decode())
            # rows that are not whole groups of 32 cannot be quantized: the tensor is named
            odd = os.path.join(tmp, "odd")
            ferry("synth", odd, "--preset", "tiny", "--tokenizer", MODEL, "--hidden", "48",
                  "--intermediate", "64", "--layers", "1")
            p = ferry("run", odd, "-p", "x", "-n", "2", "--quant-dense", "q4", check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("tensor 'lm_head.weight' has 48 columns, not a multiple of 32",
                          p.stderr.decode())
            ferry("run", odd, "-p", "x", "-n", "2")  # as stored it runs

    def test_hybrid_modes_print_the_same_text(self):
        args = ["run", MODEL, "-p", "def fibonacci(n):", "-n", "40", "--ctx", "256"]
        want = ferry(*args).stdout
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
        kernels = ["reference"] + [k for k in ("avx2", "avx512") if k in flags or
                                   (k == "avx512" and "avx512f" in flags)]
        for extra in (["--hybrid", "cpu-experts"],
                      ["--hybrid", "cpu-experts", "--gpu-mem", "8M"],
                      ["--gpu-mem", "8M", "--slots", "4", "--hybrid", "auto"],
                      ["--gpu-mem", "8M", "--slots", "4", "--hybrid", "off"],
                      *[["--cpu-kernels", k, "--hybrid", "cpu-experts"] for k in kernels]):
            p = ferry(*args, *extra, "--stats")
            self.assertEqual(p.stdout, want, extra)
            err = p.stderr.decode()
            if "cpu-experts" in extra:
                self.assertRegex(err, r"hybrid cpu-experts: every expert on the CPU: [1-9]\d* "
                                      r"expert runs over \d+ token rows", extra)
            elif "auto" in extra:
                self.assertRegex(err, r"hybrid auto: \d+ experts computed on the CPU .*cost "
                                      r"model: fetch [0-9.]+ GB/s, CPU [0-9.]+ GB/s", extra)
                self.assertIn("layer   hits fetched on-cpu", err)
            if "--gpu-mem" in extra and "cpu-experts" not in extra:
                # one hit rate: experts computed on the CPU count as uses, not as hits
                m = re.search(r"(\d+) uses: (\d+) in a slot, (\d+) fetched, (\d+) on the CPU; "
                              r"hit rate ([0-9.]+)%", err)
                self.assertIsNotNone(m, err)
                uses, hits, fetched, cpu = (int(m.group(i)) for i in range(1, 5))
                self.assertEqual(uses, hits + fetched + cpu)
                cpu_runs = re.search(r"hybrid auto: (\d+) experts computed", err)
                self.assertEqual(cpu, int(cpu_runs.group(1)) if cpu_runs else 0)
                self.assertAlmostEqual(float(m.group(5)), 100 * hits / uses, delta=0.05)
            if "auto" not in extra:
                self.assertNotIn("hybrid auto", err)
        for extra, msg in [(["--hybrid", "sometimes"], "--hybrid expects auto, off or cpu-experts"),
                           (["--cpu-kernels", "sse"], "--cpu-kernels expects auto, reference"),
                           (["--hybrid"], "--hybrid needs a value")]:
            p = ferry(*args, *extra, check=False)
            self.assertEqual(p.returncode, 2, extra)
            self.assertIn(msg, p.stderr.decode(), extra)
        p = ferry(*args, "--hybrid", "cpu-experts", "--gpu-mem", "8M", "--offload", "nvme",
                  check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("does not combine with --offload nvme", p.stderr.decode())
        with tempfile.TemporaryDirectory() as tmp:
            prompts, out = os.path.join(tmp, "p.jsonl"), os.path.join(tmp, "o.jsonl")
            with open(prompts, "w") as f:
                f.write('{"prompt": "def fibonacci(n):"}\n{"prompt": "import os"}\n')
            p = ferry("batch", MODEL, "--prompts", prompts, "--out", out, "-n", "8",
                      "--hybrid", "cpu-experts")
            self.assertRegex(p.stderr.decode(), r"; [1-9]\d* expert runs on the CPU \(--hybrid\)")
            path = os.path.join(tmp, "bench.json")
            p = ferry("bench", MODEL, "--backend", "cpu", "--hybrid", "cpu-experts",
                      "--prompt-len", "8", "--gen-len", "4", "--repeat", "1",
                      "--bandwidth-size", "8M", "--json", path)
            out = p.stdout.decode()
            self.assertRegex(out, r"host memory read by all cores [0-9.]+ GB/s")
            self.assertRegex(out, r"hybrid cpu-experts: [0-9.]+ experts \([0-9.]+ MiB of weights\) "
                                  r"computed on the CPU per token")
            self.assertRegex(out, r"bound: [0-9.]+ tokens/s from the bandwidths above \(CPU memory")
            with open(path) as f:
                r = json.load(f)
            self.assertGreaterEqual(r["cpu_experts_per_token"], 12)  # 6 layers x top-2
            self.assertGreater(r["host_read_gbps"], 0)

    def test_perplexity(self):
        heldout = os.path.join(ROOT, "tests", "fixtures", "heldout-python.txt")
        with tempfile.TemporaryDirectory() as tmp:
            text = os.path.join(tmp, "in.txt")
            with open(heldout) as f, open(text, "w") as g:
                g.write(f.read()[:3000])
            runs = [ferry("perplexity", MODEL, "--text", text, "--window", "256", *extra)
                    for extra in ([], ["--gpu-mem", "20M", "--hybrid", "off"],
                                  ["--hybrid", "cpu-experts"])]
            pat = (r"perplexity: ([0-9.]+) \(mean NLL ([0-9.]+) nats\) over (\d+) tokens in "
                   r"(\d+) windows of 256")
            got = [re.search(pat, p.stdout.decode()) for p in runs]
            for g in got:
                self.assertIsNotNone(g)
            self.assertEqual(len({g.group(1, 2, 3) for g in got}), 1)  # the same figure
            self.assertGreater(float(got[0].group(1)), 1)
            for args, msg in [(["--text", text, "--window", "1"], "--window expects"),
                              (["--window", "64"], "usage: ferry perplexity"),
                              (["--text"], "--text needs a value"),
                              (["--text", text, "--bogus"], "unknown option --bogus")]:
                p = ferry("perplexity", MODEL, *args, check=False)
                self.assertEqual(p.returncode, 2, args)
                self.assertIn(msg, p.stderr.decode(), args)
            p = ferry("perplexity", MODEL, "--text", os.path.join(tmp, "none.txt"), check=False)
            self.assertEqual(p.returncode, 1)
            p = ferry("perplexity", MODEL, "--text", text, "--window", "5000", check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("window of 5000 tokens", p.stderr.decode())

    def test_offload_errors(self):
        p = ferry("run", MODEL, "-p", "x", "--gpu-mem", "6M", "--ctx", "256", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("--gpu-mem 6.0 MiB is too small for a context of 256 tokens", p.stderr.decode())
        with tempfile.TemporaryDirectory() as tmp:
            bad = os.path.join(tmp, "bad.pack")
            with open(bad, "wb") as f:
                f.write(b"FERRYPK1" + bytes(5000))
            p = ferry("run", MODEL, "-p", "x", "--gpu-mem", "8M", "--offload", "nvme",
                      "--pack", bad, "--ctx", "256", check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("bad.pack", p.stderr.decode())
        for args, msg in [
            (["--gpu-mem", "lots"], "--gpu-mem expects a size"),
            (["--gpu-mem", "0"], "--gpu-mem expects a size"),
            (["--offload", "tape"], "--offload expects ram or nvme"),
            (["--policy", "random"], "--policy expects lru, lfu, layer-lru or predicted"),
            (["--prefetch", "maybe"], "--prefetch expects on or off"),
            (["--offload", "nvme"], "needs a device budget"),
            (["--predictor", "psychic"], "--predictor expects recency, gate, stats or combined"),
            (["--lookahead", "4"], "--lookahead expects an integer in [1, 3]"),
            (["--slots", "0"], "--slots expects an integer"),
        ]:
            p = ferry("run", MODEL, "-p", "x", *args, check=False)
            self.assertEqual(p.returncode, 2, args)
            self.assertIn(msg, p.stderr.decode(), args)
        p = ferry("pack", MODEL, check=False)
        self.assertEqual(p.returncode, 2)
        with tempfile.TemporaryDirectory() as tmp:
            p = ferry("pack", os.path.join(tmp, "none"), os.path.join(tmp, "x.pack"), check=False)
            self.assertEqual(p.returncode, 1)
            self.assertFalse(os.path.exists(os.path.join(tmp, "x.pack")))

    def test_trace_fit_and_eval(self):
        heldout = os.path.join(ROOT, "tests", "fixtures", "heldout-python.txt")
        with tempfile.TemporaryDirectory() as tmp:
            text = os.path.join(tmp, "in.txt")
            with open(heldout) as f, open(text, "w") as g:
                g.write(f.read()[:6000])
            trace = os.path.join(tmp, "t.trace")
            p = ferry("trace", MODEL, "--input", text, "--out", trace, "--seq-len", "256",
                      "--probs")
            self.assertRegex(p.stderr.decode(), r"\d+ tokens routed")
            with open(trace, "rb") as f:
                header = json.loads(f.readline())
                body = f.read()
            self.assertEqual(header["format"], "moe-routing-trace v1")
            self.assertEqual((header["layers"], header["experts"], header["top_k"]), (6, 8, 2))
            n = header["tokens"]
            self.assertEqual(sum(header["sequence_lengths"]), n)
            self.assertTrue(all(x <= 256 for x in header["sequence_lengths"]))
            self.assertEqual(len(body), n * 6 * 2 + n * 6 * 8 * 4)
            # the trace through stdin and stdout: the same bytes, no temporary left
            with open(text, "rb") as f:
                piped = subprocess.run([FERRY, "trace", MODEL, "--input", "-", "--out", "-",
                                        "--seq-len", "256", "--probs"], stdin=f,
                                       capture_output=True, timeout=300,
                                       env=dict(os.environ, TMPDIR=tmp))
            self.assertEqual(piped.returncode, 0, piped.stderr.decode())
            with open(trace, "rb") as f:
                self.assertEqual(piped.stdout, f.read())
            self.assertIn("written to stdout", piped.stderr.decode())
            stats = os.path.join(tmp, "r.stats")
            ferry("predictor", "fit", trace, "--out", stats)
            fitted = subprocess.run([FERRY, "predictor", "fit", trace, "--out", "-"],
                                    capture_output=True, timeout=300,
                                    env=dict(os.environ, TMPDIR=tmp))
            self.assertEqual(fitted.returncode, 0, fitted.stderr.decode())
            with open(stats, "rb") as f:
                self.assertEqual(fitted.stdout, f.read())
            self.assertEqual(sorted(os.listdir(tmp)), ["in.txt", "r.stats", "t.trace"])
            out = ferry("predictor", "eval", "--trace", trace, "--predictor", "stats",
                        "--predictor-stats", stats).stdout.decode()
            for d in (1, 2, 3):
                self.assertRegex(out, r"lookahead %d: precision@2 0\.\d{3} recall@2 0\.\d{3}" % d)
            out = ferry("predictor", "eval", MODEL, "--text", text).stdout.decode()
            recall1 = float(re.search(r"lookahead 1: precision@2 [0-9.]+ recall@2 ([0-9.]+)",
                                      out).group(1))
            self.assertGreater(recall1, 0.8)
            # the cache replays: 12 of 48 experts, alone and with the gate's prefetches
            self.assertIn("cache of 12 of 48 experts, lru:", out)
            alone = float(re.search(r"without prefetch: hit rate ([0-9.]+)%", out).group(1))
            pref = float(re.search(r"prefetch, lookahead 1, lru: hit rate ([0-9.]+)%",
                                   out).group(1))
            belady = float(re.search(r"Belady .*hit rate ([0-9.]+)%", out).group(1))
            self.assertGreater(pref, alone + 15)
            self.assertGreaterEqual(belady, alone)

            # ferry sim: the cache alone never beats Belady; the stats predictor's prefetches
            # raise the hit rate; bytes follow --expert-bytes
            out = ferry("sim", trace, "--slots", "12").stdout.decode()
            alone = float(re.search(r"sim: hit rate ([0-9.]+)%", out).group(1))
            belady = float(re.search(r"Belady .*hit rate ([0-9.]+)%", out).group(1))
            self.assertLessEqual(alone, belady)
            out = ferry("sim", trace, "--slots", "12", "--predictor", "stats",
                        "--predictor-stats", stats, "--expert-bytes", "1M").stdout.decode()
            m = re.search(r"sim: hit rate ([0-9.]+)% \((\d+) of (\d+) lookups\), (\d+) experts "
                          r"moved \(([0-9.]+) MiB\), prefetches (\d+) issued", out)
            self.assertIsNotNone(m, out)
            self.assertGreater(float(m.group(1)), alone)
            self.assertEqual(int(m.group(3)), n * 6 * 2)
            self.assertAlmostEqual(float(m.group(1)), 100 * int(m.group(2)) / int(m.group(3)),
                                   delta=0.05)
            self.assertAlmostEqual(float(m.group(5)), int(m.group(4)), delta=0.1)
            for bad, msg in ((["--slots", "0"], "--slots"), ([], "usage"),
                             (["--slots", "4", "--predictor", "gate"], "no hidden states"),
                             (["--slots", "4", "--predictor", "stats"], "--predictor-stats"),
                             (["--slots", "4", "--policy", "predicted"], "needs --predictor")):
                p = ferry("sim", trace, *bad, check=False)
                self.assertEqual(p.returncode, 2, bad)
                self.assertIn(msg, p.stderr.decode())
            p = ferry("sim", trace, "--slots", "49", check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("48 experts in all", p.stderr.decode())
            p = ferry("predictor", "eval", "--trace", trace, "--predictor", "gate", check=False)
            self.assertEqual(p.returncode, 2)
            self.assertIn("no hidden states", p.stderr.decode())
            p = ferry("predictor", "fit", os.path.join(tmp, "none.trace"), "--out", stats,
                      check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("none.trace", p.stderr.decode())

    def test_batch_matches_run_and_reorders(self):
        prompts = os.path.join(ROOT, "tests", "fixtures", "batch-prompts.jsonl")
        with open(prompts) as f:
            lines = [json.loads(l) for l in f if l.strip()]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.jsonl")
            p = ferry("batch", MODEL, "--prompts", prompts, "--out", out, "-n", "16",
                      "--max-batch", "8", "--chunk", "16", "--compare")
            err = p.stderr.decode()
            m = re.search(r"reordering: (\d+) expert loads instead of (\d+) .*outputs identical",
                          err)
            self.assertIsNotNone(m, err)
            self.assertLess(int(m.group(1)), int(m.group(2)))
            self.assertRegex(err, r"expert loads per layer:( \d+){6}")
            with open(out) as f:
                got = [json.loads(l) for l in f]
            self.assertEqual(len(got), len(lines))
            for want, g in zip(lines, got):
                self.assertEqual(g["id"], want["id"])
                self.assertEqual(g["prompt"], want["prompt"])
                self.assertEqual(g["tokens"], want.get("max_tokens", 16) if g["finish"] ==
                                 "length" else g["tokens"])
            # the text is what ferry run prints for the same prompt
            for i in (0, 7, 31):
                n = str(lines[i].get("max_tokens", 16))
                run = ferry("run", MODEL, "-p", lines[i]["prompt"], "-n", n).stdout.decode()
                self.assertEqual(lines[i]["prompt"] + got[i]["text"] + "\n", run)
            # offloaded, arrival order: the same file
            out2 = os.path.join(tmp, "out2.jsonl")
            p = ferry("batch", MODEL, "--prompts", prompts, "--out", out2, "-n", "16",
                      "--max-batch", "8", "--chunk", "16", "--reorder", "off", "--gpu-mem",
                      "64M", "--slots", "4", "--hybrid", "off")
            self.assertRegex(p.stderr.decode(), r"expert cache: hit rate \d+\.\d%")
            with open(out) as f, open(out2) as g:
                self.assertEqual(f.read(), g.read())
            # bad input: a malformed line names the file and line; nothing is written
            bad = os.path.join(tmp, "bad.jsonl")
            with open(bad, "w") as f:
                f.write('{"prompt": "a"}\n{"prompt": 3}\n')
            out3 = os.path.join(tmp, "out3.jsonl")
            p = ferry("batch", MODEL, "--prompts", bad, "--out", out3, check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("bad.jsonl line 2", p.stderr.decode())
            self.assertFalse(os.path.exists(out3))
            for args in (["--max-batch", "0"], ["--reorder", "maybe"], ["--prompts"]):
                p = ferry("batch", MODEL, "--out", out3, *args, check=False)
                self.assertEqual(p.returncode, 2, args)

    def test_run_with_predictors_prints_the_same_text(self):
        args = ["run", MODEL, "-p", "class Stack:\n", "-n", "48", "--ctx", "256"]
        want = ferry(*args).stdout
        for extra in (["--predictor", "gate", "--lookahead", "2"],
                      ["--predictor", "gate", "--policy", "predicted"],
                      ["--predictor", "recency", "--slots", "3"]):
            p = ferry(*args, "--gpu-mem", "16M", "--slots", "6", *extra, "--stats")
            self.assertEqual(p.stdout, want, extra)
            if "gate" in extra:
                self.assertRegex(p.stderr.decode(),
                                 r"predictor gate, live on decoded tokens:  lookahead 1: "
                                 r"precision@2 0\.\d{3} recall@2 0\.\d{3} \(\d+\)")
        p = ferry(*args, "--gpu-mem", "16M", "--predictor", "stats", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("--predictor-stats", p.stderr.decode())

    def test_bad_options_exit_2(self):
        for args, msg in [
            (["run", MODEL, "-p", "x", "--temp", "hot"], "--temp expects a number"),
            (["run", MODEL, "-p", "x", "--top-p", "0"], "--top-p expects"),
            (["run", MODEL, "-p", "x", "--top-p", "1.5"], "--top-p expects"),
            (["run", MODEL, "-p", "x", "-n", "-3"], "-n expects an integer"),
            (["run", MODEL, "-p", "x", "--ctx", "0"], "--ctx expects an integer"),
            (["run", MODEL, "-p", "x", "--bogus"], "unknown option '--bogus'"),
            (["run", MODEL, "-p"], "-p needs a value"),
            (["run", MODEL], "exactly one of -p or -f"),
            (["launch"], "unknown command 'launch'"),
        ]:
            p = ferry(*args, check=False)
            self.assertEqual(p.returncode, 2, args)
            self.assertIn(msg, p.stderr.decode(), args)

    def test_options_with_equals_and_help_everywhere(self):
        case = self.ref[0]
        spaced = ferry("run", MODEL, "-p", case["prompt"], "-n", "8", "--ctx", "64",
                       "--temp", "0", "--json").stdout
        joined = ferry("run", MODEL, "-p", case["prompt"], "-n=8", "--ctx=64", "--temp=0",
                       "--json").stdout
        self.assertEqual(json.loads(spaced)["ids"], json.loads(joined)["ids"])
        # the value of an option stays whole, '=' and all
        p = ferry("run", MODEL, "-p", "--ctx=3", "-n", "2", "--json")
        self.assertEqual(json.loads(p.stdout)["prompt_ids"][1:],
                         json.loads(ferry("tokenize", MODEL, "-p", "--ctx=3", "--json",
                                          "--no-special").stdout)["ids"])
        p = ferry("run", MODEL, "-p", "x", "--ctx=zero", check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("--ctx expects an integer", p.stderr.decode())
        for cmd in (["run"], ["serve"], ["pack"], ["synth"], ["trace"], ["sim"], ["batch"],
                    ["bench"], ["perplexity"], ["predictor"], ["predictor", "fit"],
                    ["predictor", "eval"], ["tokenize"]):
            for flag in ("-h", "--help"):
                p = ferry(*cmd, flag, check=False)
                self.assertEqual(p.returncode, 0, (cmd, flag, p.stderr.decode()))
                self.assertIn("usage: ferry " + cmd[0], p.stdout.decode(), (cmd, flag))

    def test_stop_strings_stdin_and_no_display_prompt(self):
        case = self.ref[0]
        full = json.loads(ferry("run", MODEL, "-p", case["prompt"], "-n", "32", "--ignore-eos",
                                "--json").stdout)["text"]
        stop = full[len(full) // 2:len(full) // 2 + 3]
        cut = full[:full.index(stop)]
        p = ferry("run", MODEL, "-p", case["prompt"], "-n", "32", "--ignore-eos", "--stop",
                  "never there", "--stop", stop, "--no-display-prompt")
        self.assertEqual(p.stdout.decode(), cut + "\n")
        p = ferry("run", MODEL, "-p", case["prompt"], "-n", "32", "--ignore-eos",
                  "--stop=" + stop, "--json")
        self.assertEqual(json.loads(p.stdout)["text"], cut)
        p = subprocess.run([FERRY, "run", MODEL, "-f", "-", "-n", "32", "--ignore-eos"],
                           input=case["prompt"].encode(), capture_output=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.decode(), case["prompt"] + full + "\n")
        p = ferry("run", MODEL, "-p", "x", "--stop", "", check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("--stop", p.stderr.decode())

    def test_gpu_mem_on_the_cpu_says_it_simulates(self):
        warn = "--gpu-mem on the CPU backend simulates a device"
        p = ferry("run", MODEL, "-p", "x", "-n", "2", "--gpu-mem", "20M", "--backend", "cpu")
        self.assertEqual(p.stderr.decode().count(warn), 1, p.stderr)
        p = ferry("run", MODEL, "-p", "x", "-n", "2", "--backend", "cpu")
        self.assertNotIn(warn, p.stderr.decode())

    def test_bench_prints_speeds_and_the_bound(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.json")
            p = ferry("bench", MODEL, "--backend", "cpu", "--prompt-len", "8", "--gen-len", "6",
                      "--repeat", "2", "--bandwidth-size", "8M", "--json", path)
            out = p.stdout.decode()
            self.assertRegex(out, r"bandwidth: device [0-9.]+ GB/s, pinned host->device [0-9.]+")
            self.assertRegex(out, r"decode: [0-9.]+ tokens/s \(median of 2 runs of 6\)")
            self.assertRegex(out, r"bound: [0-9.]+ tokens/s")
            with open(path) as f:
                r = json.load(f)
            self.assertEqual(r["backend"], "cpu")
            self.assertGreater(r["decode_tokens_per_s"], 0)
            self.assertGreater(r["bound_tokens_per_s"], 0)
            self.assertFalse(r["offload"])
            # one expert per layer and token at least: 6 layers x top-2 x 0.42 MiB
            self.assertEqual(r["expert_bytes_per_token"], 6 * 2 * 3 * 384 * 192 * 2)
            # the CPU backend's bound reads the decode's working set (every expert of the
            # resident model and more) as fast as all cores can: never below the decode
            self.assertIn("cpu backend: the device is host memory", out)
            self.assertGreater(r["working_set_bytes"], 6 * 8 * 3 * 384 * 192 * 2)
            self.assertLessEqual(r["fraction_of_bound"], 1.0)

            p = ferry("bench", MODEL, "--backend", "cpu", "--gpu-mem", "20M", "--slots", "4",
                      "--hybrid", "off", "--prompt-len", "8", "--gen-len", "6", "--repeat", "1",
                      "--bandwidth-size", "8M", "--json", path)
            self.assertRegex(p.stdout.decode(), r"offload: hit rate [0-9.]+%")
            with open(path) as f:
                r = json.load(f)
            self.assertTrue(r["offload"])
            self.assertGreater(r["moved_bytes_per_token"], 0)
            self.assertEqual(r["hybrid"], "off")  # names, not enum integers

            p = ferry("bench", MODEL, "--backend", "cpu", "--mode", "batch", "--batch", "4",
                      "--prompt-len", "8", "--gen-len", "4", "--repeat", "1",
                      "--bandwidth-size", "8M", "--json", path)
            self.assertRegex(p.stdout.decode(),
                             r"batch: [0-9.]+ generated tokens/s \(4 sequences of 8 \+ 4 tokens")
            with open(path) as f:
                r = json.load(f)
            self.assertEqual(r["mode"], "batch")
            self.assertGreater(r["batch_tokens_per_s"], 0)
            # every generated token's layer-batches load at least top-k experts per layer
            self.assertGreaterEqual(r["batch_expert_loads_per_token"], 2)
        for args, msg in [
            (["bench", MODEL, "--mode", "train"], "--mode expects decode, prefill or batch"),
            (["bench", MODEL, "--mode", "batch", "--batch", "0"], "--batch expects"),
            (["bench", MODEL, "--repeat", "0"], "--repeat expects"),
            (["bench", MODEL, "--frobnicate", "1"], "unknown option --frobnicate"),
            (["bench"], "usage: ferry bench"),
        ]:
            p = ferry(*args, check=False)
            self.assertEqual(p.returncode, 2, args)
            self.assertIn(msg, p.stderr.decode(), args)

    def test_backend_option_and_environment(self):
        p = ferry("run", MODEL, "-p", "x", "-n", "1", "--backend", "gpu", check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("--backend expects auto, cpu or cuda", p.stderr.decode())
        env = dict(os.environ, FERRY_BACKEND="tpu")
        q = subprocess.run([FERRY, "run", MODEL, "-p", "x", "-n", "1"], capture_output=True,
                           env=env, timeout=300)
        self.assertEqual(q.returncode, 2)
        self.assertIn("FERRY_BACKEND expects auto, cpu or cuda", q.stderr.decode())
        p = ferry("run", MODEL, "-p", "def f", "-n", "4", "--backend", "cpu", "--stats")
        self.assertRegex(p.stderr.decode(), r"backend: cpu \(cpu, \d+ threads?, [a-z0-9]+\)")
        version = ferry("version").stdout.decode()
        self.assertIn("cuda: ", version)
        cuda = not any(w in version for w in ("cuda: no usable", "no CUDA backend",
                                              "no NVIDIA driver / no GPU found"))
        if "no CUDA backend" not in version and not os.path.exists("/proc/driver/nvidia"):
            # a CUDA build on a machine without a driver says so, not "driver insufficient"
            self.assertIn("cuda: no NVIDIA driver / no GPU found for the CUDA backend", version)
            self.assertNotIn("insufficient", version)
        p = ferry("run", MODEL, "-p", "def f", "-n", "4", "--backend", "cuda", check=False)
        if cuda:
            self.assertEqual(p.returncode, 0, p.stderr.decode())
        else:  # a clear error, not a silent fallback
            self.assertEqual(p.returncode, 1)
            self.assertRegex(p.stderr.decode(), r"CUDA|cuda")

    def test_bad_model_dirs_exit_1_naming_the_problem(self):
        with tempfile.TemporaryDirectory() as tmp:
            p = ferry("run", os.path.join(tmp, "nope"), "-p", "x", check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("config.json", p.stderr.decode())

            bad = os.path.join(tmp, "truncated")
            shutil.copytree(MODEL, bad)
            shard = os.path.join(bad, "model-00003-of-00003.safetensors")
            os.chmod(shard, 0o644)
            with open(shard, "r+b") as f:
                f.truncate(1000000)
            p = ferry("run", bad, "-p", "x", check=False)
            self.assertEqual(p.returncode, 1)
            err = p.stderr.decode()
            self.assertIn("model-00003-of-00003.safetensors", err)
            self.assertIn("FERRY_ERR_FORMAT", err)

    def test_synth_writes_a_model_that_runs(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "synth")
            p = ferry("synth", out, "--preset", "tiny", "--layers", "1", "--shard-size", "2M",
                      "--seed", "3", "--threads", "2", "--tokenizer", MODEL)
            err = p.stderr.decode()
            self.assertEqual(p.stdout, b"")
            self.assertRegex(err, r"writing [0-9.]+ MB \([0-9.]+M parameters, bf16, 1 layer, "
                                  r"8 experts\) in \d+ shards to .* with 2 threads")
            m = re.search(r"wrote [0-9.]+ MB in (\d+) shards \(34 tensors\) to .* in [0-9.]+ s, "
                          r"[0-9.]+ GB/s", err)
            self.assertIsNotNone(m, err)
            shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
            self.assertEqual(shards, ["model-%05d-of-%05d.safetensors" % (i + 1, int(m.group(1)))
                                      for i in range(int(m.group(1)))])
            with open(os.path.join(out, "config.json")) as f:
                cfg = json.load(f)
            self.assertEqual((cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"],
                              cfg["torch_dtype"]), ("mixtral", 1, 192, "bfloat16"))
            with open(os.path.join(out, "model.safetensors.index.json")) as f:
                index = json.load(f)
            self.assertEqual(len(index["weight_map"]), 34)
            run = json.loads(ferry("run", out, "-p", "def f(x):", "-n", "6", "--ignore-eos",
                                   "--json", "--threads", "2").stdout)
            self.assertEqual(len(run["ids"]), 6)

            # a vocabulary larger than the copied tokenizer's: the tokenizer is extended to
            # it, so every id the model produces decodes, in run, batch and tokenize
            wide = os.path.join(tmp, "wide")
            ferry("synth", wide, "--preset", "tiny", "--layers", "1", "--vocab", "6000",
                  "--shard-size", "2M", "--seed", "5", "--tokenizer", MODEL)
            with open(os.path.join(wide, "tokenizer.json")) as f:
                vocab = json.load(f)["model"]["vocab"]
            self.assertEqual(sorted(vocab.values()), list(range(6000)))
            self.assertEqual(ferry("tokenize", wide, "--decode", "5999").stdout.decode(),
                             "<synth_5999>\n")
            run = json.loads(ferry("run", wide, "-p", "def f(x):", "-n", "40", "--ignore-eos",
                                   "--temp", "1.5", "--seed", "2", "--json").stdout)
            self.assertTrue(any(i >= 4096 for i in run["ids"]), run["ids"])
            self.assertEqual(ferry("tokenize", wide, "--decode",
                                   ",".join(map(str, run["ids"]))).stdout.decode(),
                             run["text"] + "\n")
            prompts = os.path.join(tmp, "p.jsonl")
            with open(prompts, "w") as f:
                f.write(json.dumps({"prompt": "def f(x):", "max_tokens": 40}) + "\n")
            p = ferry("batch", wide, "--prompts", prompts, "--out", "-", "--ignore-eos",
                      "--temp", "1.5", "--seed", "2")
            self.assertEqual(json.loads(p.stdout)["text"], run["text"])

            # ferry batch never throws away what it computed: with the old 4,096-token
            # tokenizer the text cannot be decoded, so the line carries the ids and the error
            shutil.copy(os.path.join(MODEL, "tokenizer.json"), os.path.join(wide, "tokenizer.json"))
            p = ferry("batch", wide, "--prompts", prompts, "--out", "-", "--ignore-eos",
                      "--temp", "1.5", "--seed", "2", check=False)
            self.assertEqual(p.returncode, 1)
            line = json.loads(p.stdout)
            self.assertEqual(line["ids"], run["ids"])
            self.assertIsNone(line["text"])
            self.assertIn("outside the vocab", line["error"])
            self.assertIn("1 of 1 lines have an error", p.stderr.decode())

            # the same again, elsewhere: the same bytes; the tokenizer found from the cwd
            again = os.path.join(tmp, "again")
            ferry_cwd = subprocess.run([FERRY, "synth", again, "--preset", "tiny", "--layers", "1",
                                        "--shard-size", "2M", "--seed", "3"],
                                       capture_output=True, timeout=300, cwd=ROOT)
            self.assertEqual(ferry_cwd.returncode, 0, ferry_cwd.stderr.decode())
            for name in shards + ["config.json", "tokenizer.json"]:
                with open(os.path.join(out, name), "rb") as a, \
                        open(os.path.join(again, name), "rb") as b:
                    self.assertEqual(a.read(), b.read(), name)

            # a folder that is not empty is refused, and left alone
            before = sorted(os.listdir(out))
            p = ferry("synth", out, "--preset", "tiny", "--tokenizer", MODEL, check=False)
            self.assertEqual(p.returncode, 2)
            self.assertIn("is not empty", p.stderr.decode())
            self.assertEqual(sorted(os.listdir(out)), before)

            for args, msg in [
                (["--dtype", "f8"], "--dtype expects bf16, f16 or f32, got 'f8'"),
                (["--preset", "mixtral-9x9b"], "unknown preset 'mixtral-9x9b'"),
                (["--layers", "0"], "--layers expects an integer in [1, "),
                (["--heads", "5"], "hidden (hidden_size) 192 is not a multiple of heads"),
                (["--kv-heads", "4"], "is not a multiple of kv heads (num_key_value_heads) 4"),
                (["--top-k", "9"], "top-k (num_experts_per_tok) 9 exceeds experts"),
                (["--shard-size", "lots"], "--shard-size expects a size"),
                (["--vocab"], "--vocab needs a value"),
                (["--bogus", "1"], "unknown option '--bogus'"),
            ]:
                p = ferry("synth", os.path.join(tmp, "bad"), "--preset", "tiny", "--tokenizer",
                          MODEL, *args, check=False)
                self.assertEqual(p.returncode, 2, args)
                self.assertIn(msg, p.stderr.decode(), args)
                self.assertFalse(os.path.exists(os.path.join(tmp, "bad")), args)
            p = ferry("synth", os.path.join(tmp, "bad"), "--preset", "tiny", "--tokenizer",
                      os.path.join(tmp, "none"), check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("none: No such file or directory", p.stderr.decode())

    def test_bench_matmul_prints_every_format_and_kernel(self):
        exe = os.path.join(os.path.dirname(FERRY), "bench_matmul")
        p = subprocess.run([exe, "--rows", "256", "--cols", "1024", "--tokens", "1,5",
                            "--repeat", "1", "--threads", "2"], capture_output=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr.decode())
        rows = [l.split() for l in p.stdout.decode().splitlines()[2:]]
        seen = {(r[0], r[1], r[2]) for r in rows}
        for fmt in ("bf16", "q8", "q4"):
            for n in ("1", "5"):
                self.assertIn((fmt, "reference", n), seen)
        for r in rows:
            self.assertGreater(float(r[3]), 0, r)
            self.assertGreater(float(r[4]), 0, r)
        for args, msg in [
            (["--cols", "48"], "--cols must be a multiple of 32"),
            (["--rows", "0"], "--rows expects an integer in [8, "),
            (["--tokens", "1,x"], "--tokens takes 1 to 8 counts"),
            (["--tokens", "1,2,3,4,5,6,7,8,9"], "--tokens takes 1 to 8 counts"),
            (["--repeat"], "a value is missing after --repeat"),
            (["--fast", "1"], "unknown option --fast"),
        ]:
            p = subprocess.run([exe, *args], capture_output=True, timeout=60)
            self.assertEqual(p.returncode, 2, args)
            self.assertIn(msg, p.stderr.decode(), args)

    def test_tokenize_encodes_and_decodes(self):
        case = self.ref[0]
        out = ferry("tokenize", MODEL, "-p", case["prompt"]).stdout.decode()
        self.assertEqual(out, " ".join(map(str, case["ids"])) + "\n")
        plain = ferry("tokenize", MODEL, "-p", case["prompt"], "--no-special").stdout.decode()
        self.assertEqual(plain.split(), [str(i) for i in case["ids"][1:]])  # no BOS
        j = json.loads(ferry("tokenize", MODEL, "-p", case["prompt"], "--json").stdout)
        self.assertEqual(j["ids"], case["ids"])
        self.assertEqual(j["pieces"][0], "<s>")
        self.assertEqual(len(j["pieces"]), len(j["ids"]))
        ids = ",".join(map(str, case["ids"]))
        self.assertEqual(ferry("tokenize", MODEL, "--decode", ids).stdout.decode(),
                         "<s> " + case["prompt"] + "\n")  # Strip drops the first space only
        self.assertEqual(ferry("tokenize", MODEL, "--decode", ids, "--no-special").stdout
                         .decode(), case["prompt"] + "\n")
        j = json.loads(ferry("tokenize", MODEL, "--decode", ids.replace(",", " "), "--json",
                             "--no-special").stdout)
        self.assertEqual(j, {"ids": case["ids"], "text": case["prompt"]})
        with tempfile.TemporaryDirectory() as tmp:
            text = os.path.join(tmp, "in.txt")
            with open(text, "w") as f:
                f.write(case["prompt"])
            self.assertEqual(ferry("tokenize", MODEL, "-f", text).stdout.decode(), out)
            # a tokenizer.json file: its tokenizer_config.json beside it is read
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(MODEL, name), tmp)
            self.assertEqual(ferry("tokenize", os.path.join(tmp, "tokenizer.json"), "-p",
                                   case["prompt"]).stdout.decode(), out)

    def test_tokenize_byte_level(self):
        qwen = os.path.join(ROOT, "..", "shared", "fixtures", "moe-families", "tiny-qwen3_moe")
        if not os.path.isdir(qwen):
            self.skipTest("no shared fixtures")
        out = ferry("tokenize", qwen, "-p", "Hello world<|im_start|>\u00e9").stdout.decode()
        self.assertEqual(out, "9707 1879 151644 963\n")
        j = json.loads(ferry("tokenize", os.path.join(qwen, "tokenizer.json"), "-p",
                             "Hello world", "--json").stdout)
        self.assertEqual(j, {"ids": [9707, 1879], "pieces": ["Hello", "\u0120world"]})
        self.assertEqual(ferry("tokenize", qwen, "--decode", "9707,1879,151644,963")
                         .stdout.decode(), "Hello world<|im_start|>\u00e9\n")
        self.assertEqual(ferry("tokenize", qwen, "--decode", "151644,963", "--no-special")
                         .stdout.decode(), "\u00e9\n")

    def test_tokenize_errors(self):
        with tempfile.TemporaryDirectory() as tmp:
            bad = os.path.join(tmp, "tokenizer.json")
            with open(bad, "w") as f:
                f.write("{\"model\": ")
            for args, code, msg in [
                ([MODEL, "-p", "a", "-f", "b"], 2, "give one of -p, -f and --decode"),
                ([MODEL, "-p", "a", "--decode", "1"], 2, "give one of -p, -f and --decode"),
                ([MODEL], 2, "usage: ferry tokenize"),
                ([], 2, "usage: ferry tokenize"),
                ([MODEL, "-p"], 2, "-p needs a value"),
                ([MODEL, "-p", "a", "-p", "b"], 2, "-p given twice"),
                ([MODEL, "--decode", "1,x"], 2, "--decode expects ids such as 1,2,3"),
                ([MODEL, "--decode", "1.5"], 2, "--decode expects ids such as 1,2,3"),
                ([MODEL, "--decode", "1,99999"], 1, "ids[1] = 99999 is outside the vocab"),
                ([MODEL, "--decode", "-1"], 1, "ids[0] = -1 is outside the vocab"),
                ([MODEL, "--frobnicate", "-p", "a"], 2, "unknown option '--frobnicate'"),
                ([MODEL, MODEL, "-p", "a"], 2, "one tokenizer path"),
                ([os.path.join(tmp, "none"), "-p", "a"], 1, "none: No such file or directory"),
                ([tmp + "/", "-p", "a"], 1, "invalid JSON"),
                ([bad, "-p", "a"], 1, "invalid JSON"),
                ([ROOT, "-p", "a"], 1, "tokenizer.json: cannot open"),
                ([MODEL, "-f", os.path.join(tmp, "none.txt")], 1, "cannot open"),
            ]:
                p = ferry("tokenize", *args, check=False)
                self.assertEqual(p.returncode, code, (args, p.stderr.decode()))
                self.assertIn(msg, p.stderr.decode(), args)
            p = ferry("tokenize", MODEL, "-p", "\udcff".encode("utf-8", "surrogateescape"),
                      check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("invalid UTF-8 at byte 0", p.stderr.decode())
            self.assertEqual(ferry("tokenize", "--help").returncode, 0)


if __name__ == "__main__":
    FERRY = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
