#!/usr/bin/env python3
"""bench/serve_bench.py: throughput and latency of `ferry serve` under N concurrent clients,
next to `ferry batch` on the same prompts.

Starts `ferry serve` on --port 0 over a model folder (by default a small Mixtral-shaped
checkpoint that `ferry synth` writes once into the build folder), replays --requests greedy
completions of deterministic synthetic prompts from --clients threads (closed loop: each
client sends its next request when the last one is done; every request generates exactly
--max-tokens tokens, ignore_eos), and prints requests/s, generated tokens/s, time to first
token and inter-token latency (p50/p99), then runs `ferry batch` on the same prompts and
prints its throughput and whether its texts equal the server's.

  python3 bench/serve_bench.py [--ferry build/ferry] [--model DIR] [--clients 16]
      [--requests 64] [--prompt-len 128] [--max-tokens 64] [--stream | --no-stream]
      [--max-seqs N] [--model-args "--threads 2"] [--serve-args "..."] [--json FILE]

Python standard library only. bench/README.md describes the output.
"""
import argparse
import http.client
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH_ARGS = "--preset tiny --layers 4 --hidden 512 --intermediate 1024 --heads 8 --kv-heads 2"
WORDS = ("the of and to in is for on with as by at from that this be are it or an was which "
         "data value model layer expert token cache batch queue server client request stream "
         "tensor weight router score memory device kernel thread lock buffer offset shard file "
         "load store fetch compute return result error state index count size length time "
         "first last next each every other small large fast slow new old read write open close "
         "def class import self None True False if else for while try except with yield lambda "
         "0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 = + - * / ( ) [ ] { } : , . ;").split()


def pct(xs, p):
    """Nearest-rank percentile; None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))]


def ms(x):
    return "-" if x is None else "%.1f ms" % (x * 1000)


def make_model(ferry, build, synth_args):
    """The default model: `ferry synth` once into BUILD/serve-bench-model-<hash of args>."""
    tag = "%08x" % (sum(ord(c) * (i + 1) for i, c in enumerate(synth_args)) & 0xffffffff)
    out = os.path.join(build, "serve-bench-model-" + tag)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tmp = out + ".tmp"
    subprocess.run(["rm", "-rf", tmp], check=True)
    p = subprocess.run([ferry, "synth", tmp, *shlex.split(synth_args)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise SystemExit("ferry synth failed:\n" + p.stderr)
    os.rename(tmp, out)
    return out


def count_tokens(ferry, model, text):
    p = subprocess.run([ferry, "tokenize", model, "-p", text, "--json"], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise SystemExit("ferry tokenize failed:\n" + p.stderr)
    return len(json.loads(p.stdout)["ids"])


def make_prompts(ferry, model, n, prompt_len, seed=0):
    """n deterministic prompts of about prompt_len tokens (BOS included): seeded words, the
    word count calibrated on one prompt with the model's tokenizer."""
    def words(i, k):
        rng = random.Random(seed * 1000003 + i)
        return " ".join(rng.choice(WORDS) for _ in range(k))
    probe = words(-1, 400)
    per_word = count_tokens(ferry, model, probe) / 400.0
    k = max(1, int(round(prompt_len / per_word)))
    return [words(i, k) for i in range(n)]


