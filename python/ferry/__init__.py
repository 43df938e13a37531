"""ferry: Python bindings of libferry, the Mixture-of-Experts inference engine.

A ctypes binding of include/ferry.h: no compiled extension, standard library only.

    import ferry
    with ferry.Model("models/tiny-moe-code", backend="cpu") as m:
        print(m.generate("def fibonacci(n):\\n", max_tokens=32))
        for piece in m.stream("import os\\n", max_tokens=16):
            print(piece, end="", flush=True)

libferry.so is found as ferry/_lib.py says: $FERRY_LIBRARY_PATH (a file or a folder), next
to the package, the source tree's build folder, the system's search path. Importing the
package raises LibraryNotFoundError (an ImportError) listing every place tried when none
has it.

Errors: every failing library call raises FerryError, with the status name
(FERRY_ERR_IO, ...) in .status and ferry_last_error()'s message in .message. Bad Python
arguments raise ValueError (or TypeError) before anything reaches the library.

Threads: a Model holds one ferry_context, so it runs one generation at a time and is used
by one thread at a time. A second generation started while one runs (a stream not yet
finished, say) raises RuntimeError instead of touching the context; tokenize, detokenize
and info are safe next to a running stream. Use one Model per thread for parallel work.
"""
import codecs
import ctypes
import dataclasses
import math
import os
import queue
import re
import threading

from . import _lib
from ._lib import LibraryNotFoundError

__all__ = ["Model", "ModelInfo", "Stream", "FerryError", "LibraryNotFoundError",
           "pack_model", "parse_size", "version", "library_path"]

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


def _sampling(max_tokens, temperature, top_k, top_p, seed):
    _int("max_tokens", max_tokens, 0, _INT32_MAX)
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


_PACK_FORMATS = {None: 0, "q8": 1, "q4": 2}


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
    out = {}
    for name, _ in s._fields_:
        v = getattr(s, name)
        out[name] = list(v) if isinstance(v, ctypes.Array) else v
    return out


# ---- generation --------------------------------------------------------------------------

