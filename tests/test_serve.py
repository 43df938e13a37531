"""tests/test_serve.py: `ferry serve` end to end over HTTP, against the contract of its
OpenAI-compatible API and against `ferry run` as the reference for every greedy text.

It starts servers on --port 0 (each stopped in a finally block with SIGTERM or SIGINT, which
must exit 0; anything left is killed) and talks to them with http.client and raw sockets:
/health, /v1/models, authentication (--api-key and $FERRY_API_KEY), every error the contract
names (status, the {"error": {message, type, param, code}} shape, param), 413 at --max-body
and at the 1 MiB default, 404/405, a full queue (429 with Retry-After), SSE streaming (well-
formed chunks, the text equal to the plain response, [DONE] last, the include_usage chunk),
stop strings plain and streamed, EOS and length finishes, prompts as token ids, chat with a
template file and with tiny-qwen3_moe's own template, a client disconnecting mid-stream
(/metrics ferry_active_sequences back to 0 and generation stopped), /metrics in Prometheus
text format, and a load test: 32 client threads mixing plain and streamed completions and
chat, some disconnecting, every greedy text equal to `ferry run`'s, and the server's RSS
after a second round within 16 MiB of what it was after the first.

Run by CTest as: python3 tests/test_serve.py FERRY_BINARY BUILD_DIR
$FERRY_SERVE_TEST_SCALE (default 1) scales the load down for sanitizer builds (e.g. 0.25)
and stretches the timeouts by its inverse; $FERRY_SERVE_TEST_ONLY=auth,queue runs only the
sections whose names contain those words (saying which it skipped). $FERRY_BACKEND defaults
to cpu for the servers and for the `ferry run` baselines alike. Prints every check; exits 1
on any failure, listing each as request, expected, got.
"""
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-moe-code")
QWEN = os.path.normpath(os.path.join(ROOT, "..", "shared", "fixtures", "moe-families",
                                     "tiny-qwen3_moe"))
TEMPLATE = os.path.join(ROOT, "tests", "fixtures", "chat-mistral.jinja")
SCALE = float(os.environ.get("FERRY_SERVE_TEST_SCALE", "1") or "1")
# for working on one part: a comma-separated list of section names (substrings)
ONLY = [o for o in os.environ.get("FERRY_SERVE_TEST_ONLY", "").split(",") if o]
SLOW = max(1.0, 1.0 / SCALE)            # timeouts stretch when the counts shrink
START_TIMEOUT = 60 * SLOW
REQ_TIMEOUT = 120 * SLOW
FERRY = None
BUILD = None
MIB = 1024 * 1024
# what the contract names: every one must be in /metrics
METRICS = ["ferry_requests_total", "ferry_queue_depth", "ferry_active_sequences",
           "ferry_prompt_tokens_total", "ferry_generated_tokens_total",
           "ferry_tokens_per_second", "ferry_expert_hit_rate", "ferry_bytes_to_device_total",
           "ferry_cpu_experts_total", "ferry_predictor_recall", "ferry_steps_total",
           "ferry_step_experts_total", "ferry_step_experts_arrival_total"]
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "WARNING: ThreadSanitizer", "runtime error:",
                   "ERROR: LeakSanitizer")


# ---- reporting -------------------------------------------------------------------------

class Report:
    """Every check prints one line; failures are kept as (what, request, expected, got)."""

    def __init__(self):
        self.n_ok = 0
        self.failures = []
        self.notes = []
        self.skipped = []
        self.lock = threading.Lock()

    def check(self, cond, what, request="", expected="", got=""):
        with self.lock:
            if cond:
                self.n_ok += 1
                print("ok    %s" % what, flush=True)
            else:
                self.failures.append((what, request, expected, got))
                print("FAIL  %s\n      request:  %s\n      expected: %s\n      got:      %s" % (
                    what, short(request), short(expected), short(got)), flush=True)
        return cond

    def note(self, what):
        with self.lock:
            self.notes.append(what)
            print("note  %s" % what, flush=True)

    def section(self, name, fn, *args):
        print("\n== %s" % name, flush=True)
        if ONLY and not any(o in name for o in ONLY):
            print("   skipped: not in FERRY_SERVE_TEST_ONLY", flush=True)
            self.skipped.append(name)
            return
        t0 = time.monotonic()
        try:
            fn(self, *args)
        except ServerStartError as e:
            self.check(False, "%s: the server starts" % name, str(e).split(" did not")[0],
                       "ferry serve: listening on ...", str(e))
        except Exception as e:  # a broken section must not hide the others
            self.check(False, "%s: raised %s" % (name, type(e).__name__), "", "no exception",
                       traceback.format_exc()[-3000:])
        for srv in list(LIVE):  # a server that died under the section's requests
            if srv.proc.poll() is not None and not srv.reported:
                srv.reported = True
                self.check(False, "%s: the server is still running" % name, " ".join(srv.cmd),
                           "running", "exited with status %s; stderr:\n%s" % (
                               srv.proc.returncode, srv.stderr()[-3000:]))
        print("   (%s: %.1f s)" % (name, time.monotonic() - t0), flush=True)


def short(x, n=600):
    s = x if isinstance(x, str) else json.dumps(x, ensure_ascii=False, default=repr)
    return s if len(s) <= n else s[:n] + "... (%d chars)" % len(s)


# ---- servers ---------------------------------------------------------------------------

LIVE = []


class ServerStartError(RuntimeError):
    pass


class Server:
    """`ferry serve MODEL --port 0 ARGS`: waits for the listening line on stderr, keeps
    draining stdout and stderr, stop() sends a signal and returns the exit status."""

    def __init__(self, model, *args, env=None):
        self.model = model
        self.args = list(args)
        self.cmd = [FERRY, "serve", model, "--host", "127.0.0.1", "--port", "0", *args]
        e = dict(os.environ)
        e.pop("FERRY_API_KEY", None)
        e.update(env or {})
        self.err, self.out = [], []
        self.reported = False
        self.ready = threading.Event()
        self.port = None
        self.listen_line = None
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=e)
        LIVE.append(self)
        self.t_err = threading.Thread(target=self._drain, args=(self.proc.stderr, self.err, True),
                                      daemon=True)
        self.t_out = threading.Thread(target=self._drain, args=(self.proc.stdout, self.out, False),
                                      daemon=True)
        self.t_err.start()
        self.t_out.start()
        t_end = time.monotonic() + START_TIMEOUT
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > t_end:
                self.kill()
                raise ServerStartError("%s did not start (%s):\n%s" % (
                    " ".join(self.cmd), "exit %s" % self.proc.returncode
                    if self.proc.returncode is not None else "no listening line in %.0f s" %
                    START_TIMEOUT, self.stderr()[-3000:]))
        self.pid = self.proc.pid

    def _drain(self, f, into, is_err):
        for raw in iter(f.readline, b""):
            line = raw.decode("utf-8", "replace")
            into.append(line)
            m = re.match(r"ferry serve: listening on http://([^:/\s]+):(\d+)\s*$", line)
            if is_err and m and not self.ready.is_set():
                self.listen_line = line.strip()
                self.port = int(m.group(2))
                self.ready.set()

    def stderr(self):
        return "".join(self.err)

    def stop(self, sig=signal.SIGTERM):
        """Signals the server; returns its exit status (None when it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30 * SLOW)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self.t_err.join(5)
        self.t_out.join(5)
        if self in LIVE:
            LIVE.remove(self)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self in LIVE:
            LIVE.remove(self)

    def rss_kib(self):
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None


def stop_checked(rep, srv, name, sig=signal.SIGTERM):
    rc = srv.stop(sig)
    rep.check(rc == 0, "%s: %s stops it with exit status 0" % (name, signal.Signals(sig).name),
              "kill -%s %d" % (signal.Signals(sig).name, srv.pid), 0,
              "exit %s\n%s" % (rc, srv.stderr()[-1500:]))
    marks = [m for m in SANITIZER_MARKS if m in srv.stderr()]
    rep.check(not marks, "%s: no sanitizer report on stderr" % name, " ".join(srv.cmd),
              "no report", srv.stderr()[-3000:])


# ---- HTTP ------------------------------------------------------------------------------

class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body
        try:
            self.json = json.loads(body.decode("utf-8")) if body else None
        except (UnicodeDecodeError, ValueError):
            self.json = None

    def __repr__(self):
        return "HTTP %s %s" % (self.status, self.body[:800].decode("utf-8", "replace"))


def encode_body(body):
    if body is None:
        return None
    if isinstance(body, (dict, list)):
        return json.dumps(body).encode()
    return body.encode() if isinstance(body, str) else body


def request(port, method, path, body=None, headers=None, timeout=None):
    """One request on a fresh connection. A connection error comes back as status None with
    the exception as the body, so that the check that reads it fails and names it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout or REQ_TIMEOUT)
    try:
        h = {"Content-Type": "application/json"} if body is not None else {}
        h.update(headers or {})
        conn.request(method, path, body=encode_body(body), headers=h)
        r = conn.getresponse()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    except (OSError, http.client.HTTPException) as e:
        return Resp(None, {}, ("no response: %s: %s" % (type(e).__name__, e)).encode())
    finally:
        conn.close()


def post(port, path, body, headers=None):
    return request(port, "POST", path, body, headers)


def describe(method, path, body=None, headers=None):
    s = "%s %s" % (method, path)
    if headers:
        s += " " + json.dumps(headers)
    if body is not None:
        b = body if isinstance(body, (dict, list)) else encode_body(body)[:200].decode(
            "utf-8", "replace")
        s += " " + short(b, 400)
    return s


class Stream:
    """A streamed response: status, headers, the SSE events (time, data text), problems in
    the framing, and what followed the last event."""

    def __init__(self):
        self.status = None
        self.headers = {}
        self.events = []
        self.problems = []
        self.body = b""
        self.t_first = None


