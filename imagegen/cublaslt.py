"""A cuBLASLt matmul with a GELU epilogue, called through ctypes (no extension to compile).

PyTorch's GEMMs are cuBLAS(Lt) calls, but none of its operators keeps the GELU's input for the backward
(`torch._addmm_activation` writes only gelu(a @ b)). cuBLASLt's GELU_AUX epilogue writes both, from the
GEMM's fp32 accumulator:

    out, pre = matmul_gelu(a, b)         # pre = a @ b, out = gelu_tanh(pre); a (M, K), b (K, N) -> (M, N)
    out = matmul(a, b)                   # the same GEMM without an epilogue
    out = matmul_add(a, b, c)            # c + a @ b: c (M, N) read in the epilogue (a residual stream's add)

`runs(a, b)` says whether a call qualifies: CUDA tensors in bf16 or fp16, each contiguous (row-major) or the
transpose of a contiguous matrix (a Linear weight's .t(), a gradient's .t()), the contiguous rows 16-byte
aligned (a multiple of 8 elements), both starting at a 256-byte boundary (as fresh PyTorch allocations do;
cuBLASLt's heuristic assumes that by default, so an algorithm chosen once fits every later call). The library is
the libcublasLt PyTorch itself loaded. Each shape's algorithm is chosen once: on its first call the candidates of
cuBLASLt's heuristic are timed and the fastest is kept (`plans()` lists them); each is timed as the median
replay of a CUDA graph of five calls (IMAGEGEN_CUBLASLT_TIMING=eager: five eager calls, as before; =sustained:
the four fastest timed once more after 0.3 s of load each, for power-limited cards; on an H200 no faster,
benchmarks/h200o/blas), which times the GPU alone and counts the memset that an algorithm needing a workspace
of a few bytes issues first (such an algorithm is also timed without a workspace, where it runs on a static
schedule without the memset). An
algorithm that needs a workspace (up to 32 MiB, e.g. split-K) gets it from PyTorch's allocator on each call, so
nothing is allocated outside PyTorch (CUDA-graph capture safe).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time

import torch

from imagegen.cuda_graph import captured, repeated

# cublasLt.h / cublas_api.h / library_types.h enum values
_EPILOGUE_DEFAULT, _EPILOGUE_GELU_AUX = 1, 32 | 128
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_AUX_POINTER, _DESC_AUX_LD = 3, 4, 7, 11, 12
_PREF_MAX_WORKSPACE_BYTES = 1
_MAX_WORKSPACE = 32 * 2**20
_COMPUTE_32F, _R_32F = 68, 0
_DATA_TYPES = {torch.bfloat16: 14, torch.float16: 2}
_OP_N, _OP_T = 0, 1
_CANDIDATES = 16  # heuristic answers asked for, per workspace limit
# An algorithm whose workspace is this small keeps only its tile scheduler's counter there, which cuBLASLt zeroes
# with a memset before each call (in a CUDA graph a memset node, about 4 us before its kernel starts on an
# H200); without a workspace the same algorithm runs with a static schedule and no memset. Both are candidates.
_SCHEDULER_WORKSPACE = 1024
# How candidates are timed: graph (default: in a CUDA graph), eager, or sustained (after the graph timing, the
# _SUSTAINED_CANDIDATES fastest again after 0.3 s of running each back to back: see _sustained_ms).
TIMING_ENV = "IMAGEGEN_CUBLASLT_TIMING"
_SUSTAINED_CANDIDATES = 4


class CublasLtError(RuntimeError):
    """cuBLASLt is missing, refused a call or has no algorithm for it (callers may fall back to torch.mm)."""


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _loaded_library_path() -> str | None:
    """The libcublasLt this process already mapped (PyTorch's), else the system's."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libcublasLt.so" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return ctypes.util.find_library("cublasLt")


@functools.cache
def _library() -> ctypes.CDLL:
    torch.cuda.current_blas_handle()  # makes PyTorch load cuBLAS and cuBLASLt
    path = _loaded_library_path()
    if path is None:
        raise CublasLtError("libcublasLt was not found in this process")
    lib = ctypes.CDLL(path)
    p, i, u64, i64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    signatures = {
        "cublasLtCreate": [ctypes.POINTER(p)],
        "cublasLtMatmulDescCreate": [ctypes.POINTER(p), i, i],
        "cublasLtMatmulDescSetAttribute": [p, i, p, sz],
        "cublasLtMatrixLayoutCreate": [ctypes.POINTER(p), i, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(p)],
        "cublasLtMatmulPreferenceSetAttribute": [p, i, p, sz],
        "cublasLtMatmulPreferenceDestroy": [p],
        "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, ctypes.POINTER(_Heuristic), ctypes.POINTER(i)],
        "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, ctypes.POINTER(_Algo), p, sz, p],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"cuBLASLt {what} failed with status {status}")


def _set(setter, obj, attribute: int, value) -> None:
    _check(setter(obj, attribute, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attribute}")


_handles: dict[int, ctypes.c_void_p] = {}
_plans: dict[tuple, "_Plan"] = {}
_lock = threading.Lock()


def _handle(device: int) -> ctypes.c_void_p:
    if device not in _handles:
        handle = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(_library().cublasLtCreate(ctypes.byref(handle)), "create")
        _handles[device] = handle
    return _handles[device]


class _Plan:
    """The descriptors and chosen algorithm of one (shape, layout, dtype, epilogue) on one device.

    Row-major out (M, N) = a (M, K) @ b (K, N) is column-major out^T (N, M) = b^T (N, K) @ a^T (K, M): cuBLAS's
    A is b (op N if b is contiguous, op T if b is the transpose of a contiguous (N, K) matrix), its B is a (op N
    if a is contiguous, op T if a is the transpose of a contiguous (K, M) matrix)."""

    def __init__(self, M: int, N: int, K: int, a_transposed: bool, b_transposed: bool, dtype: torch.dtype,
                 epilogue: int, device: int, accumulate: bool = False):
        lib, data_type = _library(), _DATA_TYPES[dtype]
        self.lib, self.handle, self.epilogue = lib, _handle(device), epilogue
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "descriptor")
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_TRANSA, ctypes.c_int32(_OP_T if b_transposed else _OP_N))
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_TRANSB, ctypes.c_int32(_OP_T if a_transposed else _OP_N))
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if epilogue != _EPILOGUE_DEFAULT:
            _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_AUX_LD, ctypes.c_int64(N))

        def layout(rows, cols, ld):
            handle = ctypes.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(handle), data_type, rows, cols, ld), "layout")
            return handle

        self.a_layout = layout(K, N, K) if b_transposed else layout(N, K, N)  # cuBLAS's A: our b
        self.b_layout = layout(M, K, M) if a_transposed else layout(K, M, K)  # cuBLAS's B: our a
        self.out_layout = layout(N, M, N)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(1.0 if accumulate else 0.0)  # out = a b + beta c
        self.algo, self.candidates, self.workspaces, self.timings_ms = None, [], [], []
        self.workspace = 0  # bytes the chosen algorithm needs
        self.chosen: int | None = None  # its index in candidates
        self.sustained_ms: dict[int, float] = {}  # IMAGEGEN_CUBLASLT_TIMING=sustained: candidate -> ms under load

    def set_aux(self, aux: torch.Tensor | None) -> None:
        if aux is not None:
            _set(self.lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))

    def _heuristic(self, max_workspace: int) -> list[tuple[_Algo, int]]:
        """cuBLASLt's heuristic's answers (algorithm, workspace bytes) within a workspace limit, best first."""
        pref = ctypes.c_void_p()
        _check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        _set(self.lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES,
             ctypes.c_uint64(max_workspace))
        results, count = (_Heuristic * _CANDIDATES)(), ctypes.c_int(0)
        status = self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a_layout, self.b_layout,
                                                         self.out_layout, self.out_layout, pref, _CANDIDATES, results,
                                                         ctypes.byref(count))
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        if status != 0 and max_workspace == 0:
            return []  # no algorithm without a workspace (CUBLAS_STATUS_NOT_SUPPORTED)
        _check(status, "heuristic")
        return [(results[i].algo, results[i].workspace_size) for i in range(count.value) if results[i].state == 0]

    def choose(self, run) -> None:
        """Ask the heuristic for candidates, within the workspace limit and without a workspace, add each one
        that keeps only a scheduler counter in its workspace once more without it (see _SCHEDULER_WORKSPACE),
        time each (outputs are overwritten by the real call after), keep the fastest. Under CUDA-graph capture
        nothing can be timed: the heuristic's first answer is used."""
        pairs: list[tuple[_Algo, int]] = []
        for max_workspace in (_MAX_WORKSPACE, 0):  # 0: the algorithms that issue no memset before their kernel
            pairs += [(algo, ws) for algo, ws in self._heuristic(max_workspace)
                      if bytes(algo) not in {bytes(a) for a, _ in pairs}]
        if not pairs:
            raise CublasLtError("cuBLASLt has no algorithm for this matmul and epilogue")
        capturing = torch.cuda.is_current_stream_capturing()
        if not capturing:  # the same algorithms without their scheduler's counter: no memset, a static schedule
            for algo, ws in list(pairs):
                if 0 < ws <= _SCHEDULER_WORKSPACE and self._runs(run, algo):
                    pairs.append((algo, 0))
        self.candidates, self.workspaces = [a for a, _ in pairs], [ws for _, ws in pairs]
        self.chosen = 0
        if not capturing and len(pairs) > 1:
            timing = os.environ.get(TIMING_ENV, "graph")
            calls = [lambda algo=algo, workspace=workspace: run(algo, workspace) for algo, workspace in pairs]
            self.timings_ms = [(_timed_ms if timing == "eager" else _graph_timed_ms)(call) for call in calls]
            ranked = sorted(range(len(pairs)), key=self.timings_ms.__getitem__)
            if timing == "sustained":  # the fastest few again, each once the card has settled under load
                self.sustained_ms = {i: _sustained_ms(calls[i]) for i in ranked[:_SUSTAINED_CANDIDATES]}
                ranked = sorted(self.sustained_ms, key=self.sustained_ms.__getitem__)
            self.chosen = ranked[0]
        self.algo, self.workspace = pairs[self.chosen]

    @staticmethod
    def _runs(run, algo: _Algo) -> bool:
        """Whether cuBLASLt takes the algorithm without a workspace (it answers with an error status if not)."""
        try:
            run(algo, 0)
        except CublasLtError:
            return False
        return True

    def __call__(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, algo: _Algo | None = None,
                 workspace: int | None = None, c: torch.Tensor | None = None) -> None:
        """out = a @ b (+ c, for a plan that accumulates; c laid out as out)."""
        stream = ctypes.c_void_p(torch.cuda.current_stream(a.device).cuda_stream)
        size = self.workspace if algo is None else workspace
        space = torch.empty(size, dtype=torch.uint8, device=a.device) if size else None
        _check(self.lib.cublasLtMatmul(self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(b.data_ptr()),
                                       self.a_layout, ctypes.c_void_p(a.data_ptr()), self.b_layout,
                                       ctypes.byref(self.beta), ctypes.c_void_p((out if c is None else c).data_ptr()),
                                       self.out_layout,
                                       ctypes.c_void_p(out.data_ptr()), self.out_layout,
                                       ctypes.byref(algo if algo is not None else self.algo),
                                       ctypes.c_void_p(space.data_ptr()) if size else None, size, stream), "matmul")