def _generate_call(ctx, prompt, gp, emit, stop):
    """Runs ferry_generate on this thread, giving emit() each non-empty piece of text.
    Stops after the current token once stop (a threading.Event, or None) is set. Raises
    FerryError, or what emit raised. Returns the number of tokens generated."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    raised = []

    def on_token(token_id, text, length, user):
        # An exception must not cross into C: keep it, stop, and raise it after the call.
        try:
            if length:
                piece = decoder.decode(ctypes.string_at(text, length))
                if piece:
                    emit(piece)
            return 1 if stop is not None and stop.is_set() else 0
        except BaseException as e:  # KeyboardInterrupt too: it stops the generation
            raised.append(e)
            return 1

    fn = _lib.TOKEN_FN(on_token)  # referenced here until ferry_generate returns
    n_out = ctypes.c_int32(0)
    st = _L.ferry_generate(ctx, prompt, len(prompt), ctypes.byref(gp), fn, None, None, 0,
                           ctypes.byref(n_out))
    err = _error(st) if st else None  # read the message on the thread that failed
    if raised:
        raise raised[0]
    if err:
        raise err
    tail = decoder.decode(b"", final=True)
    if tail:
        emit(tail)
    return n_out.value


_END = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def _stream_worker(ctx, prompt, gp, q, stop, lock):
    """The body of a Stream's thread. It owns the model's lock from the Stream's start and
    releases it when the library is done with the context. It holds no reference to the
    Stream, so dropping the Stream (a `break`) finalizes it and stops this thread."""
    try:
        _generate_call(ctx, prompt, gp, q.put, stop)
        q.put(_END)
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
    thread. An error on the worker is raised by next() in the consumer.
    """

    def __init__(self, model, prompt, gp, sampling):
        self._model = model
        self._prompt = prompt
        self._gp = gp
        self._sampling = sampling
        self._queue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = None
        self._done = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if self._model._closed:
            self.close()
            raise ValueError("the ferry.Model was closed during streaming")
        if item is _END:
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
                args=(m._ctx, self._prompt, self._gp, self._queue, self._stop, m._lock))
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

        mp = _L.ferry_model_params_default()
        mp.n_threads = _int("threads", threads, 0, 1024)
        mp.backend = _choice("backend", backend, BACKENDS)
        no_budget = gpu_mem is None or (type(gpu_mem) is int and gpu_mem == 0)
        mp.gpu_mem_bytes = 0 if no_budget else parse_size(gpu_mem, "gpu_mem")
        mp.offload = _choice("offload", offload, OFFLOAD_TIERS)
        self._pack = _path("pack", pack)  # kept alive as long as the model, to be safe
        mp.pack_path = self._pack
        mp.host_cache_bytes = 0 if host_cache is None else parse_size(host_cache, "host_cache")
        mp.reader = _choice("reader", reader, READERS)
        mp.policy = _choice("policy", policy, POLICIES)
        if not isinstance(prefetch, (bool, int)):
            raise TypeError("prefetch must be True or False, got %r" % (prefetch,))
        mp.prefetch = 1 if prefetch else 0
        mp.predictor = _choice("predictor", predictor, PREDICTORS)
        self._predictor_stats = _path("predictor_stats", predictor_stats)
        mp.predictor_stats_path = self._predictor_stats
        mp.lookahead = _int("lookahead", lookahead, 1, 3)
        mp.max_slots = _int("slots", slots, 0, _INT32_MAX)
        mp.hybrid = _choice("hybrid", hybrid, HYBRID)
        mp.cpu_kernels = _choice("cpu_kernels", cpu_kernels, CPU_KERNELS)
        if quant_dense not in _PACK_FORMATS:
            raise ValueError("quant_dense must be None, 'q8' or 'q4', not %r" % (quant_dense,))
        mp.quant_dense = _PACK_FORMATS[quant_dense]
        self._n_ctx = _int("ctx", ctx, 0, _INT32_MAX)
        model_dir = _path("path", path)

        handle = ctypes.c_void_p()
        _check(_L.ferry_model_open(model_dir, ctypes.byref(mp), ctypes.byref(handle)))
        self._handle = handle.value
        self._closed = False
        try:
            info = _lib.ModelInfo()
            _check(_L.ferry_model_get_info(self._handle, ctypes.byref(info)))
            d = _struct_dict(info)
            d["backend"] = BACKENDS[info.backend] if 0 <= info.backend < 3 else str(info.backend)
            d["device"] = info.device.decode("utf-8", "replace")
            self._info = ModelInfo(**d)
            # The context now: with a device budget, the first context's KV cache and
            # workspace are placed before the expert slots are planned.
            self._ensure_context((0.0, 0, 1.0, 0))
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
        cap = 16 * len(arr) + 64
        n = ctypes.c_size_t(0)
        while True:
            buf = ctypes.create_string_buffer(cap)
            n.value = 0
            st = _L.ferry_detokenize(self._handle, arr, len(arr), 1 if skip_special else 0, buf,
                                     cap, ctypes.byref(n))
            if st == 0:
                return buf.raw[:n.value].decode("utf-8", "replace")
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

    def _prepare(self, prompt, max_tokens, temperature, top_k, top_p, seed, stop_at_eos):
        sampling = _sampling(max_tokens, temperature, top_k, top_p, seed)
        self._check_open()
        if isinstance(prompt, str):
            prompt = self._ids_array("prompt", self.tokenize(prompt, add_special=True))
        else:
            prompt = self._ids_array("prompt", prompt)
        gp = _L.ferry_generate_params_default()
        gp.n_predict = max_tokens
        gp.stop_at_eos = 1 if stop_at_eos else 0
        return prompt, gp, sampling

    def generate(self, prompt, max_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                 stop_at_eos=True, stream=False):
        """Generates up to max_tokens tokens after prompt (a str, tokenized with BOS, or a
        list of token ids) and returns the generated text (without the prompt). Greedy at
        temperature 0; otherwise sampled with top_k/top_p, and the same seed gives the same
        text. Stops at the end-of-sequence token when stop_at_eos. With stream=True,
        returns a Stream as stream() does. Raises FerryError (e.g. FERRY_ERR_INVALID when
        the prompt and max_tokens do not fit in the context), ValueError for bad
        arguments, RuntimeError while another generation of this Model runs."""
        if stream:
            return self.stream(prompt, max_tokens, temperature, top_k, top_p, seed, stop_at_eos)
        prompt, gp, sampling = self._prepare(prompt, max_tokens, temperature, top_k, top_p,
                                             seed, stop_at_eos)
        self._acquire()
        try:
            self._ensure_context(sampling)
            pieces = []
            _generate_call(self._ctx, prompt, gp, pieces.append, None)
            return "".join(pieces)
        finally:
            self._lock.release()

    def stream(self, prompt, max_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
               stop_at_eos=True):
        """As generate(), but returns a Stream: an iterator of the text pieces as they are
        generated (their concatenation is generate()'s text). Arguments are checked now;
        generation starts at the first next(). Close it (or break out of the loop) to stop
        early."""
        prompt, gp, sampling = self._prepare(prompt, max_tokens, temperature, top_k, top_p,
                                             seed, stop_at_eos)
        return Stream(self, prompt, gp, sampling)

    def stats(self):
        """Statistics of the last generation: the ferry_stats fields (n_prompt_tokens,
        n_decode_tokens, prefill/decode/sample seconds, tokens/s) and, when the model
        offloads experts, "offload": the ferry_offload_stats fields (tier and predictor as
        names, the per-distance predictor arrays as lists) with "hit_rate" and "layers"
        (one dict of ferry_layer_stats per layer) added."""
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
            lookups = o.hits + o.misses
            off["hit_rate"] = o.hits / lookups if lookups else 0.0
            off["layers"] = [_struct_dict(layer) for layer in layers]
            out["offload"] = off
        return out