def stream(port, path, body, headers=None, close_after=None, timeout=None):
    """POSTs body and reads the SSE stream. With close_after=K, shuts the socket down after
    K data events and returns (a client going away mid-stream)."""
    st = Stream()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout or REQ_TIMEOUT)
    t0 = time.monotonic()
    try:
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        conn.request("POST", path, body=encode_body(body), headers=h)
        sock = conn.sock
        r = conn.getresponse()
        st.status = r.status
        st.headers = {k.lower(): v for k, v in r.getheaders()}
        if r.status != 200:
            st.body = r.read()
            return st
        buf = b""
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                t = time.monotonic() - t0
                if st.t_first is None:
                    st.t_first = t
                parse_event(st, t, ev)
                if close_after is not None and len(st.events) >= close_after:
                    sock.shutdown(socket.SHUT_RDWR)
                    r.close()
                    return st
        if buf.strip():
            st.problems.append("bytes after the last blank line: %r" % buf[:200])
        return st
    except (OSError, http.client.HTTPException) as e:
        st.problems.append("the connection failed after %d events: %s: %s" % (
            len(st.events), type(e).__name__, e))
        if st.status is None:
            st.body = ("no response: %s: %s" % (type(e).__name__, e)).encode()
        return st
    finally:
        conn.close()


def parse_event(st, t, ev):
    try:
        text = ev.decode("utf-8")
    except UnicodeDecodeError:
        st.problems.append("an event is not UTF-8: %r" % ev[:200])
        return
    data = []
    for line in text.split("\n"):
        if line.startswith(":"):
            continue  # an SSE comment (keep-alive) is allowed
        if line.startswith("data: "):
            data.append(line[6:])
        elif line.startswith("data:"):
            data.append(line[5:])
        else:
            st.problems.append("a line that is not 'data: ...': %r" % line[:200])
    if data:
        st.events.append((t, "\n".join(data)))


def completion_from_stream(st, chat, include_usage=False):
    """Checks the chunks of a stream; returns (text, finish_reason, usage, problems)."""
    problems = list(st.problems)
    if st.status != 200:
        return None, None, None, ["status %s: %s" % (st.status, st.body[:300])]
    ctype = st.headers.get("content-type", "")
    if not ctype.startswith("text/event-stream"):
        problems.append("Content-Type %r, not text/event-stream" % ctype)
    datas = [d for _, d in st.events]
    if not datas or datas[-1] != "[DONE]":
        problems.append("the last event is %r, not [DONE]" % (datas[-1][:100] if datas else
                                                              None))
    if datas.count("[DONE]") > 1:
        problems.append("[DONE] %d times" % datas.count("[DONE]"))
    chunks = []
    for d in datas:
        if d == "[DONE]":
            continue
        try:
            chunks.append(json.loads(d))
        except ValueError:
            problems.append("a chunk is not JSON: %r" % d[:200])
    text, finish, usage, ids, role_seen = [], [], None, set(), False
    want_obj = "chat.completion.chunk" if chat else "text_completion"
    for i, c in enumerate(chunks):
        if c.get("object") != want_obj:
            problems.append("chunk %d: object %r, expected %r" % (i, c.get("object"), want_obj))
        ids.add(c.get("id"))
        choices = c.get("choices")
        if not isinstance(choices, list):
            problems.append("chunk %d: no choices list" % i)
            continue
        if not choices:
            if c.get("usage") is None:
                problems.append("chunk %d: empty choices and no usage" % i)
            usage = c.get("usage")
            if i != len(chunks) - 1:
                problems.append("the usage chunk (%d) is not the last before [DONE]" % i)
            continue
        if len(choices) != 1 or choices[0].get("index") != 0:
            problems.append("chunk %d: choices %r" % (i, choices))
        ch = choices[0]
        if finish:
            problems.append("chunk %d comes after the chunk with finish_reason" % i)
        if chat:
            delta = ch.get("delta")
            if not isinstance(delta, dict):
                problems.append("chunk %d: no delta" % i)
                continue
            if delta.get("role") is not None:
                if delta.get("role") != "assistant" or role_seen:
                    problems.append("chunk %d: role %r" % (i, delta.get("role")))
                role_seen = True
            piece = delta.get("content")
        else:
            piece = ch.get("text")
        if piece is not None and not isinstance(piece, str):
            problems.append("chunk %d: the text is %r" % (i, piece))
        text.append(piece or "")
        if ch.get("finish_reason") is not None:
            finish.append(ch["finish_reason"])
    if chat and chunks and not role_seen:
        problems.append("no chunk has delta.role 'assistant'")
    if len(ids) > 1:
        problems.append("chunk ids differ: %s" % sorted(map(str, ids))[:4])
    if len(finish) != 1:
        problems.append("%d chunks with a finish_reason: %s" % (len(finish), finish))
    if include_usage and usage is None:
        problems.append("stream_options.include_usage: no usage chunk with empty choices")
    if not include_usage and usage is not None:
        problems.append("a usage chunk without stream_options.include_usage")
    return "".join(text), finish[0] if finish else None, usage, problems


def completion_from_json(r, chat):
    """Checks a plain response; returns (text, finish_reason, usage, problems)."""
    if r.status != 200 or not isinstance(r.json, dict):
        return None, None, None, ["%r" % r]
    j, problems = r.json, []
    if not r.headers.get("content-type", "").startswith("application/json"):
        problems.append("Content-Type %r" % r.headers.get("content-type"))
    want_obj = "chat.completion" if chat else "text_completion"
    if j.get("object") != want_obj:
        problems.append("object %r, expected %r" % (j.get("object"), want_obj))
    for k in ("id", "created", "model", "choices", "usage"):
        if k not in j:
            problems.append("no %r" % k)
    choices = j.get("choices") or [{}]
    if len(choices) != 1 or choices[0].get("index") != 0:
        problems.append("choices %r" % choices)
    ch = choices[0]
    if chat:
        msg = ch.get("message") or {}
        if msg.get("role") != "assistant":
            problems.append("message.role %r" % msg.get("role"))
        text = msg.get("content")
    else:
        text = ch.get("text")
    usage = j.get("usage")
    if isinstance(usage, dict):
        if usage.get("total_tokens") != (usage.get("prompt_tokens") or 0) + (
                usage.get("completion_tokens") or 0):
            problems.append("usage does not add up: %r" % usage)
    return text, ch.get("finish_reason"), usage, problems


def error_problems(r, status, param="-", code="-", etype="invalid_request_error"):
    """What is wrong with an error response against the contract; [] when nothing."""
    p = []
    if r.status != status:
        p.append("status %s, expected %d" % (r.status, status))
    e = r.json.get("error") if isinstance(r.json, dict) else None
    if not isinstance(e, dict):
        return p + ["the body is not {\"error\": {...}}: %r" % r.body[:300]]
    for k in ("message", "type", "param", "code"):
        if k not in e:
            p.append("error.%s missing" % k)
    if not isinstance(e.get("message"), str) or not e.get("message"):
        p.append("error.message %r" % e.get("message"))
    if etype is not None and e.get("type") != etype:
        p.append("error.type %r, expected %r" % (e.get("type"), etype))
    # the field itself, or a path into it as OpenAI writes them ("messages[0].role")
    got = e.get("param")
    if param != "-" and got != param and not (
            param and isinstance(got, str) and got.startswith((param + "[", param + "."))):
        p.append("error.param %r, expected %r" % (got, param))
    if code != "-" and e.get("code") != code:
        p.append("error.code %r, expected %r" % (e.get("code"), code))
    ctype = r.headers.get("content-type", "")
    if not ctype.startswith("application/json"):
        p.append("Content-Type %r" % ctype)
    return p


# ---- /metrics --------------------------------------------------------------------------

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+-?\d+)?$')
LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


class Metrics:
    def __init__(self, text):
        self.text = text
        self.samples = {}      # (name, frozenset(labels)) -> value
        self.types, self.helps, self.problems = {}, {}, []
        for n, line in enumerate(text.split("\n")):
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                parts = line.split(" ", 3)
                if len(parts) < 4:
                    self.problems.append("line %d: %r" % (n + 1, line))
                    continue
                (self.helps if parts[1] == "HELP" else self.types)[parts[2]] = parts[3]
                continue
            if line.startswith("#"):
                continue
            m = SAMPLE_RE.match(line)
            if not m:
                self.problems.append("line %d is not a sample: %r" % (n + 1, line))
                continue
            name, labels = m.group(1), {}
            if m.group(2):
                rest = m.group(2)[1:-1]
                while rest.strip():
                    lm = LABEL_RE.match(rest)
                    if not lm:
                        self.problems.append("line %d: bad labels %r" % (n + 1, m.group(2)))
                        break
                    labels[lm.group(1)] = lm.group(2)
                    rest = rest[lm.end():]
            try:
                value = float(m.group(3))
            except ValueError:
                self.problems.append("line %d: value %r" % (n + 1, m.group(3)))
                continue
            if name not in self.types:
                self.problems.append("line %d: sample of %s before (or without) its # TYPE" % (
                    n + 1, name))
            self.samples[(name, frozenset(labels.items()))] = value
        if text and not text.endswith("\n"):
            self.problems.append("the text does not end with a newline")

    def get(self, name, **labels):
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name, **labels):
        """Sum over the samples of name whose labels include these."""
        return sum(v for (n, ls), v in self.samples.items()
                   if n == name and set(labels.items()) <= set(ls))


def metrics(port):
    r = request(port, "GET", "/metrics")
    if r.status != 200:
        raise RuntimeError("GET /metrics: %r" % r)
    m = Metrics(r.body.decode("utf-8"))
    m.content_type = r.headers.get("content-type", "")
    return m


def wait_metrics(port, pred, timeout):
    """Polls /metrics until pred(m) holds; returns (held, seconds, last metrics)."""
    t0 = time.monotonic()
    while True:
        m = metrics(port)
        if pred(m):
            return True, time.monotonic() - t0, m
        if time.monotonic() - t0 > timeout:
            return False, time.monotonic() - t0, m
        time.sleep(0.05)


