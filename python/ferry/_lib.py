"""ferry._lib: finds and loads libferry.so and declares, with ctypes, the C structs and the
functions of include/ferry.h that the package uses.

The structs mirror include/ferry.h field for field (same names, order and types), so
ctypes lays them out as the C compiler does; tests/test_python.py compiles a small C
program against the header and checks every size and offset. Change them together.

Lookup order (the first that exists is loaded):
  1. $FERRY_LIBRARY_PATH when set: a file, or a folder holding libferry.so. When it is set
     it is the only place tried, so a wrong value is an error rather than a silent
     fallback to another build.
  2. next to the package: ferry/libferry.so (where `pip install ./python` puts the library
     it builds), then libferry.so in the package's parent
  3. the source tree's build folder: ../../build/libferry.so from the package
  4. an installed ferry: libferry.so in `pkg-config --variable=libdir ferry` (the ferry.pc
     that `cmake --install BUILD --prefix P` writes; PKG_CONFIG_PATH=P/lib/pkgconfig)
  5. the system's search path: ctypes.util.find_library("ferry"), then "libferry.so"
Nothing found raises LibraryNotFoundError (an ImportError) listing every place tried.
Places are tried lazily: pkg-config runs only when the places before it have no library.
"""
import ctypes
import ctypes.util
import os
import shutil
import subprocess

LIB_NAME = "libferry.so"
ENV_VAR = "FERRY_LIBRARY_PATH"


class LibraryNotFoundError(ImportError):
    """libferry could not be found or loaded; the message lists every place tried."""


# ---- structs (include/ferry.h) ------------------------------------------------------------

c_int32, c_int64, c_uint64 = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64
c_float, c_double, c_int = ctypes.c_float, ctypes.c_double, ctypes.c_int


class ModelParams(ctypes.Structure):
    """ferry_model_params"""
    _fields_ = [
        ("n_threads", c_int32),
        ("backend", c_int32),
        ("gpu_mem_bytes", c_uint64),
        ("offload", c_int32),
        ("pack_path", ctypes.c_char_p),
        ("host_cache_bytes", c_uint64),
        ("reader", c_int32),
        ("policy", c_int32),
        ("prefetch", c_int32),
        ("predictor", c_int32),
        ("predictor_stats_path", ctypes.c_char_p),
        ("lookahead", c_int32),
        ("max_slots", c_int32),
        ("hybrid", c_int32),
        ("cpu_kernels", c_int32),
        ("quant_dense", c_int32),
    ]


class ModelInfo(ctypes.Structure):
    """ferry_model_info"""
    _fields_ = [
        ("n_vocab", c_int32),
        ("d_model", c_int32),
        ("d_ff", c_int32),
        ("n_layers", c_int32),
        ("n_heads", c_int32),
        ("n_kv_heads", c_int32),
        ("head_dim", c_int32),
        ("n_experts", c_int32),
        ("n_experts_used", c_int32),
        ("max_positions", c_int32),
        ("bos_id", c_int32),
        ("eos_id", c_int32),
        ("rope_theta", c_float),
        ("rms_eps", c_float),
        ("n_params", c_int64),
        ("backend", c_int32),
        ("device", ctypes.c_char * 128),
    ]


class ContextParams(ctypes.Structure):
    """ferry_context_params"""
    _fields_ = [
        ("n_ctx", c_int32),
        ("n_batch", c_int32),
        ("temperature", c_float),
        ("top_k", c_int32),
        ("top_p", c_float),
        ("seed", c_uint64),
    ]


class GenerateParams(ctypes.Structure):
    """ferry_generate_params"""
    _fields_ = [
        ("n_predict", c_int32),
        ("stop_at_eos", c_int),
        ("prompt_logits", ctypes.POINTER(c_float)),
    ]


class Stats(ctypes.Structure):
    """ferry_stats"""
    _fields_ = [
        ("n_prompt_tokens", c_int64),
        ("n_decode_tokens", c_int64),
        ("prefill_seconds", c_double),
        ("decode_seconds", c_double),
        ("sample_seconds", c_double),
        ("prefill_tokens_per_s", c_double),
        ("decode_tokens_per_s", c_double),
    ]