class Server:
    def __init__(self, ferry, model, args):
        self.cmd = [ferry, "serve", model, "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.err = []
        self.port = None
        ready = threading.Event()

        def drain():
            for raw in iter(self.proc.stderr.readline, b""):
                line = raw.decode("utf-8", "replace")
                self.err.append(line)
                m = re.match(r"ferry serve: listening on http://[^:]+:(\d+)", line)
                if m and not ready.is_set():
                    self.port = int(m.group(1))
                    ready.set()

        threading.Thread(target=drain, daemon=True).start()
        t_end = time.monotonic() + 300
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > t_end:
                self.stop()
                raise SystemExit("%s did not start:\n%s" % (" ".join(self.cmd),
                                                            "".join(self.err)[-3000:]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def one_request(port, body, stream):
    """Returns {ok, text, tokens, prompt_tokens, t_start, t_first, t_chunks, t_end}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    res = {"ok": False, "text": "", "tokens": 0, "prompt_tokens": 0, "t_chunks": []}
    res["t_start"] = time.monotonic()
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            res["error"] = "HTTP %d %s" % (r.status, r.read()[:300])
            return res
        if not stream:
            j = json.loads(r.read())
            res["t_first"] = res["t_end"] = time.monotonic()
            res["text"] = j["choices"][0]["text"]
            res["tokens"] = j["usage"]["completion_tokens"]
            res["prompt_tokens"] = j["usage"]["prompt_tokens"]
            res["ok"] = True
            return res
        buf, parts = b"", []
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                data = ev.decode("utf-8")[len("data: "):]
                if data == "[DONE]":
                    continue
                j = json.loads(data)
                if j.get("usage"):
                    res["tokens"] = j["usage"]["completion_tokens"]
                    res["prompt_tokens"] = j["usage"]["prompt_tokens"]
                for c in j.get("choices", []):
                    if c.get("text"):
                        now = time.monotonic()
                        res["t_chunks"].append(now)
                        res.setdefault("t_first", now)
                        parts.append(c["text"])
        res["t_end"] = time.monotonic()
        res["text"] = "".join(parts)
        res["ok"] = "t_first" in res
        return res
    except (OSError, http.client.HTTPException, ValueError) as e:
        res["error"] = "%s: %s" % (type(e).__name__, e)
        return res
    finally:
        conn.close()


def metric(text, name):
    m = re.search(r"^%s(?:\{[^}]*\})? (\S+)$" % re.escape(name), text, re.M)
    return float(m.group(1)) if m else None


def run_serve(args, model, prompts):
    serve_args = ["--max-seqs", str(args.max_seqs or args.clients),
                  "--max-queue", str(max(args.requests, args.clients)),
                  "--ctx", str(args.prompt_len * 2 + args.max_tokens + 64),
                  *shlex.split(args.model_args), *shlex.split(args.serve_args)]
    srv = Server(args.ferry, model, serve_args)
    try:
        body = lambda p: {"prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                          "ignore_eos": True, "stream": args.stream,
                          **({"stream_options": {"include_usage": True}} if args.stream else {})}
        warm = one_request(srv.port, body(prompts[0]), args.stream)  # not counted
        if not warm["ok"]:
            raise SystemExit("the warm-up request failed: %s" % warm.get("error"))
        results = [None] * len(prompts)
        nxt = [0]
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(prompts):
                    return
                results[i] = one_request(srv.port, body(prompts[i]), args.stream)

        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("GET", "/metrics")
        m0 = conn.getresponse().read().decode()
        conn.close()
        t0 = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("GET", "/metrics")
        m1 = conn.getresponse().read().decode()
        conn.close()
    finally:
        srv.stop()
    bad = [r for r in results if not r["ok"]]
    if bad:
        raise SystemExit("%d of %d requests failed; the first: %s" % (
            len(bad), len(results), bad[0].get("error")))
    ttft = [r["t_first"] - r["t_start"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["t_chunks"], r["t_chunks"][1:])]
    e2e = [r["t_end"] - r["t_start"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    out = {"requests": len(results), "clients": args.clients, "wall_s": wall,
           "requests_per_s": len(results) / wall, "generated_tokens": tokens,
           "generated_tokens_per_s": tokens / wall,
           "prompt_tokens_mean": sum(r["prompt_tokens"] for r in results) / len(results),
           "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
           "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
           "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
           "texts": [r["text"] for r in results]}
    for name in ("ferry_steps_total", "ferry_step_experts_total", "ferry_selected_steps_total",
                 "ferry_step_experts_planned_total", "ferry_step_experts_arrival_total"):
        a, b = metric(m0, name), metric(m1, name)
        out[name] = None if a is None or b is None else b - a
    return out


def run_batch(args, model, prompts):
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(src, "w") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"id": i, "prompt": p, "max_tokens": args.max_tokens}) + "\n")
        cmd = [args.ferry, "batch", model, "--prompts", src, "--out", dst, "-n",
               str(args.max_tokens), "--ignore-eos", *shlex.split(args.model_args)]
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise SystemExit("%s failed:\n%s" % (" ".join(cmd), p.stderr[-2000:]))
        with open(dst) as f:
            rows = [json.loads(l) for l in f if l.strip()]
    m = re.search(r"; ([0-9.]+) s, ([0-9.]+) tokens/s", p.stderr)
    secs = float(m.group(1)) if m else wall
    tokens = sum(r["tokens"] for r in rows)
    return {"command": " ".join(shlex.quote(c) for c in cmd[:2]) + " MODEL --prompts IN --out "
            "OUT -n %d --ignore-eos %s" % (args.max_tokens, args.model_args),
            "seconds": secs, "wall_s": wall, "generated_tokens": tokens,
            "generated_tokens_per_s": tokens / secs,
            "requests_per_s": len(rows) / secs,
            "texts": [r["text"] for r in sorted(rows, key=lambda r: r["id"])]}


def run_one(args, model, prompt):
    """ferry run's greedy text for one prompt alone (the reference for both)."""
    p = subprocess.run([args.ferry, "run", model, "-p", prompt, "-n", str(args.max_tokens),
                        "--ignore-eos", "--json", *shlex.split(args.model_args)],
                       capture_output=True, text=True)
    return json.loads(p.stdout)["text"] if p.returncode == 0 else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferry", default=os.path.join(ROOT, "build", "ferry"))
    ap.add_argument("--model", help="a model folder (default: a ferry synth checkpoint, made "
                    "once in the build folder with --synth-args)")
    ap.add_argument("--synth-args", default=SYNTH_ARGS)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                    help="stream the responses (default; needed for TTFT and ITL)")
    ap.add_argument("--max-seqs", type=int, default=0, help="the server's --max-seqs "
                    "(default: --clients)")
    ap.add_argument("--model-args", default="", help="model options for both ferry serve and "
                    "ferry batch, e.g. \"--threads 2 --backend cpu\"")
    ap.add_argument("--serve-args", default="", help="more ferry serve options")
    ap.add_argument("--no-batch", action="store_true", help="skip the ferry batch comparison")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    args.ferry = os.path.abspath(args.ferry)
    build = os.path.dirname(args.ferry)
    model = args.model or make_model(args.ferry, build, args.synth_args)
    prompts = make_prompts(args.ferry, model, args.requests, args.prompt_len)
    print("ferry serve bench: %s%s" % (model, "" if args.model else
                                       " (ferry synth %s)" % args.synth_args))
    print("  %d requests from %d clients, prompts of ~%d tokens, max_tokens %d, stream %s%s" % (
        args.requests, args.clients, args.prompt_len, args.max_tokens,
        "on" if args.stream else "off", ", " + args.model_args if args.model_args else ""))
    s = run_serve(args, model, prompts)
    print("serve  %.2f requests/s, %.1f generated tokens/s (%d tokens in %.2f s; prompts %.1f "
          "tokens on average)" % (s["requests_per_s"], s["generated_tokens_per_s"],
                                  s["generated_tokens"], s["wall_s"], s["prompt_tokens_mean"]))
    print("       TTFT p50 %s, p99 %s; ITL p50 %s, p99 %s; request latency p50 %s, p99 %s" % (
        ms(s["ttft_p50_s"]), ms(s["ttft_p99_s"]), ms(s["itl_p50_s"]), ms(s["itl_p99_s"]),
        ms(s["e2e_p50_s"]), ms(s["e2e_p99_s"])))
    if s.get("ferry_steps_total"):
        steps, sel = s["ferry_steps_total"], s.get("ferry_selected_steps_total") or 0
        line = "       %d steps, %.1f distinct experts per step" % (
            steps, (s["ferry_step_experts_total"] or 0) / steps)
        if sel:
            line += "; %d steps where prompts competed: %.1f experts per step planned, %.1f in " \
                "arrival order" % (sel, (s["ferry_step_experts_planned_total"] or 0) / sel,
                                   (s["ferry_step_experts_arrival_total"] or 0) / sel)
        print(line)
    result = {"serve": s, "args": vars(args), "model": model}
    if not args.no_batch:
        b = run_batch(args, model, prompts)
        same = sum(1 for x, y in zip(s["texts"], b["texts"]) if x == y)
        print("batch  %.2f requests/s, %.1f generated tokens/s (%d tokens in %.2f s; %.2f s with "
              "the model load) [%s]" % (b["requests_per_s"], b["generated_tokens_per_s"],
                                        b["generated_tokens"], b["seconds"], b["wall_s"],
                                        b["command"]))
        print("       serve / batch throughput %.2f; texts equal %d/%d" % (
            s["generated_tokens_per_s"] / b["generated_tokens_per_s"], same, len(prompts)))
        result["batch"] = b
        result["texts_equal"] = same
        diff = [i for i, (x, y) in enumerate(zip(s["texts"], b["texts"])) if x != y][:8]
        if diff:
            # which one left ferry run's text: ferry run and the server decode with the
            # streaming decoder, ferry batch decodes each text whole (as Hugging Face does);
            # on byte-fallback tokenizers the two differ on invalid UTF-8 byte runs
            runs = [run_one(args, model, prompts[i]) for i in diff]
            n_s = sum(1 for i, r in zip(diff, runs) if r == s["texts"][i])
            n_b = sum(1 for i, r in zip(diff, runs) if r == b["texts"][i])
            print("       of %d that differ: serve equals ferry run's text for %d, batch for %d"
                  % (len(diff), n_s, n_b))
            result["differing_checked"] = {"n": len(diff), "serve_equals_run": n_s,
                                           "batch_equals_run": n_b}
    if args.json:
        for part in ("serve", "batch"):
            if part in result:
                result[part] = {k: v for k, v in result[part].items() if k != "texts"}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