def idle(m):
    return m.get("ferry_active_sequences") == 0 and m.get("ferry_queue_depth") == 0


# ---- the reference: ferry run ----------------------------------------------------------

def eos_ids(model):
    ids = set()
    for name in ("config.json", "generation_config.json"):
        try:
            with open(os.path.join(model, name)) as f:
                e = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    try:
        with open(os.path.join(model, "tokenizer_config.json")) as f:
            tok = json.load(f).get("eos_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        with open(os.path.join(model, "tokenizer.json")) as f:
            for a in json.load(f).get("added_tokens", []):
                if a.get("content") == tok:
                    ids.add(a["id"])
    except (OSError, ValueError):
        pass
    return ids


class Baselines:
    """`ferry run MODEL -p PROMPT -n N --json` (with --chat for chat), cached."""

    def __init__(self):
        self.cache = {}
        self.lock = threading.Lock()
        self.eos = {}

    def get(self, model, prompt, n, ignore_eos=False, chat=False, template=None):
        key = (model, prompt, n, ignore_eos, chat, template)
        with self.lock:
            if key in self.cache:
                return self.cache[key]
        cmd = [FERRY, "run", model, "-p", prompt, "-n", str(n), "--json"]
        if ignore_eos:
            cmd.append("--ignore-eos")
        if chat:
            cmd.append("--chat")
            if template:
                cmd += ["--chat-template", template]
        p = subprocess.run(cmd, capture_output=True, timeout=600 * SLOW)
        if p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (" ".join(cmd), p.returncode,
                                                         p.stderr.decode()[-2000:]))
        j = json.loads(p.stdout.decode("utf-8"))
        if model not in self.eos:
            self.eos[model] = eos_ids(model)
        ids = j["ids"]
        stopped = not ignore_eos and (len(ids) < n or (ids and ids[-1] in self.eos[model]))
        b = {"text": j["text"], "ids": ids, "prompt_ids": j["prompt_ids"],
             "finish": "stop" if stopped else "length", "cmd": " ".join(cmd)}
        with self.lock:
            self.cache[key] = b
        return b

    def prefetch(self, keys):
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as ex:
            list(ex.map(lambda k: self.get(*k), keys))


BASE = Baselines()


def tokens_ok(usage, base, expect_finish):
    """usage against the baseline: prompt tokens exactly; completion tokens exactly, or one
    fewer when the sequence ended with EOS (whether EOS counts is the server's choice)."""
    if not isinstance(usage, dict):
        return False
    n = len(base["ids"])
    ok_c = usage.get("completion_tokens") == n or (
        expect_finish == "stop" and usage.get("completion_tokens") == n - 1)
    return usage.get("prompt_tokens") == len(base["prompt_ids"]) and ok_c


def stop_string_in(text, after):
    """A stop string that occurs in text, starting mid-word after position `after` (so that
    it probably starts inside a token), and its first index."""
    for k in range(after, len(text) - 6):
        if text[k].isalpha() and text[k - 1].isalpha() and " " in text[k:k + 6]:
            s = text[k:k + 5]
            return s, text.find(s)
    s = text[len(text) // 2:len(text) // 2 + 3]
    return s, text.find(s)


# ---- the sections ----------------------------------------------------------------------

CODE_PROMPTS = ["def fibonacci(n):", "import numpy as np\n",
                "class Stack:\n    def __init__(self):", "def quicksort(arr):",
                "for i in range(10):", "    return x\n",
                "if __name__ == \"__main__\":\n    main()\n", "# Utility functions for parsing\n",
                "s = 'h\u00e9llo w\u00f6rld \u2713'\n"]
# long prompts (several hundred tokens): pending together they compete for a step's budget
with open(os.path.join(ROOT, "tests", "fixtures", "heldout-python.txt"), encoding="utf-8") as _f:
    _HELD = _f.read()
LONG_PROMPTS = [_HELD[2000:3400], _HELD[9000:10200], _HELD[16000:17600]]
CHAT_PROMPTS = ["Write a function that adds two numbers.", "def merge(a, b):",
                "Explain recursion in one line."]
EOS_NOW = "if __name__ == \"__main__\":\n    main()\n"     # greedy EOS at once on tiny-moe-code
EOS_LATER = "    return x\n"                               # greedy EOS after ~400 tokens


def sec_cli(rep):
    p = subprocess.run([FERRY, "serve", "--help"], capture_output=True, timeout=60)
    out = (p.stdout + p.stderr).decode()
    missing = [o for o in ("--host", "--port", "--api-key", "--max-seqs", "--max-queue", "--ctx",
                           "--max-tokens-default", "--chat-template", "--served-model-name",
                           "--max-body") if o not in out]
    rep.check(p.returncode == 0 and not missing, "ferry serve --help exits 0 and names the options",
              "ferry serve --help", "exit 0, all options", "exit %d, missing %s" % (
                  p.returncode, missing))
    for args, what in ((["/nonexistent/model"], "a missing model folder"),
                       ([MODEL, "--bogus-option"], "an unknown option"),
                       ([MODEL, "--port", "notaport"], "a bad --port")):
        try:
            p = subprocess.run([FERRY, "serve", *args], capture_output=True, timeout=60 * SLOW)
            rc, err = p.returncode, p.stderr.decode()
        except subprocess.TimeoutExpired:
            rc, err = "still running after %.0f s" % (60 * SLOW), ""
        rep.check(isinstance(rc, int) and rc != 0 and err.strip(),
                  "ferry serve with %s fails with a message" % what,
                  "ferry serve " + " ".join(args), "nonzero exit, a message on stderr",
                  "exit %s, stderr %r" % (rc, err[-300:]))


def sec_basics(rep, srv, model_id):
    port = srv.port
    rep.check(srv.listen_line == "ferry serve: listening on http://127.0.0.1:%d" % port,
              "the listening line on stderr", " ".join(srv.cmd),
              "ferry serve: listening on http://127.0.0.1:PORT", srv.listen_line)
    r = request(port, "GET", "/health")
    rep.check(r.status == 200 and r.json == {"status": "ok"}, "GET /health", "GET /health",
              '200 {"status":"ok"}', r)
    r = request(port, "GET", "/v1/models")
    data = (r.json or {}).get("data") if isinstance(r.json, dict) else None
    ok = r.status == 200 and r.json.get("object") == "list" and isinstance(data, list) and \
        len(data) == 1 and data[0].get("id") == model_id and data[0].get("object") == "model"
    rep.check(ok, "GET /v1/models lists %r" % model_id, "GET /v1/models",
              '{"object":"list","data":[{"id":"%s","object":"model",...}]}' % model_id, r)
    # keep-alive: two requests on one connection
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQ_TIMEOUT)
    try:
        st = []
        for _ in range(2):
            conn.request("GET", "/health")
            rr = conn.getresponse()
            rr.read()
            st.append(rr.status)
    except (OSError, http.client.HTTPException) as e:
        st.append(repr(e))
    finally:
        conn.close()
    rep.check(st == [200, 200], "two requests on one keep-alive connection",
              "GET /health twice on one connection", [200, 200], st)


def sec_completions(rep, srv, model_id):
    port = srv.port
    prompt, n = "def fibonacci(n):", 32
    base = BASE.get(MODEL, prompt, n)
    body = {"model": model_id, "prompt": prompt, "max_tokens": n, "temperature": 0}
    m0 = metrics(port)
    r = post(port, "/v1/completions", body)
    text, finish, usage, probs = completion_from_json(r, chat=False)
    rep.check(not probs, "completion: the response's shape", describe("POST", "/v1/completions",
              body), "a text_completion object", probs)
    rep.check(text == base["text"], "completion: the greedy text is ferry run's",
              describe("POST", "/v1/completions", body), base["text"], text)
    rep.check(finish == base["finish"] and r.json.get("model") == model_id,
              "completion: finish_reason %r, model %r" % (base["finish"], model_id),
              describe("POST", "/v1/completions", body), base["finish"], r)
    rep.check(tokens_ok(usage, base, base["finish"]),
              "completion: usage counts the prompt with BOS (%d) and the %d tokens" % (
                  len(base["prompt_ids"]), len(base["ids"])),
              describe("POST", "/v1/completions", body), {"prompt_tokens": len(
                  base["prompt_ids"]), "completion_tokens": len(base["ids"])}, usage)
    m1 = metrics(port)
    for name, want in (("ferry_prompt_tokens_total", len(base["prompt_ids"])),
                       ("ferry_generated_tokens_total", len(base["ids"]))):
        d = m1.total(name) - m0.total(name)
        rep.check(d == want, "/metrics %s grows by the request's %d" % (name, want),
                  "GET /metrics around one completion", want, d)
    d = m1.get("ferry_requests_total", endpoint="/v1/completions", status="200") or 0
    d -= m0.get("ferry_requests_total", endpoint="/v1/completions", status="200") or 0
    rep.check(d == 1, "/metrics ferry_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"
              " grows by 1", "GET /metrics around one completion", 1, d)

    # no model field, seed, top_k/top_p with temperature 0, prompt as ids: the same text
    variants = [
        ("no \"model\"", {"prompt": prompt, "max_tokens": n, "temperature": 0}),
        ("seed, top_k, top_p at temperature 0", dict(body, seed=7, top_k=5, top_p=0.5)),
        ("the prompt as token ids", dict(body, prompt=base["prompt_ids"])),
        ("\"stop\": [] and logit_bias {}", dict(body, stop=[], logit_bias={})),
        ("presence/frequency_penalty 0", dict(body, presence_penalty=0, frequency_penalty=0.0)),
        ("n: 1", dict(body, n=1)),
    ]
    for what, b in variants:
        r = post(port, "/v1/completions", b)
        t, f, u, probs = completion_from_json(r, chat=False)
        rep.check(not probs and t == base["text"] and f == base["finish"],
                  "completion with %s: the same text" % what, describe("POST", "/v1/completions",
                                                                       b), base["text"],
                  probs or t)
    # EOS: at once, and after ~400 tokens; ignore_eos runs past it
    for prompt2, n2, ign in ((EOS_NOW, 16, False), (EOS_LATER, 500, False), (EOS_NOW, 12, True)):
        b2 = BASE.get(MODEL, prompt2, n2, ignore_eos=ign)
        body2 = {"prompt": prompt2, "max_tokens": n2, "temperature": 0, "ignore_eos": ign}
        r = post(port, "/v1/completions", body2)
        t, f, u, probs = completion_from_json(r, chat=False)
        rep.check(not probs and t == b2["text"] and f == b2["finish"] and tokens_ok(u, b2, f),
                  "completion ending by %s after %d tokens: text, finish_reason %r, usage" % (
                      "EOS" if b2["finish"] == "stop" else "length", len(b2["ids"]), b2["finish"]),
                  describe("POST", "/v1/completions", body2),
                  {"text": short(b2["text"], 200), "finish": b2["finish"],
                   "completion_tokens": len(b2["ids"])},
                  probs or {"text": short(t or "", 200), "finish": f, "usage": u})
    # sampling: a seed repeats itself (not in the contract: a note only)
    sb = {"prompt": prompt, "max_tokens": 24, "temperature": 0.9, "seed": 1234, "top_p": 0.95}
    texts = [completion_from_json(post(port, "/v1/completions", sb), False)[0] for _ in range(2)]
    other = completion_from_json(post(port, "/v1/completions", dict(sb, seed=99)), False)[0]
    if texts[0] is None or texts[0] != texts[1]:
        rep.note("the same seeded sampled request twice gave different texts: %r / %r" % tuple(
            texts))
    if texts[0] == other == BASE.get(MODEL, prompt, 24)["text"]:
        rep.note("temperature 0.9 gave the greedy text for two seeds (is temperature used?)")
    rep.check(all(isinstance(t, str) for t in texts + [other]),
              "sampled completions (temperature 0.9, top_p, seed) answer", describe(
                  "POST", "/v1/completions", sb), "200", texts + [other])


