"""ferry: Python bindings of libferry, the Mixture-of-Experts inference engine.

A ctypes binding of include/ferry.h: no compiled extension, standard library only.

    import ferry
    with ferry.Model("models/tiny-moe-code", backend="cpu") as m:
        print(m.generate("def fibonacci(n):\\n", max_tokens=32))
        for piece in m.stream("import os\\n", max_tokens=16):
            print(piece, end="", flush=True)
        print(m.generate("class Node:\\n", max_tokens=64, stop=["\\n\\n"]))
        print(m.generate_batch(["import os\\n", "class Node:\\n"], max_tokens=16).texts)
        out = m("def add(a, b):\\n", max_tokens=16, temperature=0)  # llama-cpp-python style
        print(out["choices"][0]["text"], out["usage"]["completion_tokens"])
    print(ferry.bench("models/tiny-moe-code", backend="cpu")["decode_tokens_per_s"])

Installed with `pip install --no-build-isolation ./python` (python/README.md), the package
carries the libferry.so it built. libferry.so is found as ferry/_lib.py says:
$FERRY_LIBRARY_PATH (a file or a folder), next to the package, the source tree's build
folder, an installed ferry through pkg-config, the system's search path. Importing the
package raises LibraryNotFoundError (an ImportError) listing every place tried when none
has it.

Ctrl-C during a generation stops it after the current token and raises KeyboardInterrupt
in the caller; the Model stays usable.

Errors: every failing library call raises FerryError, with the status name
(FERRY_ERR_IO, ...) in .status and ferry_last_error()'s message in .message. Bad Python
arguments raise ValueError (or TypeError) before anything reaches the library.

Threads: a Model holds one ferry_context, so it runs one generation at a time and is used
by one thread at a time. A second generation started while one runs (a stream not yet
finished, say) raises RuntimeError instead of touching the context; tokenize, detokenize
and info are safe next to a running stream. Use one Model per thread for parallel work.
Model.generate_batch counts as a generation (its prompts run together on contexts of its
own); bench() opens a model of its own.
"""
import codecs
import contextlib
import ctypes
import dataclasses
import inspect
import math
import os
import queue
import re
import signal
import threading
import time
import uuid

from . import _lib
from ._lib import LibraryNotFoundError

__all__ = ["Model", "ModelInfo", "BatchResult", "Stream", "FerryError", "LibraryNotFoundError",
           "bench", "hit_rate", "pack_model", "parse_size", "version", "library_path"]

_L = _lib.lib
library_path = _lib.path  # the libferry.so that was loaded

_INT32_MAX = 2**31 - 1
_UINT64_MAX = 2**64 - 1

BACKENDS = ("auto", "cpu", "cuda")                        # ferry_backend_id
OFFLOAD_TIERS = ("ram", "nvme")                           # ferry_offload_tier
POLICIES = ("lru", "lfu", "layer-lru", "predicted")       # ferry_cache_policy_id
PREDICTORS = ("recency", "gate", "stats", "combined")     # ferry_predict_id
READERS = ("auto", "uring", "pread")                      # ferry_reader_id
HYBRID = ("auto", "off", "cpu-experts")                   # ferry_hybrid_id
CPU_KERNELS = ("auto", "reference", "avx2", "avx512", "avx512bf16")  # ferry_cpu_kernels_id
BENCH_MODES = ("decode", "prefill", "batch")              # ferry_bench_mode


class FerryError(Exception):
    """A libferry call failed. .status is the status name ("FERRY_ERR_IO"), .code its
    number, .message the library's message (ferry_last_error)."""

    def __init__(self, status, message, code=None):
        super().__init__("%s: %s" % (status, message))
        self.status = status
        self.message = message
        self.code = code


def _error(code):
    """The FerryError of a failed call. Call it on the thread that made the call: the
    library's message is thread-local."""
    name = _L.ferry_status_name(code)
    name = name.decode() if name else "FERRY_ERR_%d" % code
    msg = (_L.ferry_last_error() or b"").decode("utf-8", "replace")
    return FerryError(name, msg, code)


def _check(code):
    if code != 0:
        raise _error(code)


def version():
    """The library's version, "MAJOR.MINOR.PATCH"."""
    return _L.ferry_version().decode()


__version__ = version()


# ---- argument checks (ValueError / TypeError before any C call) ----------------------------

def _int(what, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("%s must be an integer, got %r" % (what, v))
    if not lo <= v <= hi:
        raise ValueError("%s must be in [%d, %d], got %d" % (what, lo, hi, v))
    return v


def _choice(what, v, names):
    if v not in names:
        raise ValueError("%s must be one of %s, got %r" % (what, ", ".join(names), v))
    return names.index(v)


def _path(what, v):
    if v is None:
        return None
    if not isinstance(v, (str, bytes, os.PathLike)):
        raise TypeError("%s must be a path, got %r" % (what, v))
    p = os.fsencode(v)
    if not p or b"\0" in p:
        raise ValueError("%s must be a non-empty path without NUL bytes, got %r" % (what, v))
    return p


_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?:([kKmMgGtT])(?:i?B)?)?\s*$")
_SIZE_MUL = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value, what="size"):
    """Bytes from an int, or from a string such as "512M", "6G", "1.5GiB" or "4096" (K, M,
    G, T are powers of 1024), as ferry's --gpu-mem reads them. ValueError otherwise."""
    if isinstance(value, bool):
        raise TypeError("%s must be bytes or a string such as '6G', got %r" % (what, value))
    if isinstance(value, int):
        return _int(what, value, 1, _UINT64_MAX)
    if not isinstance(value, str):
        raise TypeError("%s must be bytes or a string such as '6G', got %r" % (what, value))
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError("%s expects a size such as 512M or 6G, got %r" % (what, value))
    n = float(m.group(1)) * (_SIZE_MUL[m.group(2).lower()] if m.group(2) else 1)
    if not 1 <= n <= 1e18:
        raise ValueError("%s expects a size such as 512M or 6G, got %r" % (what, value))
    return int(n)


