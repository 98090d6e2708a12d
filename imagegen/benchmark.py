"""Benchmarks behind scripts/benchmark.py: attention calls (dense FlashAttention vs our sparse backends).

Times are medians of CUDA-event timings (triton.testing.do_bench) of forward + backward of one
attention call on (B, N, heads, 64) bf16 inputs; dense is SDPA causal on the same shapes, same process.
"""

from __future__ import annotations

import json
import math
import time

import torch

from imagegen.attention import Grid, attend
from imagegen.cuda_graph import captured
from imagegen.patterns import LayerSpec, PatternParams, build_mask

# (label, grid, batch): DESIGN.md section 4 shapes
ATTENTION_SHAPES = [
    ("64x64 palette", Grid(64, 64, 1), 16),
    ("64x64x3 subpixel", Grid(64, 64, 3), 4),
]
SCALING_SHAPES = [("1K", Grid(32, 32, 1)), ("4K", Grid(64, 64, 1)), ("16K", Grid(128, 128, 1))]


def median(values: list[float]) -> float:
    """The middle value (the upper one of the two middles for an even count)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def time_ms(fn, quick: bool = False, warmup_ms: int = 100, rep_ms: int = 500) -> float:
    """Median milliseconds of fn(): CUDA-event timings on a GPU (warm-up and repetition budgets in ms;
    quick: 25 and 100), a rough wall-clock median on a CPU."""
    if not torch.cuda.is_available():  # CPU: a rough wall-clock median, for --quick smoke runs only
        fn()
        ts = []
        for _ in range(1 if quick else 5):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return median(ts)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25 if quick else warmup_ms, rep=100 if quick else rep_ms, return_mode="median")


def graph_time_ms(fn, quick: bool = False) -> float:
    """Median milliseconds of fn() captured once as a CUDA graph and replayed: the GPU's own time for the
    work, without the Python and kernel-launch overhead that an eager call adds (CUDA only)."""
    return time_ms(captured(fn, warmups=3).replay, quick)


def attention_call(spec: str, grid: Grid, batch: int, heads: int = 8, dim: int = 64, backend: str = "auto",
                   device: str = "cuda", dtype=torch.bfloat16, run=None):
    """A closure running forward + backward of one attention call, on fresh random inputs
    (`run(q, k, v)`, when given, replaces the call through `attend`)."""
    n = grid.num_tokens
    q, k, v = (torch.randn(batch, n, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(batch, n, heads, dim, device=device, dtype=dtype)
    layer, params = LayerSpec.parse(spec), PatternParams()

    def step():
        q.grad = k.grad = v.grad = None
        (run(q, k, v) if run else attend(q, k, v, layer, grid, params, backend)).backward(g)

    return step


ROUNDS = 3  # each main time is the median of this many calls, each on freshly allocated inputs


def rounds_ms(spec: str, grid: Grid, batch: int, quick: bool = False, rounds: int = ROUNDS, **call) -> list[float]:
    """time_ms of `rounds` attention calls (attention_call(spec, grid, batch, **call)), each made afresh (new
    inputs, new allocations): one kernel's time can depend on more than its shapes, and a single timing
    would hide that."""
    return [time_ms(attention_call(spec, grid, batch, **call), quick) for _ in range(1 if quick else rounds)]


def experimental_variants(grid: Grid, batch: int, dtype, quick: bool) -> dict:
    """Other kernels for the same calls (some of them what `auto` runs on other shapes), timed on the same
    shapes for the record; one that fails records its error instead of stopping the benchmark."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from imagegen.attention import column_attention, dense_attention, flex_attention_pattern

    def with_backend(fn, backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return fn(q, k, v, grid)
        return run

    variants = {
        "local: flex, 64-token blocks": ("local", lambda q, k, v: flex_attention_pattern(
            q, k, v, grid, ("local",), PatternParams(), block=64)),
        "column: views + cuDNN attention": ("column", with_backend(column_attention, SDPBackend.CUDNN_ATTENTION)),
        "dense: cuDNN attention": ("dense", with_backend(dense_attention, SDPBackend.CUDNN_ATTENTION)),
        "local: flash sliding window": ("local", "flash"),
    }
    out = {}
    for name, (spec, how) in variants.items():  # how: a backend name, or a function run on q, k, v
        try:
            backend, run = (how, None) if isinstance(how, str) else ("auto", how)
            out[name] = rounds_ms(spec, grid, batch, quick, backend=backend, dtype=dtype, run=run)
        except Exception as e:  # a candidate that cannot run is a result, not a crash
            out[name] = f"failed: {type(e).__name__}: {str(e)[-400:]}"
    return out


def host_ms(fn, calls: int = 20) -> float:
    """Milliseconds of CPU time to issue one fn() (Python, dispatch, launches), measured with the GPU
    synchronised before the calls and not waited for: when this nears the GPU time, an eager timing
    measures the host, not the kernels."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


def host_profile(fn, calls: int = 20, top: int = 15) -> list[str]:
    """cProfile of issuing fn() `calls` times: the `top` functions by own time, as printed lines."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def self_device_us(event, own: bool = True) -> float:
    """A torch.profiler event's own GPU time in microseconds, or with own=False that of all the kernels it
    launched (the attributes' names differ across torch versions: cuda_ before device_)."""
    prefix = "self_" if own else ""
    t = getattr(event, f"{prefix}device_time_total", None)
    return getattr(event, f"{prefix}cuda_time_total", 0) if t is None else t


def _profiled(fn, calls: int):
    """torch.profiler's record of `calls` calls of fn() on the GPU, after one untraced call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def launched_kernels(fn) -> list[str]:
    """The names of the GPU work one call of fn launches (kernels and memsets), in order."""
    events = [e for e in _profiled(fn, 1).events() if e.device_type.name == "CUDA"]
    return [e.name for e in sorted(events, key=lambda e: e.time_range.start)]


def kernel_ms(fn, calls: int = 5) -> dict[str, float]:
    """GPU time per fn() of each kernel it launches (torch.profiler), slowest first."""
    prof = _profiled(fn, calls)
    times = {}
    for evt in prof.key_averages():
        if evt.device_type.name == "CUDA" and self_device_us(evt) > 0:
            times[evt.key] = self_device_us(evt) / 1e3 / calls
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


CALL_CANDIDATES = [("dense", "auto"), ("local", "auto"), ("local", "flash"), ("column", "auto"), ("column", "axial")]


def bench_call_costs(quick: bool = False, rounds: int = ROUNDS) -> dict:
    """Where the time of one attention call goes, for each (pattern, backend) of CALL_CANDIDATES on the
    attention-table shapes: eager and CUDA-graph medians over `rounds` fresh calls, the host's time to issue
    one call, and the GPU time of each kernel (CUDA only)."""
    rows = []
    for label, grid, batch in ATTENTION_SHAPES:
        for spec, backend in CALL_CANDIDATES:
            row = {"shape": label, "N": grid.num_tokens, "batch": batch, "spec": spec, "backend": backend}
            try:
                calls = [attention_call(spec, grid, batch, backend=backend) for _ in range(rounds)]
                row["eager_ms"] = [time_ms(c, quick) for c in calls]
                row["graph_ms"] = [graph_time_ms(c, quick) for c in calls]
                row["host_ms"] = host_ms(calls[0])
                row["kernels"] = kernel_ms(calls[0])
                row["host_profile"] = host_profile(calls[0])
            except Exception as e:  # a candidate that cannot run is a result
                row["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
            rows.append(row)
            print({k: v for k, v in row.items() if k not in ("kernels", "host_profile")}, flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "calls": rows}


def format_call_costs(result: dict) -> str:
    out = [(f"One attention call, forward+backward, bf16, 8 heads x 64: where its time goes ({result['device']}, "
            f"torch {result['torch']}; each eager and graph time is a median, one per fresh call)"),
           "| shape | pattern | backend | eager | CUDA graph | host, to issue | kernels (GPU time) |",
           "|---|---|---|---|---|---|---|"]
    for r in result["calls"]:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['spec']} | {r['backend']} | {r['error'][:120]} | | | |")
            continue
        kernels = ", ".join(f"{name[:40]} {ms:.3f}" for name, ms in list(r["kernels"].items())[:4])
        out.append(f"| {r['shape']} | {r['spec']} | {r['backend']} | {_listed(r['eager_ms'])} | "
                   f"{_listed(r['graph_ms'])} | {r['host_ms']:.3f} ms | {kernels} |")
    return "\n".join(out)


def attended_pairs(pattern: str, grid: Grid) -> int:
    if pattern == "dense":
        n = grid.num_tokens
        return n * (n + 1) // 2
    return int(build_mask(pattern, grid.height, grid.width, grid.channels).sum())


def bench_attention(quick: bool = False, device: str | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [("quick", Grid(8, 8, g.channels), 2) for _, g, _ in ATTENTION_SHAPES] if quick else ATTENTION_SHAPES
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(shapes, desc="attention shapes", unit="shape", disable=quick)  # on stderr
    for label, grid, batch in bar:
        res = {"shape": label, "N": grid.num_tokens, "batch": batch}
        res["rounds"] = {}
        for spec in ("dense", "local", "column", "row"):
            bar.set_postfix_str(f"{label}: {spec}")
            res["rounds"][spec] = rounds_ms(spec, grid, batch, quick, device=device, dtype=dtype)
            res[spec] = median(res["rounds"][spec])
        others = [("local", "flex"), ("local", "banded"), ("column", "axial")] if device == "cuda" else [
            ("local", "banded"), ("column", "axial")]
        for spec, backend in others:  # the other exact backends, for the record
            res[f"{spec}_{backend}"] = time_ms(attention_call(spec, grid, batch, backend=backend, device=device,
                                                              dtype=dtype), quick)
        if device == "cuda":
            bar.set_postfix_str(f"{label}: candidate kernels")
            res["experiments"] = experimental_variants(grid, batch, dtype, quick)
            bar.set_postfix_str(f"{label}: CUDA-graph replays")
            res["graph"] = {}
            for spec in ("dense", "local", "column"):  # the same calls without launch overhead
                try:
                    res["graph"][spec] = graph_time_ms(attention_call(spec, grid, batch, dtype=dtype), quick)
                except Exception as e:  # recorded, not fatal: the eager table above stands on its own
                    res["graph"][spec] = f"failed: {type(e).__name__}: {str(e)[-300:]}"

        res["sparse_mean"] = (res["local"] + res["column"]) / 2
        res["speedup_local"] = res["dense"] / res["local"]
        res["speedup_column"] = res["dense"] / res["column"]
        res["speedup_mean"] = res["dense"] / res["sparse_mean"]
        rows.append(res)
    scaling = []
    for label, grid in ([("quick", Grid(4, 4 * i, 1)) for i in (1, 2, 3)] if quick else SCALING_SHAPES):
        n = grid.num_tokens
        dense_t = time_ms(attention_call("dense", grid, 4, device=device, dtype=dtype), quick)
        local_t = time_ms(attention_call("local", grid, 4, device=device, dtype=dtype), quick)
        column_t = time_ms(attention_call("column", grid, 4, device=device, dtype=dtype), quick)
        sparse_pairs = (attended_pairs("local", grid) + attended_pairs("column", grid)) // 2
        row = {"seq": label, "N": n, "dense_pairs": attended_pairs("dense", grid), "sparse_pairs": sparse_pairs,
               "n_sqrt_n": int(n * math.sqrt(n)), "dense_ms": dense_t, "sparse_ms": (local_t + column_t) / 2}
        if device == "cuda":  # GPU time alone: at 1K an eager call is bound by the host, not the kernels
            graph = {spec: graph_time_ms(attention_call(spec, grid, 4, dtype=dtype), quick)
                     for spec in ("dense", "local", "column")}
            row["dense_graph_ms"], row["sparse_graph_ms"] = graph["dense"], (graph["local"] + graph["column"]) / 2
        scaling.append(row)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype)[6:],
            "torch": torch.__version__, "attention": rows, "scaling": scaling}


def _listed(value) -> str:
    """A list of timings as "0.512 / 0.530 / 0.498 ms"; an error message as it is."""
    if isinstance(value, float):
        value = [value]
    if isinstance(value, list):
        return " / ".join(f"{v:.3f}" for v in value) + " ms"
    return str(value)


def format_attention(result: dict) -> str:
    out = [(f"Attention, one call forward+backward, {result['dtype']}, head dim 64, 8 heads "
            f"({result['device']}, torch {result['torch']}; times are medians)"),
           ("| shape | N | batch | dense FA | local (auto) | local (flex) | local (banded) | "
            "column (auto) | column (axial SDPA) | row | mean(local, column) | x dense |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["attention"]:
        out.append(f"| {r['shape']} | {r['N']} | {r['batch']} | {r['dense']:.3f} ms | {r['local']:.3f} ms "
                   f"({r['speedup_local']:.1f}x) | {r.get('local_flex', float('nan')):.3f} ms | "
                   f"{r['local_banded']:.3f} ms | {r['column']:.3f} ms ({r['speedup_column']:.1f}x) | "
                   f"{r['column_axial']:.3f} ms | {r['row']:.3f} ms | {r['sparse_mean']:.3f} ms | "
                   f"{r['speedup_mean']:.2f}x |")
    rounds = len(next(iter(result["attention"][0].get("rounds", {}).values()), [0]))
    out += ["", (f"Each time above for dense, local, column and row is the median of {rounds} call(s) on fresh "
                 "inputs; all of them (and the candidates'):")]
    for r in result["attention"]:
        for spec, values in r.get("rounds", {}).items():
            out.append(f"- {r['shape']}, {spec} (auto): {_listed(values)}")
        for name, value in r.get("experiments", {}).items():
            out.append(f"- {r['shape']}, candidate {name}: {_listed(value)}")
    graphed = [r for r in result["attention"] if "graph" in r]
    if graphed:
        out += ["", "The same calls captured once as a CUDA graph and replayed (GPU time, no launch overhead)",
                "| shape | N | batch | dense FA | local (auto) | column (auto) | mean(local, column) | x dense |",
                "|---|---|---|---|---|---|---|---|"]
        for r in graphed:
            g = r["graph"]
            if all(isinstance(g.get(k), float) for k in ("dense", "local", "column")):
                mean = (g["local"] + g["column"]) / 2
                out.append(f"| {r['shape']} | {r['N']} | {r['batch']} | {g['dense']:.3f} ms | {g['local']:.3f} ms | "
                           f"{g['column']:.3f} ms | {mean:.3f} ms | {g['dense'] / mean:.2f}x |")
            else:
                out.append(f"| {r['shape']} | {r['N']} | {r['batch']} | " + " | ".join(
                    str(g.get(k))[:120] for k in ("dense", "local", "column")) + " | | |")
    graphed = all("dense_graph_ms" in r for r in result["scaling"])
    out += ["", "Scaling (batch 4, 8 heads; sparse = mean of local and column layers; eager calls"
            + (", then the same calls replayed as CUDA graphs)" if graphed else ")"),
            "| sequence | N | attended pairs dense | sparse | N*sqrt(N) | dense time | sparse time | x dense |"
            + (" dense, graph | sparse, graph | x dense |" if graphed else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if graphed else "")]
    for r in result["scaling"]:
        line = (f"| {r['seq']} | {r['N']} | {r['dense_pairs']:,} | {r['sparse_pairs']:,} | {r['n_sqrt_n']:,} | "
                f"{r['dense_ms']:.3f} ms | {r['sparse_ms']:.3f} ms | {r['dense_ms'] / r['sparse_ms']:.1f}x |")
        if graphed:
            line += (f" {r['dense_graph_ms']:.3f} ms | {r['sparse_graph_ms']:.3f} ms | "
                     f"{r['dense_graph_ms'] / r['sparse_graph_ms']:.1f}x |")
        out.append(line)
    return "\n".join(out)


def save(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def bench_sampling(quick: bool = False) -> dict:
    """Seconds to sample 64 images of 64x64 palette tokens from a 12-layer d=512 model (random weights:
    the cost does not depend on them), our dense and sparse layouts, bf16, SDPA backend pinned, CUDA graphs."""
    from imagegen.model import ImageTransformer, ModelConfig
    from imagegen.sampling import Sampler

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    side, batch, layers, width = (8, 4, 2, 64) if quick else (64, 64, 12, 512)
    rows = []
    for name, layout in (("ours, dense", ["dense"]), ("ours, sparse (local/column)", ["local", "column"])):
        cfg = ModelConfig(vocab_size=512, height=side, width=side, n_layer=layers, n_head=8, n_embd=width,
                          layout=layout)
        model = ImageTransformer(cfg).to(device, dtype).eval()
        sampler = Sampler(model, batch)  # CUDA graphs on a GPU
        seconds = []
        for seed in (0, 1):  # the first call captures the CUDA graphs; the second reuses them
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sampler.generate(seed=seed)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        rows.append({"sampler": name, "images": batch, "tokens": side * side, "params_M": model.num_params() / 1e6,
                     "first_call_seconds": seconds[0], "seconds": seconds[1],
                     "tokens_per_sec": batch * side * side / seconds[1]})
        del model, sampler
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "sampling": rows}


def format_sampling(result: dict) -> str:
    out = [f"Sampling ({result['device']}, torch {result['torch']})",
           "| sampler | images x tokens | params (non-emb.) | seconds | tokens/s | first call (incl. graph capture) |",
           "|---|---|---|---|---|---|"]
    for r in result["sampling"]:
        out.append(f"| {r['sampler']} | {r['images']} x {r['tokens']} | {r['params_M']:.1f}M | {r['seconds']:.2f} | "
                   f"{r['tokens_per_sec']:,.0f} | {r['first_call_seconds']:.2f} s |")
    return "\n".join(out)