def sec_streaming(rep, srv, model_id):
    port = srv.port
    prompt, n = "class Stack:\n    def __init__(self):", 40
    base = BASE.get(MODEL, prompt, n)
    body = {"model": model_id, "prompt": prompt, "max_tokens": n, "temperature": 0}
    plain = completion_from_json(post(port, "/v1/completions", body), False)[0]
    for incl in (False, True):
        b = dict(body, stream=True)
        if incl:
            b["stream_options"] = {"include_usage": True}
        st = stream(port, "/v1/completions", b)
        text, finish, usage, probs = completion_from_stream(st, chat=False, include_usage=incl)
        rep.check(not probs, "completion stream%s: chunks well-formed, [DONE] last" % (
            " with include_usage" if incl else ""), describe("POST", "/v1/completions", b),
            "no problems", probs)
        rep.check(text == base["text"] == plain and finish == base["finish"],
                  "completion stream: the text (%d events) is the plain response's and ferry "
                  "run's" % len(st.events), describe("POST", "/v1/completions", b),
                  base["text"], text)
        if incl:
            rep.check(tokens_ok(usage, base, finish), "completion stream: the usage chunk counts",
                      describe("POST", "/v1/completions", b), {"prompt_tokens": len(
                          base["prompt_ids"]), "completion_tokens": len(base["ids"])}, usage)
        rep.check(len(st.events) >= 4, "completion stream: streamed in pieces, not at once",
                  describe("POST", "/v1/completions", b), ">= 4 events", len(st.events))
    # chat, plain and streamed, against ferry run --chat
    user, n = CHAT_PROMPTS[1], 32
    cb = BASE.get(MODEL, user, n, chat=True, template=TEMPLATE)
    body = {"model": model_id, "messages": [{"role": "user", "content": user}], "max_tokens": n,
            "temperature": 0}
    r = post(port, "/v1/chat/completions", body)
    text, finish, usage, probs = completion_from_json(r, chat=True)
    rep.check(not probs and text == cb["text"] and finish == cb["finish"],
              "chat (template file): the text is ferry run --chat's",
              describe("POST", "/v1/chat/completions", body), cb["text"], probs or text)
    rep.check(tokens_ok(usage, cb, finish), "chat: usage.prompt_tokens %d (the rendered "
              "template)" % len(cb["prompt_ids"]), describe("POST", "/v1/chat/completions", body),
              {"prompt_tokens": len(cb["prompt_ids"]), "completion_tokens": len(cb["ids"])}, usage)
    b = dict(body, stream=True, stream_options={"include_usage": True})
    st = stream(port, "/v1/chat/completions", b)
    stext, sfinish, susage, probs = completion_from_stream(st, chat=True, include_usage=True)
    rep.check(not probs and stext == cb["text"] and sfinish == cb["finish"] and susage == usage,
              "chat stream: well-formed, role first, the same text, finish and usage",
              describe("POST", "/v1/chat/completions", b),
              {"text": cb["text"], "finish": cb["finish"], "usage": usage},
              probs or {"text": stext, "finish": sfinish, "usage": susage})
    for what, b in (("max_completion_tokens", {"messages": body["messages"],
                                               "max_completion_tokens": n, "temperature": 0}),
                    ("content as one text part", dict(body, messages=[
                        {"role": "user", "content": [{"type": "text", "text": user}]}]))):
        t, f, _, probs = completion_from_json(post(port, "/v1/chat/completions", b), True)
        rep.check(not probs and t == cb["text"], "chat with %s: the same text" % what,
                  describe("POST", "/v1/chat/completions", b), cb["text"], probs or t)
    # multi-turn: the rendered conversation tokenized alone, sent as ids to /v1/completions
    msgs = [{"role": "user", "content": "def add(a, b):"},
            {"role": "assistant", "content": "    return a + b"},
            {"role": "user", "content": "def sub(a, b):"}]
    rendered = "<s>[INST] def add(a, b): [/INST]    return a + b</s>[INST] def sub(a, b): [/INST]"
    p = subprocess.run([FERRY, "tokenize", MODEL, "-p", rendered, "--no-special", "--json"],
                       capture_output=True, timeout=60 * SLOW)
    if p.returncode != 0:
        rep.check(False, "ferry tokenize for the multi-turn chat", "ferry tokenize", "exit 0",
                  p.stderr.decode()[-500:])
        return
    ids = json.loads(p.stdout)["ids"]
    bm = {"messages": msgs, "max_tokens": 24, "temperature": 0}
    rc = post(port, "/v1/chat/completions", bm)
    t1, _, u1, probs1 = completion_from_json(rc, True)
    bi = {"prompt": ids, "max_tokens": 24, "temperature": 0}
    t2, _, u2, probs2 = completion_from_json(post(port, "/v1/completions", bi), False)
    rep.check(not probs1 and not probs2 and t1 == t2 and u1 and
              u1.get("prompt_tokens") == len(ids),
              "multi-turn chat equals the completion of the rendered template's %d ids" % len(ids),
              describe("POST", "/v1/chat/completions", bm), {"text": t2, "prompt_tokens": len(ids)},
              probs1 + probs2 or {"text": t1, "usage": u1})