def _sampling(temperature, top_k, top_p, seed):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError("temperature must be a number, got %r" % (temperature,))
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError("temperature must be a finite number >= 0, got %r" % (temperature,))
    _int("top_k", top_k, 0, _INT32_MAX)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError("top_p must be a number, got %r" % (top_p,))
    if not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1], got %r" % (top_p,))
    _int("seed", seed, 0, _UINT64_MAX)
    return (float(temperature), top_k, float(top_p), seed)


def _neutral(value, neutral):
    """Whether an unimplemented option's value is the one that changes nothing (an empty
    logit_bias is as good as None)."""
    if neutral is None:
        return value is None or (isinstance(value, (dict, list, tuple)) and not value)
    if isinstance(neutral, bool):
        return value is neutral or (type(value) is int and value == int(neutral))
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == neutral)


_PACK_FORMATS = {None: 0, "q8": 1, "q4": 2}


def _model_params(gpu_mem=None, offload="ram", pack=None, backend="auto", threads=0,
                  policy="lru", prefetch=True, predictor="gate", predictor_stats=None,
                  lookahead=1, slots=0, host_cache=None, reader="auto", hybrid="auto",
                  cpu_kernels="auto", quant_dense=None):
    """ferry_model_params from Model's keywords (all but ctx), each checked: ValueError or
    TypeError. The struct keeps the path strings it points to alive (ctypes holds them in
    it), so it is kept as long as the library may read them."""
    mp = _L.ferry_model_params_default()
    mp.n_threads = _int("threads", threads, 0, 1024)
    mp.backend = _choice("backend", backend, BACKENDS)
    no_budget = gpu_mem is None or (type(gpu_mem) is int and gpu_mem == 0)
    mp.gpu_mem_bytes = 0 if no_budget else parse_size(gpu_mem, "gpu_mem")
    mp.offload = _choice("offload", offload, OFFLOAD_TIERS)
    mp.pack_path = _path("pack", pack)
    mp.host_cache_bytes = 0 if host_cache is None else parse_size(host_cache, "host_cache")
    mp.reader = _choice("reader", reader, READERS)
    mp.policy = _choice("policy", policy, POLICIES)
    if not isinstance(prefetch, (bool, int)):
        raise TypeError("prefetch must be True or False, got %r" % (prefetch,))
    mp.prefetch = 1 if prefetch else 0
    mp.predictor = _choice("predictor", predictor, PREDICTORS)
    mp.predictor_stats_path = _path("predictor_stats", predictor_stats)
    mp.lookahead = _int("lookahead", lookahead, 1, 3)
    mp.max_slots = _int("slots", slots, 0, _INT32_MAX)
    mp.hybrid = _choice("hybrid", hybrid, HYBRID)
    mp.cpu_kernels = _choice("cpu_kernels", cpu_kernels, CPU_KERNELS)
    if quant_dense not in _PACK_FORMATS:
        raise ValueError("quant_dense must be None, 'q8' or 'q4', not %r" % (quant_dense,))
    mp.quant_dense = _PACK_FORMATS[quant_dense]
    return mp


_MODEL_OPTIONS = frozenset(inspect.signature(_model_params).parameters)  # bench()'s


def pack_model(model_dir, out_path, quant=None):
    """Writes the packed expert file of the checkpoint in model_dir to out_path (atomically),
    for Model(..., pack=out_path): quant None keeps the checkpoint's dtype, "q8" or "q4"
    quantizes the experts in groups of 32. Raises ValueError (quant), FerryError."""
    if quant not in _PACK_FORMATS:
        raise ValueError("quant must be None, 'q8' or 'q4', not %r" % (quant,))
    pp = _L.ferry_pack_params_default()
    pp.format = _PACK_FORMATS[quant]
    _check(_L.ferry_pack_model(_path("model_dir", model_dir), _path("out_path", out_path),
                               ctypes.byref(pp)))


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """ferry_model_info: the model's shape and what computes it."""
    n_vocab: int
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    max_positions: int
    bos_id: int
    eos_id: int
    rope_theta: float
    rms_eps: float
    n_params: int
    backend: str  # "cpu" or "cuda": the backend that computes
    device: str   # "cpu, 2 threads, avx512", or the GPU's name, compute capability and memory


def _struct_dict(s):
    """A mirrored struct's fields by name: arrays as lists, char arrays as str, nested
    structs as dicts."""
    out = {}
    for name, _ in s._fields_:
        v = getattr(s, name)
        if isinstance(v, ctypes.Array):
            v = list(v)
        elif isinstance(v, ctypes.Structure):
            v = _struct_dict(v)
        elif isinstance(v, bytes):  # what ctypes gives for a char array
            v = v.decode("utf-8", "replace")
        out[name] = v
    return out


def hit_rate(hits, misses, cpu_experts):
    """The expert hit rate as ferry reports it everywhere (ferry run, batch, bench, serve,
    and this package's stats): the share of expert uses served from a device slot,
    hits / (hits + misses + cpu_experts). An expert computed on the CPU (hybrid) is neither
    a hit nor a fetch and counts against the rate. 0.0 when there were no uses."""
    uses = hits + misses + cpu_experts
    return hits / uses if uses > 0 else 0.0


def _name(names, v):
    """The name of enum value v in names, or v itself when out of range."""
    return names[v] if 0 <= v < len(names) else v