class LayerStats(ctypes.Structure):
    """ferry_layer_stats"""
    _fields_ = [
        ("hits", c_int64),
        ("misses", c_int64),
        ("prefetch_issued", c_int64),
        ("prefetch_used", c_int64),
        ("prefetch_wasted", c_int64),
        ("evictions", c_int64),
        ("bytes_to_device", c_uint64),
        ("bytes_from_disk", c_uint64),
        ("stall_seconds", c_double),
        ("cpu_experts", c_int64),
        ("cpu_tokens", c_int64),
    ]


class OffloadStats(ctypes.Structure):
    """ferry_offload_stats"""
    _fields_ = [
        ("enabled", c_int32),
        ("tier", c_int32),
        ("uses_uring", c_int32),
        ("n_slots", c_int32),
        ("slot_bytes", c_uint64),
        ("budget_bytes", c_uint64),
        ("dense_bytes", c_uint64),
        ("context_bytes", c_uint64),
        ("slots_bytes", c_uint64),
        ("hits", c_int64),
        ("misses", c_int64),
        ("prefetch_issued", c_int64),
        ("prefetch_used", c_int64),
        ("prefetch_wasted", c_int64),
        ("bytes_to_device", c_uint64),
        ("bytes_from_disk", c_uint64),
        ("stall_seconds", c_double),
        ("copy_seconds", c_double),
        ("predictor", c_int32),
        ("predictions", c_int64 * 4),
        ("precision", c_double * 4),
        ("recall", c_double * 4),
        ("hybrid", c_int32),
        ("cpu_experts", c_int64),
        ("cpu_tokens", c_int64),
        ("cpu_bytes", c_uint64),
        ("cpu_seconds", c_double),
        ("cpu_wait_seconds", c_double),
        ("cost_fetch_bytes_per_s", c_double),
        ("cost_cpu_bytes_per_s", c_double),
    ]


class PackParams(ctypes.Structure):
    """ferry_pack_params"""
    _fields_ = [("format", c_int32)]


class PerplexityResult(ctypes.Structure):
    """ferry_perplexity_result"""
    _fields_ = [
        ("perplexity", c_double),
        ("nll", c_double),
        ("n_scored", c_int64),
        ("n_windows", c_int32),
        ("window", c_int32),
        ("seconds", c_double),
    ]


class BatchParams(ctypes.Structure):
    """ferry_batch_params"""
    _fields_ = [
        ("max_batch", c_int32),
        ("chunk", c_int32),
        ("reorder", c_int32),
        ("stop_at_eos", c_int32),
        ("sampling", ContextParams),
    ]


class BatchStats(ctypes.Structure):
    """ferry_batch_stats"""
    _fields_ = [
        ("steps", c_int64),
        ("tokens", c_int64),
        ("layer_batches", c_int64),
        ("expert_loads", c_int64),
        ("expert_bytes", c_uint64),
        ("bytes_to_device", c_uint64),
        ("hits", c_int64),
        ("misses", c_int64),
        ("seconds", c_double),
        ("cpu_experts", c_int64),
    ]


class Bandwidths(ctypes.Structure):
    """ferry_bandwidths"""
    _fields_ = [
        ("device_gbps", c_double),
        ("pinned_h2d_gbps", c_double),
        ("pageable_h2d_gbps", c_double),
        ("host_read_gbps", c_double),
        ("n_bytes", c_uint64),
        ("disk_gbps", c_double),
        ("disk_direct", c_int32),
        ("disk_path", ctypes.c_char * 256),
    ]


class BenchParams(ctypes.Structure):
    """ferry_bench_params"""
    _fields_ = [
        ("mode", c_int32),
        ("prompt_len", c_int32),
        ("gen_len", c_int32),
        ("repeat", c_int32),
        ("bandwidth_bytes", c_uint64),
        ("batch", c_int32),
    ]