def sec_stop(rep, srv, model_id):
    port = srv.port
    prompt, n = "def fibonacci(n):", 48
    base = BASE.get(MODEL, prompt, n)
    s, _ = stop_string_in(base["text"], len(base["text"]) // 3)
    cases = [(s, "a stop string starting mid-token %r" % s),
             (["\u00a7never\u00a7", s], "a list of two"),
             ("\n", "a stop string at the first character")]
    for stop, what in cases:
        first = min(base["text"].find(x) for x in ([stop] if isinstance(stop, str) else stop)
                    if base["text"].find(x) >= 0)
        exp = base["text"][:first]
        body = {"model": model_id, "prompt": prompt, "max_tokens": n, "temperature": 0,
                "stop": stop}
        t, f, u, probs = completion_from_json(post(port, "/v1/completions", body), False)
        rep.check(not probs and t == exp and f == "stop", "stop (%s): text cut before it, "
                  "finish_reason stop" % what, describe("POST", "/v1/completions", body),
                  {"text": exp, "finish": "stop"}, probs or {"text": t, "finish": f})
        b = dict(body, stream=True)
        st = stream(port, "/v1/completions", b)
        t, f, u, probs = completion_from_stream(st, chat=False)
        rep.check(not probs and t == exp and f == "stop", "stop (%s), streamed: the same" % what,
                  describe("POST", "/v1/completions", b), {"text": exp, "finish": "stop"},
                  probs or {"text": t, "finish": f})
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stop": ["\u00a7nope", "zzqx"]}
    t, f, _, probs = completion_from_json(post(port, "/v1/completions", body), False)
    rep.check(not probs and t == base["text"] and f == "length",
              "stop strings that never occur: the whole text, finish_reason length",
              describe("POST", "/v1/completions", body), base["text"], probs or t)
    # chat with a stop string
    cb = BASE.get(MODEL, CHAT_PROMPTS[0], 32, chat=True, template=TEMPLATE)
    if len(cb["text"]) > 8:
        s, idx = stop_string_in(cb["text"], 2)
        body = {"messages": [{"role": "user", "content": CHAT_PROMPTS[0]}], "max_tokens": 32,
                "temperature": 0, "stop": [s]}
        t, f, _, probs = completion_from_json(post(port, "/v1/chat/completions", body), True)
        st = stream(port, "/v1/chat/completions", dict(body, stream=True))
        t2, f2, _, probs2 = completion_from_stream(st, chat=True)
        rep.check(not probs and not probs2 and t == t2 == cb["text"][:idx] and f == f2 == "stop",
                  "chat stop %r, plain and streamed" % s, describe("POST", "/v1/chat/completions",
                                                                  body),
                  {"text": cb["text"][:idx], "finish": "stop"},
                  probs + probs2 or {"plain": t, "stream": t2, "finish": [f, f2]})
    else:
        rep.check(False, "chat stop: the baseline chat text is long enough to pick a stop string",
                  cb["cmd"], "> 8 characters", cb["text"])


def sec_errors(rep, srv, model_id):
    port = srv.port
    C, CH = "/v1/completions", "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    good_c = {"prompt": "def f():", "max_tokens": 4, "temperature": 0}
    good_ch = {"messages": msgs, "max_tokens": 4, "temperature": 0}
    cases = [  # path, body, param, code, what
        (C, "{\"prompt\": \"x\",", None, "-", "malformed JSON"),
        (C, "[1, 2]", None, "-", "a JSON array body"),
        (C, {"max_tokens": 4}, "prompt", "-", "no prompt"),
        (C, dict(good_c, prompt=5), "prompt", "-", "prompt a number"),
        (C, dict(good_c, prompt=[1, "a"]), "prompt", "-", "prompt ids with a string"),
        (C, dict(good_c, max_tokens="ten"), "max_tokens", "-", "max_tokens a string"),
        (C, dict(good_c, max_tokens=2.5), "max_tokens", "-", "max_tokens 2.5"),
        (C, dict(good_c, max_tokens=-1), "max_tokens", "-", "max_tokens -1"),
        (C, dict(good_c, temperature="hot"), "temperature", "-", "temperature a string"),
        (C, dict(good_c, temperature=-0.5), "temperature", "-", "temperature -0.5"),
        (C, dict(good_c, top_p=1.5), "top_p", "-", "top_p 1.5"),
        (C, dict(good_c, top_k="5"), "top_k", "-", "top_k a string"),
        (C, dict(good_c, stream="yes"), "stream", "-", "stream a string"),
        (C, dict(good_c, seed="x"), "seed", "-", "seed a string"),
        (C, dict(good_c, stop=5), "stop", "-", "stop a number"),
        (C, dict(good_c, stop=["a", "b", "c", "d", "e"]), "stop", "-", "five stop strings"),
        (C, dict(good_c, n=2), "n", "-", "n 2"),
        (C, dict(good_c, logit_bias={"50": 10}), "logit_bias", "-", "a logit_bias"),
        (C, dict(good_c, presence_penalty=0.5), "presence_penalty", "-", "presence_penalty"),
        (C, dict(good_c, frequency_penalty=-1), "frequency_penalty", "-", "frequency_penalty"),
        (C, dict(good_c, model=7), "model", "-", "model a number"),
        (CH, {"max_tokens": 4}, "messages", "-", "no messages"),
        (CH, dict(good_ch, messages="hi"), "messages", "-", "messages a string"),
        (CH, dict(good_ch, messages=[]), "messages", "-", "messages empty"),
        (CH, dict(good_ch, messages=[{"content": "hi"}]), "messages", "-",
         "a message without role"),
        (CH, dict(good_ch, messages=[{"role": "user", "content": 5}]), "messages", "-",
         "content a number"),
        (CH, dict(good_ch, n=3), "n", "-", "chat n 3"),
        (CH, dict(good_ch, tools=[{"type": "function", "function": {"name": "f",
                                                                      "parameters": {}}}]),
         "tools", "-", "tools"),
        (CH, dict(good_ch, logit_bias={"1": -100}), "logit_bias", "-", "chat logit_bias"),
        (CH, dict(good_ch, max_completion_tokens="x"), "max_completion_tokens", "-",
         "max_completion_tokens a string"),
        (CH, dict(good_ch, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]),
         "messages", "-", "an image content part"),
    ]
    for path, body, param, code, what in cases:
        r = post(port, path, body)
        probs = error_problems(r, 400, param=param, code=code)
        rep.check(not probs, "400 for %s (param %r)" % (what, param),
                  describe("POST", path, body), "400 invalid_request_error param %r" % param,
                  probs + ["%r" % r] if probs else "")
    m = metrics(port)
    rep.check((m.get("ferry_requests_total", endpoint="/v1/completions", status="400") or 0) >= 21
              and (m.get("ferry_requests_total", endpoint="/v1/chat/completions",
                         status="400") or 0) >= 10,
              "/metrics counts the 400s per endpoint", "GET /metrics",
              ">= 21 completions and >= 10 chat 400s",
              [l for l in m.text.split("\n") if l.startswith("ferry_requests_total")])
    # the model
    for path, body in ((C, dict(good_c, model="gpt-4")), (CH, dict(good_ch, model="other"))):
        r = post(port, path, body)
        probs = error_problems(r, 404, code="model_not_found", etype=None)
        rep.check(not probs, "404 model_not_found for model %r" % body["model"],
                  describe("POST", path, body), "404 code model_not_found", probs + ["%r" % r]
                  if probs else "")
    r = post(port, C, dict(good_c, model=model_id))
    rep.check(r.status == 200, "the model named %r is accepted" % model_id,
              describe("POST", C, dict(good_c, model=model_id)), 200, r)
    # paths and methods
    for method, path, status in (("GET", "/nope", 404), ("POST", "/v1/nothing", 404),
                                 ("GET", "/v1/completions", 405), ("GET", CH, 405),
                                 ("POST", "/health", 405), ("POST", "/v1/models", 405),
                                 ("DELETE", "/v1/models", 405), ("PUT", C, 405)):
        r = request(port, method, path, {} if method in ("POST", "PUT") else None)
        probs = error_problems(r, status, etype=None)
        rep.check(not probs, "%d for %s %s" % (status, method, path), describe(method, path),
                  "%d with an error object" % status, probs + ["%r" % r] if probs else "")
    # the 1 MiB default body limit: just over it 413, just under it not
    over = json.dumps({"prompt": "x" * (MIB + 16), "max_tokens": 1}).encode()
    r = raw_post(port, C, over)
    probs = error_problems(r, 413, etype=None) if isinstance(r, Resp) else [r]
    rep.check(not probs, "413 for a %d-byte body (over 1 MiB)" % len(over),
              "POST %s (%d bytes)" % (C, len(over)), "413 with an error object", probs)
    under = json.dumps({"prompt": "x = 1 " * 174000, "max_tokens": 1}).encode()
    r = raw_post(port, C, under)
    rep.check(isinstance(r, Resp) and r.status == 400 and error_problems(
        r, 400, code="context_length_exceeded") == [],
        "a %d-byte body (under 1 MiB) is read; its prompt exceeds the context" % len(under),
        "POST %s (%d bytes)" % (C, len(under)), "400 context_length_exceeded", r)
    r = request(port, "GET", "/health")
    rep.check(r.status == 200, "the server answers after the errors", "GET /health", 200, r)