def bench(path, *, mode="decode", prompt_len=None, gen_len=None, repeat=None, batch=None,
          bandwidth_size=None, **model_options):
    """Runs `ferry bench` on the checkpoint in path (ferry_bench_run): opens the model with
    model_options (Model's keywords, all but ctx), measures the bandwidths with buffers of
    bandwidth_size (bytes or "256M"; None: 256 MiB), then per repeat times a prefill of
    prompt_len synthetic tokens and gen_len greedy decode steps (mode "decode"), the prefill
    alone ("prefill"), or batch prompts generating gen_len tokens each together ("batch").
    prompt_len, gen_len, repeat and batch left None take ferry_bench_params_default()'s.
    Returns a dict of every ferry_bench_result field: "bw" a dict of the ferry_bandwidths
    fields, backend and hybrid as names ("cpu", "off"), offload and bw["disk_direct"] as
    bools, device and bw["disk_path"] as str. Speeds are the median run. Raises
    ValueError/TypeError for bad arguments (an unknown model option is a TypeError),
    FerryError when the library fails (a missing folder is FERRY_ERR_IO, lengths the model
    cannot hold FERRY_ERR_INVALID). Takes seconds to minutes: it measures."""
    unknown = sorted(set(model_options) - _MODEL_OPTIONS)
    if unknown:
        raise TypeError("bench() got unexpected keyword argument%s %s; its model options are "
                        "Model's but ctx: %s" % ("s" if len(unknown) > 1 else "",
                                                 ", ".join(map(repr, unknown)),
                                                 ", ".join(sorted(_MODEL_OPTIONS))))
    mp = _model_params(**model_options)
    bp = _L.ferry_bench_params_default()
    bp.mode = _choice("mode", mode, BENCH_MODES)
    if prompt_len is not None:
        bp.prompt_len = _int("prompt_len", prompt_len, 1, _INT32_MAX)
    if gen_len is not None:  # the prefill mode generates nothing
        bp.gen_len = _int("gen_len", gen_len, 0 if mode == "prefill" else 1, _INT32_MAX)
    if repeat is not None:
        bp.repeat = _int("repeat", repeat, 1, _INT32_MAX)
    if batch is not None:
        bp.batch = _int("batch", batch, 1, _INT32_MAX)
    bp.bandwidth_bytes = (0 if bandwidth_size is None
                          else parse_size(bandwidth_size, "bandwidth_size"))
    model_dir = _path("path", path)
    r = _lib.BenchResult()
    _check(_L.ferry_bench_run(model_dir, ctypes.byref(mp), ctypes.byref(bp), ctypes.byref(r)))
    out = _struct_dict(r)
    out["backend"] = _name(BACKENDS, r.backend)
    out["hybrid"] = _name(HYBRID, r.hybrid)
    out["offload"] = bool(r.offload)
    out["bw"]["disk_direct"] = bool(r.bw.disk_direct)
    return out


@dataclasses.dataclass
class BatchResult:
    """What Model.generate_batch returns. texts[i] and ids[i]: the text and token ids
    generated after prompts[i] (the text as generate() gives it; the ids include a final
    EOS when it ended the sequence). stats: the ferry_batch_stats fields of the run (steps,
    tokens, layer_batches, expert_loads, expert_bytes, bytes_to_device, hits, misses,
    seconds, cpu_experts) and "hit_rate" (see hit_rate(); 0 when resident)."""
    texts: list
    ids: list
    stats: dict


# ---- generation --------------------------------------------------------------------------

def _stops(stop):
    """The stop strings of a stop= argument as a tuple: None or [] for none, one str, or a
    list/tuple of non-empty str. TypeError/ValueError otherwise."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise TypeError("stop must be a str or a list of str, got %r" % (type(stop).__name__,))
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise TypeError("stop[%d] must be a str, got %r" % (i, type(s).__name__))
        if not s:
            raise ValueError("stop[%d] is empty: a stop string needs at least one character" % i)
    return tuple(stop)


class _StopMatcher:
    """Stop strings over text that arrives a piece at a time, as serve/stop.h applies them
    for the server and `ferry run --stop`: the text ends before the earliest occurrence of
    any stop string (one that spans pieces too) and never contains it.

    feed() returns the part of the text that is now safe to hand out. It holds back the
    longest tail that is a proper prefix of some stop string, so streamed text never shows
    what later turns out to be the start of a stop string. Invariant: no stop string starts
    in the text already handed out, so only the held-back tail and the new piece are
    searched."""

    def __init__(self, stops):
        self.stops = stops
        self.stopped = False
        self._held = ""

    def feed(self, piece):
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[:min(hits)]
        keep = 0
        for k in range(min(len(text), max(map(len, self.stops)) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self):
        """The end of the text without a stop: what was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