class BenchResult(ctypes.Structure):
    """ferry_bench_result"""
    _fields_ = [
        ("bw", Bandwidths),
        ("backend", c_int32),
        ("device", ctypes.c_char * 128),
        ("prefill_tokens_per_s", c_double),
        ("decode_tokens_per_s", c_double),
        ("latency_median_ms", c_double),
        ("latency_p90_ms", c_double),
        ("dense_bytes_per_token", c_uint64),
        ("expert_bytes_per_token", c_uint64),
        ("kv_bytes_per_token", c_uint64),
        ("offload", c_int32),
        ("hit_rate", c_double),
        ("moved_bytes_per_token", c_double),
        ("stall_ms_per_token", c_double),
        ("fetch_gbps", c_double),
        ("disk_bytes_per_token", c_double),
        ("hybrid", c_int32),
        ("cpu_experts_per_token", c_double),
        ("cpu_bytes_per_token", c_double),
        ("cpu_gbps", c_double),
        ("bound_tokens_per_s", c_double),
        ("fraction_of_bound", c_double),
        ("batch_tokens_per_s", c_double),
        ("batch_expert_loads_per_token", c_double),
        ("batch_moved_bytes_per_token", c_double),
        ("working_set_bytes", c_uint64),
    ]


# C type name -> mirror, for the layout test.
STRUCTS = {
    "ferry_model_params": ModelParams,
    "ferry_model_info": ModelInfo,
    "ferry_context_params": ContextParams,
    "ferry_generate_params": GenerateParams,
    "ferry_stats": Stats,
    "ferry_layer_stats": LayerStats,
    "ferry_offload_stats": OffloadStats,
    "ferry_perplexity_result": PerplexityResult,
    "ferry_pack_params": PackParams,
    "ferry_batch_params": BatchParams,
    "ferry_batch_stats": BatchStats,
    "ferry_bandwidths": Bandwidths,
    "ferry_bench_params": BenchParams,
    "ferry_bench_result": BenchResult,
}

# int (*ferry_token_fn)(int32_t id, const char *text, size_t len, void *user). The text is
# declared as a void pointer so ctypes hands over the address and the callback reads
# exactly len bytes (the text is not NUL-terminated).
TOKEN_FN = ctypes.CFUNCTYPE(c_int, c_int32, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)

# Opaque handles travel as void pointers.
_p = ctypes.c_void_p
_P = ctypes.POINTER

# name: (restype, argtypes)
_FUNCTIONS = {
    "ferry_last_error": (ctypes.c_char_p, []),
    "ferry_status_name": (ctypes.c_char_p, [c_int]),
    "ferry_version": (ctypes.c_char_p, []),
    "ferry_cuda_probe": (c_int, [ctypes.c_char_p, ctypes.c_size_t]),
    "ferry_model_params_default": (ModelParams, []),
    "ferry_model_open": (c_int, [ctypes.c_char_p, _P(ModelParams), _P(_p)]),
    "ferry_model_close": (None, [_p]),
    "ferry_pack_params_default": (PackParams, []),
    "ferry_pack_model": (c_int, [ctypes.c_char_p, ctypes.c_char_p, _P(PackParams)]),
    "ferry_model_get_info": (c_int, [_p, _P(ModelInfo)]),
    "ferry_tokenize": (c_int, [_p, ctypes.c_char_p, ctypes.c_size_t, c_int, _P(c_int32), c_int32,
                               _P(c_int32)]),
    "ferry_detokenize": (c_int, [_p, _P(c_int32), c_int32, c_int, ctypes.c_char_p,
                                 ctypes.c_size_t, _P(ctypes.c_size_t)]),
    "ferry_token_is_eos": (c_int, [_p, c_int32]),
    "ferry_context_params_default": (ContextParams, []),
    "ferry_context_create": (c_int, [_p, _P(ContextParams), _P(_p)]),
    "ferry_context_free": (None, [_p]),
    "ferry_context_n_ctx": (c_int32, [_p]),
    "ferry_generate_params_default": (GenerateParams, []),
    "ferry_generate": (c_int, [_p, _P(c_int32), c_int32, _P(GenerateParams), TOKEN_FN, _p,
                               _P(c_int32), c_int32, _P(c_int32)]),
    "ferry_context_get_stats": (c_int, [_p, _P(Stats)]),
    "ferry_context_get_offload_stats": (c_int, [_p, _P(OffloadStats), _P(LayerStats), c_int32]),
    "ferry_perplexity": (c_int, [_p, ctypes.c_char_p, ctypes.c_size_t, c_int32,
                                 _P(PerplexityResult)]),
    "ferry_batch_params_default": (BatchParams, []),
    "ferry_batch_generate": (c_int, [_p, _P(_P(c_int32)), _P(c_int32), _P(c_int32), c_int32,
                                     _P(BatchParams), _P(_P(c_int32)), _P(c_int32),
                                     _P(BatchStats), _P(c_int64)]),
    "ferry_bench_params_default": (BenchParams, []),
    "ferry_bench_run": (c_int, [ctypes.c_char_p, _P(ModelParams), _P(BenchParams),
                                _P(BenchResult)]),
}