def raw_post(port, path, data):
    """POST over a raw socket, sending the body even if the server answers early (413)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=REQ_TIMEOUT)
    try:
        s.sendall(("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   "Content-Length: %d\r\nConnection: close\r\n\r\n" % (path, len(data))).encode())
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = b""
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            buf += c
    finally:
        s.close()
    if not buf:
        return "no response at all"
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d+)", lines[0])
    if not m:
        return "not an HTTP response: %r" % buf[:200]
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        out = b""
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += body[:size]
            body = body[size + 2:]
        body = out
    return Resp(int(m.group(1)), headers, body)


def sec_small_ctx(rep):
    """--ctx 64, --max-body, --served-model-name; stopped with SIGINT."""
    srv = Server(MODEL, "--ctx", "64", "--max-body", "4096", "--served-model-name", "tiny-code",
                 "--chat-template", TEMPLATE)
    try:
        port = srv.port
        r = request(port, "GET", "/v1/models")
        ids = [d.get("id") for d in (r.json or {}).get("data", [])] if r.status == 200 else r
        rep.check(ids == ["tiny-code"], "--served-model-name: /v1/models lists it",
                  "GET /v1/models", ["tiny-code"], ids)
        prompt = "def fibonacci(n):"
        P = len(BASE.get(MODEL, prompt, 1)["prompt_ids"])
        ok = {"model": "tiny-code", "prompt": prompt, "max_tokens": 64 - P, "temperature": 0,
              "ignore_eos": True}
        base = BASE.get(MODEL, prompt, 64 - P, ignore_eos=True)
        t, f, u, probs = completion_from_json(post(port, "/v1/completions", ok), False)
        rep.check(not probs and t == base["text"] and f == "length",
                  "--ctx 64: prompt %d + max_tokens %d = 64 is accepted, text as ferry run" % (
                      P, 64 - P), describe("POST", "/v1/completions", ok), base["text"],
                  probs or t)
        for mt in (64 - P + 1, 1000):
            bad = dict(ok, max_tokens=mt)
            r = post(port, "/v1/completions", bad)
            probs = error_problems(r, 400, code="context_length_exceeded")
            msg = ((r.json or {}).get("error") or {}).get("message", "") if isinstance(
                r.json, dict) else ""
            nums = re.findall(r"\d+", msg or "")
            if not probs and not (str(P) in nums and str(mt) in nums):
                probs.append("the message does not name the prompt's %d tokens and max_tokens "
                             "%d: %r" % (P, mt, msg))
            rep.check(not probs, "--ctx 64: prompt %d + max_tokens %d: 400 "
                      "context_length_exceeded naming both" % (P, mt),
                      describe("POST", "/v1/completions", bad),
                      "400 code context_length_exceeded, %d and %d in the message" % (P, mt),
                      probs + ["%r" % r] if probs else "")
        long_prompt = "x = 1\n" * 40
        bad = {"prompt": long_prompt, "max_tokens": 1}
        r = post(port, "/v1/completions", bad)
        rep.check(not error_problems(r, 400, code="context_length_exceeded"),
                  "--ctx 64: a prompt longer than the context alone: 400",
                  describe("POST", "/v1/completions", bad), "400 context_length_exceeded", r)
        # max_tokens absent: until EOS or the context's end
        nb = {"prompt": prompt, "temperature": 0, "ignore_eos": True}
        t, f, u, probs = completion_from_json(post(port, "/v1/completions", nb), False)
        rep.check(not probs and f == "length" and u and u.get("completion_tokens") == 64 - P and
                  t == base["text"], "max_tokens absent: generates to the context's end (%d "
                  "tokens)" % (64 - P), describe("POST", "/v1/completions", nb),
                  {"completion_tokens": 64 - P, "finish": "length"}, probs or {"usage": u,
                                                                             "finish": f})
        cb = BASE.get(MODEL, CHAT_PROMPTS[0], 4, chat=True, template=TEMPLATE)
        Pc = len(cb["prompt_ids"])
        bad = {"messages": [{"role": "user", "content": CHAT_PROMPTS[0]}],
               "max_completion_tokens": 64 - Pc + 1}
        r = post(port, "/v1/chat/completions", bad)
        rep.check(not error_problems(r, 400, code="context_length_exceeded"),
                  "--ctx 64: chat of %d prompt tokens + max_completion_tokens %d: 400" % (
                      Pc, 64 - Pc + 1), describe("POST", "/v1/chat/completions", bad),
                  "400 context_length_exceeded", r)
        # --max-body 4096
        body = json.dumps({"prompt": "y" * 5000, "max_tokens": 1}).encode()
        r = raw_post(port, "/v1/completions", body)
        probs = error_problems(r, 413, etype=None) if isinstance(r, Resp) else [r]
        rep.check(not probs, "--max-body 4096: a %d-byte body gets 413" % len(body),
                  "POST /v1/completions (%d bytes)" % len(body), 413, probs)
        r = post(port, "/v1/completions", {"prompt": "z" * 3000, "max_tokens": 1})
        rep.check(r.status != 413, "--max-body 4096: a 3 KB body does not",
                  "POST /v1/completions (3 KB)", "not 413", r)
        for mname in ("tiny-moe-code", "gpt-3.5-turbo"):
            b = dict(ok, model=mname, max_tokens=2)
            r = post(port, "/v1/completions", b)
            if mname == "gpt-3.5-turbo":
                rep.check(not error_problems(r, 404, code="model_not_found", etype=None),
                          "--served-model-name: another model name gets 404",
                          describe("POST", "/v1/completions", b), "404 model_not_found", r)
            elif r.status != 200:
                rep.note("with --served-model-name tiny-code, model 'tiny-moe-code' (the "
                         "folder's name) gets %d" % r.status)
    finally:
        stop_checked(rep, srv, "--ctx 64 server", signal.SIGINT)


def sec_auth(rep):
    key, key2 = "sk-test-abc123", "env-key-789"
    for how, args, env, k in (("--api-key", ["--api-key", key, "--chat-template", TEMPLATE],
                               None, key),
                              ("$FERRY_API_KEY", [], {"FERRY_API_KEY": key2}, key2)):
        srv = Server(MODEL, *args, env=env)
        try:
            port = srv.port
            body = {"prompt": "def f():", "max_tokens": 3, "temperature": 0}
            for method, path, b in (("GET", "/v1/models", None), ("POST", "/v1/completions", body),
                                    ("POST", "/v1/chat/completions", {
                                        "messages": [{"role": "user", "content": "x"}],
                                        "max_tokens": 2}),
                                    ("GET", "/metrics", None), ("GET", "/health", None)):
                probs = []
                for hdr, what in ((None, "no Authorization"),
                                  ({"Authorization": "Bearer wrong"}, "a wrong key"),
                                  ({"Authorization": k}, "the key without 'Bearer '"),
                                  ({"Authorization": "Bearer " + k + "x"}, "the key plus a char")):
                    r = request(port, method, path, b, hdr)
                    p = error_problems(r, 401, etype=None)
                    if p:
                        probs.append("with %s: %s; %r" % (what, p[0], r))
                rep.check(not probs, "%s: 401 for %s %s without the key (none, wrong, no 'Bearer "
                          "', one char more)" % (how, method, path), describe(method, path, b),
                          "401 with an error object", probs)
                hdr = {"Authorization": "Bearer " + k}
                r = request(port, method, path, b, hdr)
                if how == "$FERRY_API_KEY" and path == "/v1/chat/completions":
                    # this server has no chat template (tiny-moe-code has none, no option)
                    probs = error_problems(r, r.status, etype=None)
                    if r.status is None or r.status < 400:
                        probs.append("status %s" % r.status)
                    rep.check(not probs, "no chat template (none in the model, no "
                              "--chat-template): chat gets an error object",
                              describe(method, path, b, hdr), "4xx/5xx with an error object",
                              probs + ["%r" % r] if probs else "")
                    continue
                rep.check(r.status == 200, "%s: 200 for %s %s with the key" % (how, method, path),
                          describe(method, path, b, hdr), 200, r)
        finally:
            stop_checked(rep, srv, how + " server")


def sec_max_tokens_default(rep):
    srv = Server(MODEL, "--max-tokens-default", "7")
    try:
        nb = {"prompt": "def fibonacci(n):", "temperature": 0, "ignore_eos": True}
        base = BASE.get(MODEL, "def fibonacci(n):", 7, ignore_eos=True)
        t, f, u, probs = completion_from_json(post(srv.port, "/v1/completions", nb), False)
        rep.check(not probs and t == base["text"] and u and u.get("completion_tokens") == 7,
                  "--max-tokens-default 7: a request without max_tokens gets 7 tokens",
                  describe("POST", "/v1/completions", nb), base["text"], probs or
                  {"text": t, "usage": u})
        nb["max_tokens"] = 9
        u = completion_from_json(post(srv.port, "/v1/completions", nb), False)[2]
        rep.check(u and u.get("completion_tokens") == 9,
                  "--max-tokens-default 7: a request's max_tokens 9 wins",
                  describe("POST", "/v1/completions", nb), 9, u)
    finally:
        stop_checked(rep, srv, "--max-tokens-default server")


def sec_queue(rep):
    srv = Server(MODEL, "--max-seqs", "1", "--max-queue", "1", "--ctx", "4096", "--chat-template",
                 TEMPLATE)
    port = srv.port
    socks = []
    try:
        long_body = {"prompt": "def fibonacci(n):", "max_tokens": 4000, "temperature": 0,
                     "ignore_eos": True, "stream": True}
        a = open_stream(port, "/v1/completions", long_body)
        socks.append(a)
        got_a = a.read_events(2, REQ_TIMEOUT)
        rep.check(got_a >= 2, "queue: request A (max_tokens 4000) is streaming",
                  describe("POST", "/v1/completions", long_body), ">= 2 events", got_a)
        b = open_stream(port, "/v1/completions", long_body)
        socks.append(b)
        held, secs, m = wait_metrics(port, lambda m: m.get("ferry_queue_depth") == 1, 10 * SLOW)
        rep.check(held and m.get("ferry_active_sequences") == 1,
                  "queue: request B waits (/metrics ferry_queue_depth 1, active 1)",
                  "GET /metrics", "queue 1, active 1", {
                      "queue": m.get("ferry_queue_depth"),
                      "active": m.get("ferry_active_sequences")})
        c_body = {"prompt": "def f():", "max_tokens": 8, "temperature": 0}
        r = post(port, "/v1/completions", c_body)
        probs = error_problems(r, 429, etype=None)
        ra = r.headers.get("retry-after", "")
        if not re.fullmatch(r"\d+", ra or ""):
            probs.append("Retry-After %r is not a number of seconds" % ra)
        rep.check(not probs, "queue full (--max-seqs 1 --max-queue 1): the third request gets 429"
                  " with Retry-After", describe("POST", "/v1/completions", c_body),
                  "429, Retry-After: N, an error object", probs + ["%r %r" % (r, r.headers)]
                  if probs else "")
        st = stream(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 4, "stream": True})
        rep.check(st.status == 429, "queue full: a streamed chat request gets 429 too",
                  "POST /v1/chat/completions stream", 429, "%s %r" % (st.status, st.body[:200]))
        m = metrics(port)
        n429 = m.total("ferry_requests_total", status="429")
        rep.check(n429 >= 2, "/metrics counts the 429s", "GET /metrics", ">= 2", n429)
        # B leaves while it waits, then A leaves mid-stream: the server empties
        b.close()
        held_b, secs_b, m = wait_metrics(port, lambda m: m.get("ferry_queue_depth") == 0, 2 * SLOW)
        if not held_b:
            rep.note("a waiting request whose client left stayed in the queue for %.1f s while "
                     "another ran (ferry_queue_depth %s)" % (secs_b, m.get("ferry_queue_depth")))
        a.close()
        held, secs, m = wait_metrics(port, idle, 3 * SLOW)
        rep.check(held, "queue: both clients gone, active and queue back to 0 (%.2f s)" % secs,
                  "GET /metrics", "active 0, queue 0", {
                      "queue": m.get("ferry_queue_depth"),
                      "active": m.get("ferry_active_sequences")})
        base = BASE.get(MODEL, "def f():", 8)
        t, f, u, probs = completion_from_json(post(port, "/v1/completions", c_body), False)
        rep.check(not probs and t == base["text"], "queue: afterwards a request is served",
                  describe("POST", "/v1/completions", c_body), base["text"], probs or t)
        # stopping with a stream in flight and one waiting: exit 0, both connections end
        a = open_stream(port, "/v1/completions", long_body)
        socks.append(a)
        a.read_events(2, REQ_TIMEOUT)
        b = open_stream(port, "/v1/completions", long_body)
        socks.append(b)
        wait_metrics(port, lambda m: m.get("ferry_queue_depth") == 1, 10 * SLOW)
        stop_checked(rep, srv, "queue server, a request in flight and one waiting")
        ends = [x.read_to_end(10 * SLOW) for x in (a, b)]
        rep.check(all(ends), "SIGTERM: the in-flight and the waiting client's connections end",
                  "SIGTERM with a stream in flight and one queued", "both closed",
                  ["closed" if e else "still open" for e in ends])
    finally:
        for s in socks:
            s.close()
        if srv.proc.poll() is None:
            stop_checked(rep, srv, "queue server")


class RawStream:
    """A streamed POST over a raw socket that the test can read a little of, then abandon."""

    def __init__(self, port, path, body):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=REQ_TIMEOUT)
        data = json.dumps(body).encode()
        self.s.sendall(("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                        "\r\nContent-Length: %d\r\n\r\n" % (path, len(data))).encode() + data)
        self.buf = b""
        self.closed = False

    def read_events(self, k, timeout):
        t_end = time.monotonic() + timeout
        while self.buf.count(b"data: ") < k and time.monotonic() < t_end:
            self.s.settimeout(max(0.01, t_end - time.monotonic()))
            try:
                c = self.s.recv(65536)
            except socket.timeout:
                break
            if not c:
                break
            self.buf += c
        return self.buf.count(b"data: ")

    def read_to_end(self, timeout):
        """Reads until the server closes the connection; False if it is still open."""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            self.s.settimeout(max(0.01, t_end - time.monotonic()))
            try:
                c = self.s.recv(65536)
            except socket.timeout:
                return False
            except OSError:
                return True
            if not c:
                return True
            self.buf += c
        return False

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.s.close()


def open_stream(port, path, body):
    return RawStream(port, path, body)


def sec_disconnect(rep, srv):
    port = srv.port
    for path, body in (("/v1/completions", {"prompt": "def fibonacci(n):", "max_tokens": 3000,
                                            "temperature": 0, "ignore_eos": True, "stream": True}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 3000, "ignore_eos": True,
                                                 "stream": True})):
        held, _, _ = wait_metrics(port, idle, 10 * SLOW)
        s = open_stream(port, path, body)
        n = s.read_events(2, REQ_TIMEOUT)
        m = metrics(port)
        active = m.get("ferry_active_sequences")
        s.close()
        held, secs, m = wait_metrics(port, lambda m: m.get("ferry_active_sequences") == 0,
                                     2 * SLOW)
        rep.check(n >= 2 and active == 1 and held,
                  "disconnect mid-stream (%s): ferry_active_sequences 1 -> 0 in %.2f s" % (
                      path, secs), describe("POST", path, body) + ", closed after 2 events",
                  "1 active while streaming, 0 within %.0f s of the close" % (2 * SLOW),
                  {"events": n, "active while streaming": active,
                   "active after": m.get("ferry_active_sequences"), "seconds": round(secs, 2)})
        g0 = metrics(port).total("ferry_generated_tokens_total")
        time.sleep(0.3)
        g1 = metrics(port).total("ferry_generated_tokens_total")
        rep.check(g0 == g1, "after the disconnect, generation has stopped (generated tokens "
                  "steady over 0.3 s)", "GET /metrics twice", g0, g1)
    r = request(port, "GET", "/health")
    base = BASE.get(MODEL, "def f():", 8)
    t = completion_from_json(post(port, "/v1/completions", {"prompt": "def f():", "max_tokens": 8,
                                                            "temperature": 0}), False)[0]
    rep.check(r.status == 200 and t == base["text"], "the server answers after the disconnects",
              "GET /health, POST /v1/completions", base["text"], t)


def sec_metrics(rep, srv):
    m = metrics(srv.port)
    rep.check(not m.problems, "/metrics parses as Prometheus text (HELP/TYPE before samples)",
              "GET /metrics", "no problems", m.problems[:10])
    rep.check(m.content_type.startswith("text/plain") and "version=0.0.4" in m.content_type,
              "/metrics Content-Type text/plain; version=0.0.4", "GET /metrics",
              "text/plain; version=0.0.4", m.content_type)
    missing = [n for n in METRICS if n not in m.types or n not in m.helps or
               not any(k[0] == n for k in m.samples)]
    rep.check(not missing, "/metrics has every metric of the contract, each with HELP and TYPE",
              "GET /metrics", METRICS, "missing: %s" % missing)
    bad_types = [n for n in METRICS if n.endswith("_total") and m.types.get(n) != "counter"] + \
        [n for n in METRICS if not n.endswith("_total") and m.types.get(n) != "gauge"]
    rep.check(not bad_types, "/metrics: *_total are counters, the rest gauges", "GET /metrics",
              "counter / gauge", {n: m.types.get(n) for n in bad_types})
    labels = [dict(k[1]) for k in m.samples if k[0] == "ferry_requests_total"]
    rep.check(labels and all(set(l) >= {"endpoint", "status"} for l in labels),
              "ferry_requests_total has endpoint and status labels", "GET /metrics",
              '{endpoint="...",status="..."}', labels[:6])


def sec_qwen(rep, baselines):
    if not os.path.isdir(QWEN):
        rep.check(False, "the tiny-qwen3_moe fixture is at %s" % QWEN, "", "a folder", "missing")
        return
    srv = Server(QWEN)
    try:
        port = srv.port
        r = request(port, "GET", "/v1/models")
        ids = [d.get("id") for d in (r.json or {}).get("data", [])] if r.status == 200 else r
        rep.check(ids == ["tiny-qwen3_moe"], "qwen3: /v1/models names the folder",
                  "GET /v1/models", ["tiny-qwen3_moe"], ids)
        for prompt, n in (("Hello there", 24), ("\u4f60\u597d\uff0c\u4e16\u754c", 24)):
            base = BASE.get(QWEN, prompt, n)
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
            t, f, u, probs = completion_from_json(post(port, "/v1/completions", body), False)
            st = stream(port, "/v1/completions", dict(body, stream=True))
            t2, f2, u2, probs2 = completion_from_stream(st, chat=False)
            rep.check(not probs and not probs2 and t == t2 == base["text"] and f == f2 and
                      tokens_ok(u, base, f), "qwen3 completion %r: plain and streamed text "
                      "(non-ASCII, %d events) are ferry run's" % (prompt, len(st.events)),
                      describe("POST", "/v1/completions", body), base["text"],
                      probs + probs2 or {"plain": t, "stream": t2})
        for user, n in (("What is 2+2?", 20), ("Say hi.", 16)):
            base = BASE.get(QWEN, user, n, chat=True)
            body = {"messages": [{"role": "user", "content": user}], "max_tokens": n,
                    "temperature": 0}
            t, f, u, probs = completion_from_json(post(port, "/v1/chat/completions", body), True)
            st = stream(port, "/v1/chat/completions", dict(body, stream=True,
                                                           stream_options={"include_usage": True}))
            t2, f2, u2, probs2 = completion_from_stream(st, chat=True, include_usage=True)
            rep.check(not probs and not probs2 and t == t2 == base["text"] and f == f2 and
                      tokens_ok(u, base, f) and u == u2,
                      "qwen3 chat (its own template) %r: plain and streamed text are ferry run "
                      "--chat's, usage %d prompt tokens" % (user, len(base["prompt_ids"])),
                      describe("POST", "/v1/chat/completions", body),
                      {"text": base["text"], "prompt_tokens": len(base["prompt_ids"])},
                      probs + probs2 or {"plain": t, "stream": t2, "usage": u, "stream usage": u2})
        # a system message goes through the template (more prompt tokens, still answers)
        body = {"messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "Say hi."}], "max_tokens": 8,
                "temperature": 0}
        t, f, u, probs = completion_from_json(post(port, "/v1/chat/completions", body), True)
        base = BASE.get(QWEN, "Say hi.", 16, chat=True)
        rep.check(not probs and u and u.get("prompt_tokens", 0) > len(base["prompt_ids"]),
                  "qwen3 chat with a system message: rendered (more prompt tokens)",
                  describe("POST", "/v1/chat/completions", body),
                  "prompt_tokens > %d" % len(base["prompt_ids"]), probs or u)
    finally:
        stop_checked(rep, srv, "qwen3 server")


# ---- the load test ---------------------------------------------------------------------

LOAD_KINDS = ["cmpl", "cmpl_stream", "chat", "chat_stream", "cmpl_ids", "cmpl_stream_usage",
              "disconnect", "sampled"]
LOAD_WEIGHTS = [4, 4, 3, 3, 1, 1, 2, 1]


def load_plan(n_clients, per_client, seed):
    rng = random.Random(seed)
    plan, keys = [], []
    for c in range(n_clients):
        reqs = []
        for j in range(per_client):
            kind = rng.choices(LOAD_KINDS, LOAD_WEIGHTS)[0]
            n = rng.choice([4, 8, 16, 24, 32, 48])
            ign = rng.random() < 0.3
            if kind.startswith("chat") or (kind == "disconnect" and rng.random() < 0.5):
                user = rng.choice(CHAT_PROMPTS)
                key = (MODEL, user, n, ign, True, TEMPLATE)
                body = {"messages": [{"role": "user", "content": user}], "max_tokens": n,
                        "temperature": 0, "ignore_eos": ign}
                path, chat = "/v1/chat/completions", True
            else:
                prompt = rng.choice(CODE_PROMPTS + LONG_PROMPTS)
                key = (MODEL, prompt, n, ign, False, None)
                body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": ign}
                path, chat = "/v1/completions", False
            if kind in ("cmpl_stream", "chat_stream", "cmpl_stream_usage", "disconnect"):
                body["stream"] = True
            if kind == "cmpl_stream_usage":
                body["stream_options"] = {"include_usage": True}
            if kind == "disconnect":
                body["max_tokens"], body["ignore_eos"], key = 200, True, None
            if kind == "sampled":
                body.update(temperature=0.8, top_k=40, seed=rng.randrange(1 << 30),
                            ignore_eos=True)
                key = None
            if rng.random() < 0.2 and kind not in ("sampled",):
                body.update(top_k=3, top_p=0.7)  # irrelevant at temperature 0
            reqs.append({"kind": kind, "path": path, "chat": chat, "body": body, "key": key})
            if key:
                keys.append(key)
        plan.append(reqs)
    return plan, keys


def load_one(port, rq):
    body = dict(rq["body"])
    if rq["kind"] == "cmpl_ids":
        body["prompt"] = BASE.get(*rq["key"])["prompt_ids"]
    t0 = time.monotonic()
    if body.get("stream"):
        st = stream(port, rq["path"], body, close_after=2 if rq["kind"] == "disconnect" else None)
        if rq["kind"] == "disconnect":
            return {"status": st.status, "disconnected": True, "events": len(st.events)}
        text, finish, usage, probs = completion_from_stream(
            st, rq["chat"], include_usage=bool(body.get("stream_options")))
        status = st.status
    else:
        r = post(port, rq["path"], body)
        text, finish, usage, probs = completion_from_json(r, rq["chat"])
        status = r.status
    return {"status": status, "text": text, "finish": finish, "usage": usage, "problems": probs,
            "seconds": time.monotonic() - t0}


def load_round(rep, srv, plan, label):
    port = srv.port
    results = [[None] * len(reqs) for reqs in plan]

    def client(c):
        for j, rq in enumerate(plan[c]):
            try:
                results[c][j] = load_one(port, rq)
            except Exception as e:
                results[c][j] = {"status": None, "problems": ["%s: %s" % (type(e).__name__, e)]}

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - t0
    bad, n_200, n_disc = [], 0, 0
    for c, reqs in enumerate(plan):
        for j, rq in enumerate(reqs):
            res = results[c][j]
            req = describe("POST", rq["path"], rq["body"]) + (
                " (the prompt sent as its token ids)" if rq["kind"] == "cmpl_ids" else "")
            if rq["kind"] == "disconnect":
                n_disc += 1
                if res["status"] != 200 or res.get("events", 0) < 2:
                    bad.append((req, "200, 2 events, then the client leaves", res))
                continue
            n_200 += res["status"] == 200
            if res["status"] != 200 or res["problems"]:
                bad.append((req, "200, well-formed", res))
                continue
            if rq["kind"] == "sampled":
                ok = res["finish"] == "length" and (res["usage"] or {}).get(
                    "completion_tokens") == rq["body"]["max_tokens"]
                exp = {"finish": "length", "completion_tokens": rq["body"]["max_tokens"]}
            else:
                base = BASE.get(*rq["key"])
                want_usage = rq["kind"] != "cmpl_stream" and rq["kind"] != "chat_stream"
                ok = res["text"] == base["text"] and res["finish"] == base["finish"] and (
                    not want_usage or tokens_ok(res["usage"], base, base["finish"]))
                exp = {"text": base["text"], "finish": base["finish"],
                       "prompt_tokens": len(base["prompt_ids"]),
                       "completion_tokens": len(base["ids"])}
            if not ok:
                bad.append((req, exp, res))
    n_all = sum(len(r) for r in plan)
    print("   %s: %d requests from %d clients in %.1f s (%d disconnecting on purpose)" % (
        label, n_all, len(plan), secs, n_disc), flush=True)
    rep.check(not bad, "load %s: all %d requests answered completely, every greedy text equal "
              "to ferry run's" % (label, n_all - n_disc),
              bad[0][0] if bad else "", bad[0][1] if bad else "",
              "%d bad; first: %s" % (len(bad), short(bad[0][2], 1500)) if bad else "")
    for req, exp, got in bad[1:6]:
        print("      also: %s\n        expected %s\n        got %s" % (short(req, 300),
                                                                     short(exp, 300),
                                                                     short(got, 300)))
    return n_200, n_disc


def sec_load(rep, srv):
    port = srv.port
    n_clients = max(4, int(round(32 * SCALE)))
    per_client = max(2, int(round(4 * SCALE)))
    plans = [load_plan(n_clients, per_client, seed) for seed in (1, 2)]
    t0 = time.monotonic()
    BASE.prefetch(sorted(set(k for _, keys in plans for k in keys), key=str))
    print("   baselines: %d ferry run calls in %.1f s" % (len(BASE.cache), time.monotonic() - t0))
    rss0 = srv.rss_kib()
    load_round(rep, srv, plans[0][0], "round 1 (warm-up)")
    held, secs, m = wait_metrics(port, idle, 10 * SLOW)
    rep.check(held, "after round 1, no active or queued sequence", "GET /metrics",
              "active 0, queue 0", {"active": m.get("ferry_active_sequences"),
                                    "queue": m.get("ferry_queue_depth")})
    time.sleep(0.5)
    rss_warm = srv.rss_kib()
    before = m
    n_200, n_disc = load_round(rep, srv, plans[1][0], "round 2")
    held, secs, after = wait_metrics(port, idle, 10 * SLOW)
    rep.check(held, "after round 2, no active or queued sequence", "GET /metrics",
              "active 0, queue 0", {"active": after.get("ferry_active_sequences"),
                                    "queue": after.get("ferry_queue_depth")})
    time.sleep(0.5)
    rss_after = srv.rss_kib()
    print("   RSS: %.1f MiB at start, %.1f MiB after round 1, %.1f MiB after round 2" % (
        rss0 / 1024, rss_warm / 1024, rss_after / 1024))
    if SANITIZED:
        rep.note("sanitized build (%s): the RSS bound is not enforced (ASan's quarantine, "
                 "TSan's shadow and history memory grow by design; ASan's leak check runs at "
                 "exit). Measured %.1f -> %.1f MiB" % (SANITIZED, rss_warm / 1024,
                                                      rss_after / 1024))
    else:
        rep.check(rss_after <= rss_warm + 16 * 1024,
                  "load: RSS after round 2 within 16 MiB of after round 1",
                  "/proc/%d/status VmRSS" % srv.pid, "<= %.1f MiB" % (rss_warm / 1024 + 16),
                  "%.1f MiB" % (rss_after / 1024))

    def delta(name, **labels):
        return after.total(name, **labels) - before.total(name, **labels)

    d200 = delta("ferry_requests_total", endpoint="/v1/completions", status="200") + \
        delta("ferry_requests_total", endpoint="/v1/chat/completions", status="200")
    rep.check(n_200 <= d200 <= n_200 + n_disc, "load: ferry_requests_total{status=\"200\"} grew"
              " by the 200s (%d, plus up to %d that left)" % (n_200, n_disc), "GET /metrics",
              "%d..%d" % (n_200, n_200 + n_disc), d200)
    steps = delta("ferry_steps_total")
    se = delta("ferry_step_experts_total")
    rep.check(steps > 0 and se > 0, "load: steps and distinct experts per step counted",
              "GET /metrics", "ferry_steps_total, ferry_step_experts_total grow",
              {"steps": steps, "step_experts": se})
    # ferry_step_experts_arrival_total counts the steps where pending prompts competed for
    # the step's budget (the long prompts make them compete): what arrival order would have
    # activated there, against ferry_step_experts_planned_total, what the choice estimated
    sel = after.total("ferry_selected_steps_total")
    sa = after.total("ferry_step_experts_arrival_total")
    sp = after.total("ferry_step_experts_planned_total")
    print("   steps %d, %.0f distinct experts; %d steps where prompts competed: %.0f experts "
          "planned, %.0f in arrival order" % (steps, se, sel, sp, sa))
    if sel == 0:
        rep.note("no step had prompts competing (ferry_selected_steps_total 0), so "
                 "ferry_step_experts_arrival_total stayed 0: the load did not exercise the choice")
    else:
        rep.check(0 < sp <= sa, "load: where prompts competed, the chosen chunks' experts <= "
                  "arrival order's", "GET /metrics", "0 < planned <= arrival",
                  {"selected_steps": sel, "planned": sp, "arrival": sa})


# ---- main ------------------------------------------------------------------------------

SANITIZED = None


def main():
    global FERRY, BUILD, SANITIZED
    if len(sys.argv) != 3:
        raise SystemExit("usage: test_serve.py FERRY_BINARY BUILD_DIR")
    FERRY, BUILD = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    os.environ.setdefault("FERRY_BACKEND", "cpu")
    with open(FERRY, "rb") as f:
        blob = f.read()
    SANITIZED = "TSan" if b"__tsan_init" in blob else "ASan" if b"__asan_init" in blob else None
    print("test_serve: %s (backend %s, scale %g%s)" % (FERRY, os.environ["FERRY_BACKEND"], SCALE,
                                                       ", %s build" % SANITIZED if SANITIZED
                                                       else ""), flush=True)
    rep = Report()
    t0 = time.monotonic()
    main_srv = None
    try:
        rep.section("command line", sec_cli)
        try:
            main_srv = Server(MODEL, "--chat-template", TEMPLATE, "--max-seqs", "16",
                              "--max-queue", "64", "--ctx", "4096")
        except RuntimeError as e:
            rep.check(False, "the main server starts", "", "a listening line", str(e))
            return finish(rep, t0)
        mid = "tiny-moe-code"
        rep.section("health, models", sec_basics, main_srv, mid)
        rep.section("completions", sec_completions, main_srv, mid)
        rep.section("streaming and chat", sec_streaming, main_srv, mid)
        rep.section("stop strings", sec_stop, main_srv, mid)
        rep.section("errors", sec_errors, main_srv, mid)
        rep.section("disconnect mid-stream", sec_disconnect, main_srv)
        rep.section("load", sec_load, main_srv)
        rep.section("metrics", sec_metrics, main_srv)
        rep.section("context, body limit, served name", sec_small_ctx)
        rep.section("authentication", sec_auth)
        rep.section("max-tokens-default", sec_max_tokens_default)
        rep.section("queue full", sec_queue)
        rep.section("tiny-qwen3_moe", sec_qwen, None)
        stop_checked(rep, main_srv, "main server")
        main_srv = None
    finally:
        for s in list(LIVE):
            s.kill()
    return finish(rep, t0)


def finish(rep, t0):
    print("\ntest_serve: %d checks passed, %d failed, %d notes, %.1f s" % (
        rep.n_ok, len(rep.failures), len(rep.notes), time.monotonic() - t0))
    if rep.skipped:
        print("SKIPPED (FERRY_SERVE_TEST_ONLY=%s): %s" % (",".join(ONLY), ", ".join(rep.skipped)))
    for what, req, exp, got in rep.failures:
        print("FAILED %s\n  request:  %s\n  expected: %s\n  got:      %s" % (
            what, short(req), short(exp), short(got)))
    for n in rep.notes:
        print("NOTE %s" % n)
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