def _timed_ms(call, calls: int = 5) -> float:
    """Milliseconds a call, of `calls` issued back to back after a warm-up one."""
    call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def _captured(call, calls: int) -> torch.cuda.CUDAGraph:
    """`calls` calls captured back to back in one CUDA graph, replayed once."""
    graph = captured(repeated(call, calls))
    graph.replay()
    return graph


def _graph_timed_ms(call, calls: int = 5, replays: int = 5) -> float:
    """Milliseconds a call, of `calls` captured back to back in one CUDA graph: the median of `replays` timed
    replays. This is the GPU's time alone (an eager call of a short GEMM also times the host issuing it through
    ctypes), and what a call costs in a reduce-overhead step, where a memset cuBLASLt issues before its kernel
    is a graph node of its own."""
    graph = _captured(call, calls)
    times = sorted(_timed_ms(graph.replay, calls=1) for _ in range(replays))
    return times[replays // 2] / calls


def _sustained_ms(call, calls: int = 5, warm_s: float = 0.3, batches: int = 3) -> float:
    """Milliseconds a call once the card has run it back to back for `warm_s` seconds: where a card reaches its
    power limit (an H200 running GEMMs does within about 0.2 s), the clock it settles at depends on the
    kernel's energy, so this is the call's cost inside a long power-limited step; the median of `batches`
    timings of 20 back-to-back replays."""
    graph = _captured(call, calls)
    end = time.perf_counter() + warm_s
    while time.perf_counter() < end:
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    times = sorted(_timed_ms(graph.replay, calls=20) for _ in range(batches))
    return times[batches // 2] / calls


def _transposed(t: torch.Tensor) -> bool | None:
    """False for a contiguous (R, C) matrix, True for the transpose of a contiguous (C, R); None otherwise."""
    R, C = t.shape
    if t.stride() == (C, 1):
        return False
    if t.stride() == (1, R):
        return True
    return None


def runs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether matmul_gelu / matmul take these operands (see the module docstring)."""
    if not (a.is_cuda and b.device == a.device and a.dtype in _DATA_TYPES and b.dtype == a.dtype and a.dim() == 2
            and b.dim() == 2 and a.shape[1] == b.shape[0] and all(t.data_ptr() % 256 == 0 for t in (a, b))):
        return False
    layouts = _transposed(a), _transposed(b)
    return (None not in layouts and all(t.shape[0 if transposed else 1] % 8 == 0 for t, transposed in zip((a, b), layouts)))


def _matmul(a: torch.Tensor, b: torch.Tensor, epilogue: int, aux: torch.Tensor | None,
            c: torch.Tensor | None = None) -> torch.Tensor:
    if not runs(a, b):
        raise ValueError("cuBLASLt matmul needs CUDA bf16/fp16 operands a (M, K) and b (K, N), each contiguous "
                         f"or transposed, rows a multiple of 8 long, 256-byte aligned; got {a.dtype} {tuple(a.shape)}/{a.stride()} and "
                         f"{b.dtype} {tuple(b.shape)}/{b.stride()}")
    (M, K), N = a.shape, b.shape[1]
    if c is not None and not (c.shape == (M, N) and c.dtype == a.dtype and c.device == a.device
                              and c.stride() == (N, 1) and c.data_ptr() % 256 == 0):
        raise ValueError(f"cuBLASLt matmul_add needs c ({M}, {N}) contiguous, {a.dtype}, 256-byte aligned; got "
                         f"{c.dtype} {tuple(c.shape)}/{c.stride()}")
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    a_transposed, b_transposed = _transposed(a), _transposed(b)
    key = (M, N, K, a_transposed, b_transposed, a.dtype, epilogue, a.device.index, c is not None)
    with _lock:
        plan = _plans.get(key)
        if plan is None:
            plan = _plans[key] = _Plan(M, N, K, a_transposed, b_transposed, a.dtype, epilogue, a.device.index or 0,
                                       accumulate=c is not None)
        plan.set_aux(aux)
        if plan.algo is None:
            plan.choose(lambda algo, workspace: plan(a, b, out, algo, workspace, c))
        plan(a, b, out, c=c)
    return out


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b through cuBLASLt without an epilogue (for comparisons)."""
    return _matmul(a, b, _EPILOGUE_DEFAULT, None)


def matmul_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c + a @ b from one GEMM (beta = 1: the epilogue reads c; the sum rounded once)."""
    return _matmul(a, b, _EPILOGUE_DEFAULT, None, c)


def matmul_gelu(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(a @ b), a @ b) from one GEMM: the epilogue writes both."""
    pre = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    return _matmul(a, b, _EPILOGUE_GELU_AUX, pre), pre


def plans() -> list[dict]:
    """Each shape's chosen algorithm: the candidates' times (ms, first call) and which won."""
    names = {_EPILOGUE_DEFAULT: "none", _EPILOGUE_GELU_AUX: "gelu_aux"}
    out = []
    for (M, N, K, a_transposed, b_transposed, dtype, epilogue, _, accumulate), plan in _plans.items():
        chosen = plan.chosen if plan.algo is not None else None
        out.append({"M": M, "N": N, "K": K, "a_transposed": a_transposed, "b_transposed": b_transposed,
                    "dtype": str(dtype), "workspace": plan.workspace, "adds_c": accumulate,
                    "epilogue": names[epilogue], "candidate_ms": [round(t, 4) for t in plan.timings_ms],
                    "candidate_workspace": list(plan.workspaces), "chosen": chosen,
                    "sustained_ms": {i: round(t, 4) for i, t in plan.sustained_ms.items()}})
    return out