# ---- lookup -------------------------------------------------------------------------------

def _package_dir():
    return os.path.dirname(os.path.abspath(__file__))


def _pkg_config_libdir():
    """(libdir, None) from `pkg-config --variable=libdir ferry`, or (None, why not)."""
    exe = shutil.which("pkg-config")
    if exe is None:
        return None, "pkg-config is not installed"
    try:
        p = subprocess.run([exe, "--variable=libdir", "ferry"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, "pkg-config failed: %s" % e
    libdir = p.stdout.strip()
    if p.returncode != 0 or not libdir:
        return None, "no ferry.pc on pkg-config's search path (PKG_CONFIG_PATH)"
    return libdir, None


def candidates():
    """The places to try, in order, as (description, path or bare name) pairs; a generator,
    so the later places (pkg-config) are only looked at when the earlier ones fail. A place
    that cannot even be named comes as (description, None) with the reason in the
    description."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = os.path.abspath(os.path.join(env, LIB_NAME) if os.path.isdir(env) else env)
        yield ("%s=%s" % (ENV_VAR, env), path)
        return
    pkg = _package_dir()
    yield ("next to the package", os.path.join(pkg, LIB_NAME))
    yield ("the package's parent folder", os.path.join(os.path.dirname(pkg), LIB_NAME))
    yield ("the source tree's build folder",
           os.path.normpath(os.path.join(pkg, os.pardir, os.pardir, "build", LIB_NAME)))
    libdir, why = _pkg_config_libdir()
    if libdir:
        # a relocatable ferry.pc says ${pcfiledir}/../..: normalized for the message
        yield ("pkg-config --variable=libdir ferry",
               os.path.normpath(os.path.join(libdir, LIB_NAME)))
    else:
        yield ("pkg-config --variable=libdir ferry: %s" % why, None)
    found = ctypes.util.find_library("ferry")
    if found:
        yield ('ctypes.util.find_library("ferry")', found)
    yield ("the system's library search path", LIB_NAME)


def _declare(lib, path):
    for name, (restype, argtypes) in _FUNCTIONS.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise LibraryNotFoundError("%s has no symbol %s: it was built from another "
                                       "version of ferry.h than this package" % (path, name))
        fn.restype = restype
        fn.argtypes = argtypes


def load():
    """Loads libferry as the lookup order says; returns (CDLL, path loaded)."""
    tried = []
    for what, path in candidates():
        if path is None:
            tried.append(what)
            continue
        bare = os.sep not in path
        if not bare and not os.path.isfile(path):
            tried.append("%s: %s (no such file)" % (what, path))
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append("%s: %s (%s)" % (what, path, e))
            continue
        _declare(lib, path)
        return lib, path
    raise LibraryNotFoundError(
        "libferry not found; install the package with `pip install ./python` (which builds "
        "and bundles it), install ferry (cmake --install) where pkg-config finds it, build it "
        "(cmake --build build) or set %s to libferry.so or its folder. Tried:\n  %s"
        % (ENV_VAR, "\n  ".join(tried)))


lib, path = load()