@contextlib.contextmanager
def _signals_deferred(raised):
    """While the library runs (and calls back into Python) on the main thread, the Python
    signal handlers (SIGINT's default_int_handler above all) run inside a wrapper: what a
    handler raises (KeyboardInterrupt) goes to raised instead of out of the handler.

    Why: a handler runs wherever the main thread next executes Python code, which during
    ferry_generate is the token callback, possibly at its very first instruction, before
    any try block in it. ctypes cannot pass an exception raised there to the caller: it
    prints "Exception ignored on calling ctypes callback function" and returns an undefined
    value to C, so Ctrl-C was lost and the generation ended as if it had succeeded. With
    the wrapper the callback sees raised, returns "stop", and the caller raises raised[0]
    once the library has returned. Handlers are restored on the way out. Elsewhere than the
    main thread nothing is wrapped: signal handlers only ever run on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def wrap(handler):
        def deferred(signum, frame):
            try:
                handler(signum, frame)
            except BaseException as e:
                raised.append(e)
        return deferred

    saved = {}
    try:
        for sig in signal.valid_signals():
            try:
                handler = signal.getsignal(sig)
            except (OSError, ValueError):
                continue
            if callable(handler):
                signal.signal(sig, wrap(handler))
                saved[sig] = handler
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _generate_call(ctx, prompt, gp, emit, stop, stops=(), is_eos=None):
    """Runs ferry_generate on this thread, giving emit() each non-empty piece of text.
    Stops after the current token once stop (a threading.Event, or None) is set. stops:
    stop strings (the text ends before the first occurrence of any, and generation stops
    at the token that completes it). is_eos(id): whether a token id ends a sequence, for the
    finish reason. Raises FerryError, or what emit or a signal handler (KeyboardInterrupt)
    raised; generation stops after the current token when something is raised. Returns
    (tokens generated, EOS included; finish reason "stop" (a stop string, or EOS with
    gp.stop_at_eos) or "length")."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    matcher = _StopMatcher(stops) if stops else None
    raised = []
    last_id = [-1]

    def put(piece):
        if matcher is not None:
            piece = matcher.feed(piece)
        if piece:
            emit(piece)

    def on_token(token_id, text, length, user):
        # An exception must not cross into C: keep it, stop, and raise it after the call.
        try:
            if token_id >= 0:
                last_id[0] = token_id
            if length:
                piece = decoder.decode(ctypes.string_at(text, length))
                if piece:
                    put(piece)
            if raised or (matcher is not None and matcher.stopped):
                return 1
            return 1 if stop is not None and stop.is_set() else 0
        except BaseException as e:  # KeyboardInterrupt too: it stops the generation
            raised.append(e)
            return 1

    fn = _lib.TOKEN_FN(on_token)  # referenced here until ferry_generate returns
    n_out = ctypes.c_int32(0)
    with _signals_deferred(raised):
        st = _L.ferry_generate(ctx, prompt, len(prompt), ctypes.byref(gp), fn, None, None, 0,
                               ctypes.byref(n_out))
        err = _error(st) if st else None  # read the message on the thread that failed
    if raised:
        raise raised[0]
    if err:
        raise err
    put(decoder.decode(b"", final=True))
    if matcher is not None and not matcher.stopped:
        rest = matcher.flush()
        if rest:
            emit(rest)
    if matcher is not None and matcher.stopped:
        finish = "stop"
    elif gp.stop_at_eos and n_out.value > 0 and is_eos is not None and is_eos(last_id[0]):
        finish = "stop"
    else:
        finish = "length"
    return n_out.value, finish


class _End:
    """The last item a Stream's worker queues: how the generation ended."""

    def __init__(self, n_tokens, finish_reason):
        self.n_tokens = n_tokens
        self.finish_reason = finish_reason


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def _stream_worker(ctx, prompt, gp, q, stop, lock, stops, is_eos):
    """The body of a Stream's thread. It owns the model's lock from the Stream's start and
    releases it when the library is done with the context. It holds no reference to the
    Stream, so dropping the Stream (a `break`) finalizes it and stops this thread."""
    try:
        q.put(_End(*_generate_call(ctx, prompt, gp, q.put, stop, stops, is_eos)))
    except BaseException as e:
        q.put(_Failure(e))
    finally:
        lock.release()


class Stream:
    """An iterator over the text pieces of one generation, as they are generated.

    ferry_generate runs on a worker thread (started by the first next()) that hands the
    pieces over through a queue. Closing the iterator early (break out of a for loop over
    it, .close(), leaving a `with` block, or dropping it) makes the library's token
    callback return nonzero, so generation stops after the current token, and joins the
    thread. An error on the worker is raised by next() in the consumer. An exception while
    next() waits (Ctrl-C's KeyboardInterrupt) closes the stream, so the generation stops,
    and propagates.

    Once the iterator is exhausted, .finish_reason is "stop" (a stop string, or the
    end-of-sequence token) or "length" (max_tokens), and .n_tokens the number of tokens
    generated (EOS included); both are None before, and after an early close.
    """

    def __init__(self, model, prompt, gp, sampling, stops=()):
        self._model = model
        self._prompt = prompt
        self._gp = gp
        self._sampling = sampling
        self._stops = stops
        self._queue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = None
        self._done = False
        self.finish_reason = None
        self.n_tokens = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        try:
            item = self._queue.get()
        except BaseException:  # Ctrl-C while waiting: stop the generation, then raise
            self.close()
            raise
        if self._model._closed:
            self.close()
            raise ValueError("the ferry.Model was closed during streaming")
        if isinstance(item, _End):
            self.finish_reason = item.finish_reason
            self.n_tokens = item.n_tokens
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item

    def _start(self):
        m = self._model
        m._acquire()
        try:
            m._ensure_context(self._sampling)
            m._active_stop = self._stop
            self._thread = threading.Thread(
                target=_stream_worker, name="ferry-stream",
                args=(m._ctx, self._prompt, self._gp, self._queue, self._stop, m._lock,
                      self._stops, m._is_eos))
            self._thread.start()
        except BaseException:
            self._done = True
            m._lock.release()
            raise

    def close(self):
        """Stops the generation after the current token and waits for the worker. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._done = True
        if self._model._active_stop is self._stop:
            self._model._active_stop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_model", None) is not None:
            self.close()


class Model:
    """A model opened with ferry_model_open and one generation context (ferry_context).

    path: a Hugging Face Mixtral-style checkpoint folder. Keywords, as `ferry run` has them:
      gpu_mem     device memory budget, bytes or "6G"; None: everything resident
      offload     "ram" or "nvme": where offloaded experts live
      pack        a pack file (pack_model): the experts come from it in every mode (quantized
                  with quant="q8"/"q4"); the file "nvme" reads (None there: ferry's cache
                  folder)
      backend     "auto", "cpu" or "cuda"
      threads     compute threads; 0: one per physical core
      policy      "lru", "lfu", "layer-lru" or "predicted": which expert slot to evict
      prefetch    fetch the experts the next layers will probably use
      predictor   "gate", "stats", "combined" or "recency": what names those experts
      predictor_stats  the statistics file for "stats" and "combined"
      lookahead   prefetch layers l+1 .. l+lookahead (1 to 3)
      slots       use at most this many expert slots (0: what the budget holds)
      ctx         KV cache capacity in tokens (0: the model's maximum, capped at 4096)
      host_cache  "nvme": RAM cache in front of the pack file, bytes or "1G"; None: 1 GiB
      reader      "auto", "uring" or "pread": how the pack file is read
      hybrid      "auto" (each missing expert fetched or computed on the CPU, whichever
                  is sooner), "off" (always fetched) or "cpu-experts" (every expert on
                  the CPU)
      cpu_kernels "auto", "reference", "avx2", "avx512" or "avx512bf16"
      quant_dense None (the checkpoint's dtype), "q8" or "q4": the dense matmul weights
                  (attention projections, LM head) quantized in memory at open

    Raises FerryError when the library fails (a missing config.json is FERRY_ERR_IO),
    ValueError/TypeError for bad arguments. A Model is used by one thread at a time (see
    the package's doc); close() it, or use it as a context manager.

    Generation: generate(), stream(), generate_batch(), and, as llama-cpp-python's Llama,
    model(prompt, ...) / create_completion(prompt, ...) returning OpenAI-shaped dicts.
    """

    def __init__(self, path, *, gpu_mem=None, offload="ram", pack=None, backend="auto",
                 threads=0, policy="lru", prefetch=True, predictor="gate",
                 predictor_stats=None, lookahead=1, slots=0, ctx=0, host_cache=None,
                 reader="auto", hybrid="auto", cpu_kernels="auto", quant_dense=None):
        self._handle = None
        self._ctx = None
        self._closed = True
        self._lock = threading.Lock()
        self._active_stop = None

        # kept as long as the model, with the path strings it points to, to be safe
        self._mp = mp = _model_params(
            gpu_mem=gpu_mem, offload=offload, pack=pack, backend=backend, threads=threads,
            policy=policy, prefetch=prefetch, predictor=predictor,
            predictor_stats=predictor_stats, lookahead=lookahead, slots=slots,
            host_cache=host_cache, reader=reader, hybrid=hybrid, cpu_kernels=cpu_kernels,
            quant_dense=quant_dense)
        self._n_ctx = _int("ctx", ctx, 0, _INT32_MAX)
        model_dir = _path("path", path)
        # what create_completion reports as "model"
        self._name = os.path.basename(os.path.normpath(os.fsdecode(model_dir)))

        handle = ctypes.c_void_p()
        _check(_L.ferry_model_open(model_dir, ctypes.byref(mp), ctypes.byref(handle)))
        self._handle = handle.value
        self._closed = False
        try:
            info = _lib.ModelInfo()
            _check(_L.ferry_model_get_info(self._handle, ctypes.byref(info)))
            d = _struct_dict(info)  # device already a str
            d["backend"] = BACKENDS[info.backend] if 0 <= info.backend < 3 else str(info.backend)
            self._info = ModelInfo(**d)
            # The context now: with a device budget, the first context's KV cache and
            # workspace are placed before the expert slots are planned.
            self._ensure_context((0.0, 0, 1.0, 0))
            self._n_ctx_used = _L.ferry_context_n_ctx(self._ctx)  # ctx=0 resolved
        except BaseException:
            self.close()
            raise

    # -- lifetime --

    @property
    def closed(self):
        return self._closed

    def close(self):
        """Frees the context and the model. Idempotent. A running stream is stopped after
        its current token and waited for first."""
        if self._closed:
            return
        stop = self._active_stop
        if stop is not None:
            stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._ctx is not None:
                _L.ferry_context_free(self._ctx)
                self._ctx = None
            if self._handle is not None:
                _L.ferry_model_close(self._handle)
                self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_lock", None) is not None:
            self.close()

    def __repr__(self):
        if self._closed:
            return "<ferry.Model closed>"
        return "<ferry.Model %d layers x %d experts on %s>" % (
            self._info.n_layers, self._info.n_experts, self._info.device)

    def _check_open(self):
        if self._closed:
            raise ValueError("operation on a closed ferry.Model")

    def _acquire(self):
        """Takes the context for one operation, or raises: a Model runs one generation at
        a time and never waits for itself."""
        self._check_open()
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("ferry.Model is busy: a generation (a stream not yet finished "
                               "or closed) is running; a Model runs one at a time")
        if self._closed:
            self._lock.release()
            self._check_open()

    def _ensure_context(self, sampling):
        """A context whose sampler is (temperature, top_k, top_p, seed): kept while the
        settings stay the same (each generation resets it, which restarts the sampler from
        its seed), made anew when they change. Hold the lock."""
        if self._ctx is not None and self._sampling == sampling:
            return
        if self._ctx is not None:
            _L.ferry_context_free(self._ctx)  # first: its device memory goes to the new one
            self._ctx = None
        cp = _L.ferry_context_params_default()
        cp.n_ctx = self._n_ctx
        cp.temperature, cp.top_k, cp.top_p, cp.seed = sampling
        out = ctypes.c_void_p()
        _check(_L.ferry_context_create(self._handle, ctypes.byref(cp), ctypes.byref(out)))
        self._ctx = out.value
        self._sampling = sampling

    # -- model --

    @property
    def info(self):
        """ModelInfo: the shape, backend ("cpu"/"cuda") and device."""
        self._check_open()
        return self._info

    def tokenize(self, text, add_special=True):
        """Token ids of text (str) as the checkpoint's tokenizer.json gives them, with BOS
        (and what else the tokenizer adds) when add_special."""
        self._check_open()
        if not isinstance(text, str):
            raise TypeError("text must be a str, got %r" % (type(text).__name__,))
        data = text.encode("utf-8")
        cap = len(data) + 8
        n = ctypes.c_int32(0)
        while True:
            ids = (ctypes.c_int32 * cap)()
            n.value = -1
            st = _L.ferry_tokenize(self._handle, data, len(data), 1 if add_special else 0, ids,
                                   cap, ctypes.byref(n))
            if st == 0:
                return ids[:n.value]
            if n.value > cap:  # too small a buffer: the library said how many
                cap = n.value
                continue
            raise _error(st)

    def perplexity(self, text, window=512):
        """Perplexity of the model on text (str), as `ferry perplexity` computes it: windows
        of window - 1 tokens after BOS, each token scored once. Returns a dict of the
        ferry_perplexity_result fields (perplexity, nll, n_scored, n_windows, window,
        seconds). Uses a context of its own (with a device budget, its KV cache must fit)."""
        if not isinstance(text, str):
            raise TypeError("text must be a str, got %r" % (type(text).__name__,))
        window = _int("window", window, 2, _INT32_MAX)
        data = text.encode("utf-8")
        self._acquire()
        try:
            r = _lib.PerplexityResult()
            _check(_L.ferry_perplexity(self._handle, data, len(data), window, ctypes.byref(r)))
        finally:
            self._lock.release()
        return _struct_dict(r)

    def detokenize(self, ids, skip_special=True):
        """The text of token ids, as Hugging Face's decode(skip_special_tokens) gives it."""
        self._check_open()
        arr = self._ids_array("ids", ids, allow_empty=True)
        return self._decode_bytes(arr, skip_special).decode("utf-8", "replace")

    def _decode_bytes(self, arr, skip_special=True):
        """ferry_detokenize of a c_int32 array: the UTF-8 bytes."""
        cap = 16 * len(arr) + 64
        n = ctypes.c_size_t(0)
        while True:
            buf = ctypes.create_string_buffer(cap)
            n.value = 0
            st = _L.ferry_detokenize(self._handle, arr, len(arr), 1 if skip_special else 0, buf,
                                     cap, ctypes.byref(n))
            if st == 0:
                return buf.raw[:n.value]
            if n.value >= cap:  # too small a buffer: the library said how long
                cap = n.value + 1
                continue
            raise _error(st)

    @staticmethod
    def _ids_array(what, ids, allow_empty=False):
        if isinstance(ids, (str, bytes)):
            raise TypeError("%s must be a sequence of token ids" % what)
        ids = list(ids)
        for i in ids:
            _int("token id", i, -2**31, _INT32_MAX)
        if not ids and not allow_empty:
            raise ValueError("%s is empty" % what)
        return (ctypes.c_int32 * len(ids))(*ids)

    # -- generation --

    def _prepare(self, prompt, max_tokens, temperature, top_k, top_p, seed, stop_at_eos,
                 stop=None):
        _int("max_tokens", max_tokens, 0, _INT32_MAX)
        sampling = _sampling(temperature, top_k, top_p, seed)
        stops = _stops(stop)
        self._check_open()
        if isinstance(prompt, str):
            prompt = self._ids_array("prompt", self.tokenize(prompt, add_special=True))
        else:
            prompt = self._ids_array("prompt", prompt)
        gp = _L.ferry_generate_params_default()
        gp.n_predict = max_tokens
        gp.stop_at_eos = 1 if stop_at_eos else 0
        return prompt, gp, sampling, stops

    def _is_eos(self, token_id):
        return bool(_L.ferry_token_is_eos(self._handle, token_id))

    def _run(self, prompt, gp, sampling, stops):
        """One generation on this thread: (text, tokens generated, finish reason)."""
        self._acquire()
        try:
            self._ensure_context(sampling)
            pieces = []
            n, finish = _generate_call(self._ctx, prompt, gp, pieces.append, None, stops,
                                       self._is_eos)
            return "".join(pieces), n, finish
        finally:
            self._lock.release()

    def generate(self, prompt, max_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                 stop_at_eos=True, stream=False, stop=None):
        """Generates up to max_tokens tokens after prompt (a str, tokenized with BOS, or a
        list of token ids) and returns the generated text (without the prompt). Greedy at
        temperature 0; otherwise sampled with top_k/top_p, and the same seed gives the same
        text. Stops at the end-of-sequence token when stop_at_eos. stop: a str or a list of
        str; the text ends before the first occurrence of any of them (never containing
        it), and generation stops at the token that completes it, as `ferry run --stop` and
        the server's "stop" do. With stream=True, returns a Stream as stream() does.

        Ctrl-C (KeyboardInterrupt), or any exception a signal handler raises, stops the
        generation after the current token and propagates; the Model stays usable.
        Raises FerryError (e.g. FERRY_ERR_INVALID when the prompt and max_tokens do not fit
        in the context), ValueError/TypeError for bad arguments, RuntimeError while another
        generation of this Model runs."""
        if stream:
            return self.stream(prompt, max_tokens, temperature, top_k, top_p, seed, stop_at_eos,
                               stop)
        prompt, gp, sampling, stops = self._prepare(prompt, max_tokens, temperature, top_k,
                                                    top_p, seed, stop_at_eos, stop)
        return self._run(prompt, gp, sampling, stops)[0]

    def stream(self, prompt, max_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
               stop_at_eos=True, stop=None):
        """As generate(), but returns a Stream: an iterator of the text pieces as they are
        generated (their concatenation is generate()'s text). With stop strings, a piece
        that could be the start of one is held back until the text shows it is not, so
        nothing of a stop string is ever yielded. Arguments are checked now; generation
        starts at the first next(). Close it (or break out of the loop) to stop early;
        Ctrl-C while waiting for a piece stops it too."""
        prompt, gp, sampling, stops = self._prepare(prompt, max_tokens, temperature, top_k,
                                                    top_p, seed, stop_at_eos, stop)
        return Stream(self, prompt, gp, sampling, stops)

    # llama-cpp-python's create_completion arguments that ferry does not implement, with the
    # value that leaves the result unchanged: any other value is a ValueError naming them.
    _NOT_IMPLEMENTED = {"suffix": None, "min_p": 0.0, "typical_p": 1.0, "logprobs": None,
                        "echo": False, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                        "repeat_penalty": 1.0, "tfs_z": 1.0, "mirostat_mode": 0,
                        "stopping_criteria": None, "logits_processor": None, "grammar": None,
                        "logit_bias": None}
    # accepted whatever their value: they only matter with mirostat_mode (refused above)
    _IGNORED = frozenset(("mirostat_tau", "mirostat_eta"))

    def create_completion(self, prompt, *, max_tokens=16, temperature=0.8, top_p=0.95,
                          top_k=40, seed=None, stop=None, stream=False, model=None,
                          **llama_cpp_options):
        """A completion in the OpenAI shape, as llama-cpp-python's Llama.create_completion
        (and Llama.__call__) return it; model(prompt, ...) is the same call.

        prompt: a str (tokenized with BOS) or a list of token ids. max_tokens: up to this
        many tokens; None or <= 0: until the end-of-sequence token, a stop string or a full
        context. temperature, top_p, top_k: the sampler, with llama-cpp-python's defaults
        (0.8, 0.95, 40); temperature 0 is greedy. seed: an int gives the same text for the
        same arguments; None draws a new seed each call. stop: a str or a list of str, as
        generate() has it. model: the name the result reports (default: the name of the
        model's folder). All but prompt are keywords.

        Returns {"id": "cmpl-...", "object": "text_completion", "created": unix time,
        "model": name, "choices": [{"text": ..., "index": 0, "logprobs": None,
        "finish_reason": "stop" | "length"}], "usage": {"prompt_tokens", "completion_tokens",
        "total_tokens"}}: finish_reason is "stop" for a stop string or the end-of-sequence
        token, "length" for max_tokens or a full context; prompt_tokens counts BOS and
        completion_tokens the tokens generated (EOS included). With stream=True it returns
        an iterator of chunks of the same shape, one per text piece with finish_reason None,
        then one with text "" and the finish reason, which alone carries "usage"; breaking
        out of it (or closing it) stops the generation.

        Other llama-cpp-python arguments (suffix, min_p, typical_p, logprobs, echo,
        frequency_penalty, presence_penalty, repeat_penalty, tfs_z, mirostat_mode,
        stopping_criteria, logits_processor, grammar, logit_bias) are accepted only at the
        value that leaves the result unchanged (min_p=0.0, echo=False, ...): any other
        raises ValueError naming them. An unknown keyword raises TypeError. Otherwise raises
        as generate() does (FerryError, ValueError, TypeError, RuntimeError,
        KeyboardInterrupt)."""
        unknown = sorted(set(llama_cpp_options) - set(self._NOT_IMPLEMENTED) - self._IGNORED)
        if unknown:
            raise TypeError("create_completion() got unexpected keyword argument%s %s"
                            % ("s" if len(unknown) > 1 else "", ", ".join(map(repr, unknown))))
        changed = sorted(name for name, value in llama_cpp_options.items()
                         if name in self._NOT_IMPLEMENTED
                         and not _neutral(value, self._NOT_IMPLEMENTED[name]))
        if changed:
            raise ValueError("ferry does not implement %s: leave %s at %s" % (
                ", ".join(changed), "it" if len(changed) == 1 else "them",
                ", ".join("%s=%r" % (n, self._NOT_IMPLEMENTED[n]) for n in changed)))
        if model is not None and not isinstance(model, str):
            raise TypeError("model must be a str, got %r" % (type(model).__name__,))
        if seed is None:
            # the seed does not matter to greedy decoding: 0 keeps the context
            seed = 0 if temperature == 0 else int.from_bytes(os.urandom(8), "little")
        unlimited = max_tokens is None or (isinstance(max_tokens, int)
                                           and not isinstance(max_tokens, bool)
                                           and max_tokens <= 0)
        prompt, gp, sampling, stops = self._prepare(prompt, 0 if unlimited else max_tokens,
                                                    temperature, top_k, top_p, seed, True, stop)
        if unlimited:
            gp.n_predict = max(self._n_ctx_used - len(prompt) + 1, 0)
        head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion",
                "created": int(time.time()), "model": self._name if model is None else model}
        n_prompt = len(prompt)

        def usage(n):
            return {"prompt_tokens": n_prompt, "completion_tokens": n,
                    "total_tokens": n_prompt + n}

        def choice(text, finish):
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        if not stream:
            text, n, finish = self._run(prompt, gp, sampling, stops)
            return dict(head, choices=[choice(text, finish)], usage=usage(n))
        s = Stream(self, prompt, gp, sampling, stops)

        def chunks():
            with s:  # closing the generator (a break) stops the generation
                for piece in s:
                    yield dict(head, choices=[choice(piece, None)])
                yield dict(head, choices=[choice("", s.finish_reason)], usage=usage(s.n_tokens))
        return chunks()

    def __call__(self, prompt, **kwargs):
        """model(prompt, max_tokens=16, temperature=0.8, top_p=0.95, top_k=40, seed=None,
        stop=None, stream=False): create_completion(prompt, ...), as llama-cpp-python's
        Llama objects are called."""
        return self.create_completion(prompt, **kwargs)

    def generate_batch(self, prompts, max_tokens=64, *, temperature=0.0, top_k=0, top_p=1.0,
                       seed=0, stop_at_eos=True, max_batch=16, chunk=64, reorder=True):
        """Generates after every prompt of prompts (a non-empty list of str, each tokenized
        with BOS) at once, with ferry_batch_generate: each step, every unfinished sequence
        feeds its next prompt chunk (at most chunk tokens) or its last token; the MoE blocks
        run over all the step's tokens in layer-batches of at most max_batch tokens, each
        loading every expert its tokens route to once; reorder groups the tokens so that each
        layer-batch needs few experts. max_tokens: up to this many tokens per prompt (>= 1),
        or a list of one count per prompt. Sampling as generate(); each sequence samples with
        seed as if run alone, so the outputs equal generate()'s for each prompt alone, bit
        for bit. Returns a BatchResult (texts, ids, stats).

        The sequences' contexts are the call's own. With a device budget (gpu_mem) they come
        out of what the expert slots left, so the Model's context is freed first (made anew
        by the next generation, which resets stats()); too little room is FERRY_ERR_NOMEM.
        Raises ValueError/TypeError for bad arguments (a prompt and its count beyond the
        model's positions too), FerryError when the library fails, RuntimeError while
        another generation of this Model runs."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of str, got %r" % (type(prompts).__name__,))
        if not prompts:
            raise ValueError("prompts is empty: generate_batch needs at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError("prompts[%d] must be a str, got %r" % (i, type(p).__name__))
        n = _int("the number of prompts", len(prompts), 1, _INT32_MAX)
        if isinstance(max_tokens, (list, tuple)):
            if len(max_tokens) != n:
                raise ValueError("max_tokens has %d counts for %d prompts"
                                 % (len(max_tokens), n))
            counts = [_int("max_tokens[%d]" % i, k, 1, _INT32_MAX)
                      for i, k in enumerate(max_tokens)]
        else:
            counts = [_int("max_tokens", max_tokens, 1, _INT32_MAX)] * n
        bp = _L.ferry_batch_params_default()
        sp = bp.sampling  # a view into bp
        sp.temperature, sp.top_k, sp.top_p, sp.seed = _sampling(temperature, top_k, top_p, seed)
        bp.max_batch = _int("max_batch", max_batch, 1, _INT32_MAX)
        bp.chunk = _int("chunk", chunk, 1, _INT32_MAX)
        bp.reorder = 1 if reorder else 0
        bp.stop_at_eos = 1 if stop_at_eos else 0
        self._check_open()
        prompt_ids = [self.tokenize(p, add_special=True) for p in prompts]
        n_pos = self._info.max_positions
        for i, (ids, k) in enumerate(zip(prompt_ids, counts)):
            # checked here too: the output buffers below are sized by the counts
            if len(ids) + k - 1 > n_pos:
                raise ValueError("prompts[%d]: %d tokens + %d to generate exceed the model's "
                                 "%d positions" % (i, len(ids), k, n_pos))
        IdPtr = ctypes.POINTER(ctypes.c_int32)
        prompt_arrays = [(ctypes.c_int32 * len(ids))(*ids) for ids in prompt_ids]
        out_arrays = [(ctypes.c_int32 * k)() for k in counts]
        prompt_ptrs = (IdPtr * n)(*[ctypes.cast(a, IdPtr) for a in prompt_arrays])
        out_ptrs = (IdPtr * n)(*[ctypes.cast(a, IdPtr) for a in out_arrays])
        n_prompt = (ctypes.c_int32 * n)(*[len(ids) for ids in prompt_ids])
        n_predict = (ctypes.c_int32 * n)(*counts)
        n_out = (ctypes.c_int32 * n)()
        stats = _lib.BatchStats()
        self._acquire()
        try:
            if self._mp.gpu_mem_bytes and self._ctx is not None:
                # The slots were planned around this context: its KV cache and workspace
                # are the room the batch's contexts get (ferry_batch_generate's comment).
                _L.ferry_context_free(self._ctx)
                self._ctx = None
            _check(_L.ferry_batch_generate(self._handle, prompt_ptrs, n_prompt, n_predict, n,
                                           ctypes.byref(bp), out_ptrs, n_out,
                                           ctypes.byref(stats), None))
            ids = [out_arrays[i][:n_out[i]] for i in range(n)]
            texts = [self._continuation(p, g) for p, g in zip(prompt_ids, ids)]
        finally:
            self._lock.release()
        st = _struct_dict(stats)
        st["hit_rate"] = hit_rate(stats.hits, stats.misses, stats.cpu_experts)
        return BatchResult(texts=texts, ids=ids, stats=st)

    def _continuation(self, prompt_ids, ids):
        """The text ids add after prompt_ids, as ferry_generate's stream gives it:
        decode(prompt + ids) after decode(prompt), so no leading space is stripped and a
        character split across the two belongs to the continuation."""
        head = self._decode_bytes(self._ids_array("prompt", prompt_ids))
        whole = self._decode_bytes(self._ids_array("ids", prompt_ids + ids))
        if whole.startswith(head):
            cut = len(head)
        else:  # the prompt ends inside a character: it decoded to U+FFFD there
            cut = len(os.path.commonprefix([head, whole]))
            while cut > 0 and cut < len(whole) and whole[cut] & 0xC0 == 0x80:
                cut -= 1
        return whole[cut:].decode("utf-8", "replace")

    def stats(self):
        """Statistics of the last generation: the ferry_stats fields (n_prompt_tokens,
        n_decode_tokens, prefill/decode/sample seconds, tokens/s) and, when the model
        offloads experts, "offload": the ferry_offload_stats fields (tier and predictor as
        names, the per-distance predictor arrays as lists) with "hit_rate" and "layers"
        (one dict of ferry_layer_stats per layer) added; "hit_rate" is hit_rate() of the
        totals, hits / (hits + misses + cpu_experts)."""
        self._acquire()
        try:
            if self._ctx is None:
                self._ensure_context((0.0, 0, 1.0, 0))
            s = _lib.Stats()
            _check(_L.ferry_context_get_stats(self._ctx, ctypes.byref(s)))
            out = _struct_dict(s)
            n_layers = self._info.n_layers
            o = _lib.OffloadStats()
            layers = (_lib.LayerStats * n_layers)()
            _check(_L.ferry_context_get_offload_stats(self._ctx, ctypes.byref(o), layers,
                                                      n_layers))
        finally:
            self._lock.release()
        if o.enabled:
            off = _struct_dict(o)
            del off["enabled"]
            off["tier"] = OFFLOAD_TIERS[o.tier] if 0 <= o.tier < 2 else o.tier
            off["predictor"] = PREDICTORS[o.predictor] if 0 <= o.predictor < 4 else o.predictor
            off["uses_uring"] = bool(o.uses_uring)
            off["hybrid"] = HYBRID[o.hybrid] if 0 <= o.hybrid < 3 else o.hybrid
            off["hit_rate"] = hit_rate(o.hits, o.misses, o.cpu_experts)
            off["layers"] = [_struct_dict(layer) for layer in layers]
            out["offload"] = off
        return out
