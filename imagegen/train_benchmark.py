"""Training-step benchmark behind `scripts/benchmark.py train`: our dense and sparse models against the
anchor a user would write instead (../shared/anchors/model_bench.py, a nanoGPT-style dense GPT on
FlashAttention), in the same process on the same card.

One step = forward, loss, backward and a fused AdamW update, under bf16 autocast, with the loss
function compiled (torch.compile) exactly as training runs it (imagegen.lit). Times are medians of
CUDA-event timings (triton.testing.do_bench). MFU counts the FLOPs actually computed: 6 per parameter
per token for the matmuls (embeddings excluded) plus 12 * d per attended key per token for attention
(the anchor's own convention), against the card's dense bf16 peak.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import re
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from imagegen.benchmark import kernel_ms, self_device_us, time_ms
from imagegen.compare import with_settings
from imagegen.gpu_clock import ClockSampler
from imagegen.inductor_sums import installed as column_sums_installed
from imagegen.model import ImageTransformer, ModelConfig
from imagegen.patterns import parse_layout

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 datasheet FLOP/s

# (label, vocab, height, width, channels, layers, width d, heads, batch): the three sizes
SIZES = [
    ("12L d512, 64x64 palette", 512, 64, 64, 1, 12, 512, 8, 8),
    ("12L d512, 64x64x3 subpixel", 256, 64, 64, 3, 12, 512, 8, 2),
    ("24L d1024, 64x64 palette", 512, 64, 64, 1, 24, 1024, 16, 4),
]
QUICK_SIZES = [("quick", 64, 8, 8, 1, 2, 32, 2, 2), ("quick C=3", 64, 6, 6, 3, 2, 32, 2, 2)]
LAYOUTS = {"dense": ["dense"], "sparse": ["local", "column"]}  # conf/model/dense.yaml, sparse.yaml


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def attended_keys(pattern: str, height: int, row_len: int) -> float:
    """Mean keys per query, the anchor's convention (dense N/2, local L, column H/2, row L/2); other
    patterns and unions count as dense (an upper bound)."""
    keys = {"local": row_len, "column": height / 2, "row": row_len / 2}
    return keys.get(pattern, height * row_len / 2)


def step_flops(params_non_emb: int, layers: list[str], d: int, height: int, row_len: int) -> float:
    """FLOPs of one training step per token."""
    return 6 * params_non_emb + sum(12 * d * attended_keys(p, height, row_len) for p in layers)


def model_step_flops(model: ImageTransformer) -> float:
    """step_flops of one of our models; each layer counted by the first pattern of its first head group."""
    cfg = model.cfg
    specs = parse_layout(cfg.layout)
    layers = [specs[i % len(specs)].groups[0][0] for i in range(cfg.n_layer)]
    return step_flops(model.num_params(), layers, cfg.n_embd, cfg.height, cfg.grid.row_len)


def size_config(kind: str, size: tuple, activation_checkpointing: bool = False,
                residual_dtype: str = "float32", mlp_backend: str = "torch") -> ModelConfig:
    """The ModelConfig of `kind` (dense or sparse) at a size tuple (label, vocab, H, W, C, layers, d, heads[,
    batch])."""
    _, V, H, W, C, n_layer, d, heads = size[:8]
    return ModelConfig(vocab_size=V, height=H, width=W, channels=C, n_layer=n_layer, n_head=heads, n_embd=d,
                       layout=LAYOUTS[kind], activation_checkpointing=activation_checkpointing,
                       residual_dtype=residual_dtype, mlp_backend=mlp_backend)


def our_model(kind: str, size: tuple, device: str, compile_mode: str = "default", residual_dtype: str = "float32",
              mlp_backend: str = "torch"):
    """Our model (`kind` = dense or sparse) at one of SIZES, and its loss as training runs it: compiled
    on a GPU, eager on a CPU."""
    model = ImageTransformer(size_config(kind, size, residual_dtype=residual_dtype, mlp_backend=mlp_backend)).to(device)
    return model, torch.compile(model.loss, mode=compile_mode) if device == "cuda" else model.loss


def training_step(model: torch.nn.Module, loss_fn, batch: int, n_tokens: int, vocab: int, device: str):
    """One step on random tokens: forward and loss under bf16 autocast (GPU), backward, fused AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    tokens = torch.randint(0, vocab, (batch, n_tokens), device=device)

    def step():
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _measure(step, device: str, quick: bool):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    with ClockSampler() as clocks:  # the card's SM clock and power while the step is timed
        ms = time_ms(step, quick, warmup_ms=200, rep_ms=1500)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return ms, mem, compile_s, host_ms(step, device), clocks.summary()


def host_ms(step, device: str, steps: int = 5) -> float:
    """Median milliseconds the host takes to issue one step, each started on an idle GPU (on a CPU: the step's
    wall time). Near ms/step, the step waits on the host (or on a synchronisation inside it); well below, the
    GPU's own work sets the pace."""
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def load_anchor(path: str | Path):
    """The anchor module, loaded from its file (it lives outside this repository)."""
    spec = importlib.util.spec_from_file_location("anchor_model_bench", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inductor_settings(text: str) -> dict:
    """`"triton.mix_order_reduction_split_size=64,coordinate_descent_tuning=True"` -> {key: value} for
    torch._inductor.config.patch (values are Python literals, else strings); "" or "none" -> {}."""
    settings = {}
    if text.strip() == "none":
        return settings
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"an Inductor setting is key=value, got {item!r}")
        try:
            settings[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            settings[key.strip()] = value.strip()
    import torch._inductor.config as inductor_config

    for key in settings:
        owner, _, name = key.rpartition(".")
        if not hasattr(inductor_config if not owner else getattr(inductor_config, owner, None), name):
            raise ValueError(f"torch {torch.__version__} has no Inductor setting {key!r}")
    return settings


def row_label(kind: str, compile_mode: str, residual_dtype: str, mlp_backend: str, inductor: str = "") -> str:
    """A train-table row's model name: `kind` with its speed settings (compare.with_settings) and, when it
    sets any, the Inductor settings it ran with."""
    label = with_settings(kind, compile_mode, residual_dtype, mlp_backend)
    return f"{label}, {inductor}" if inductor_settings(inductor) else label


def bench_one(kind: str, size: tuple, device: str, quick: bool, anchor=None, compile_mode: str = "default",
              residual_dtype: str = "float32", mlp_backend: str = "torch", inductor: str = "") -> dict:
    """One row of the train table; `inductor` (see inductor_settings) patches torch._inductor.config while
    our model compiles and runs."""
    import torch._inductor.config as inductor_config

    inductor = inductor if kind != "anchor" else ""
    label, V, H, W, C, n_layer, d, heads, batch = size
    n, row_len = H * W * C, W * C
    torch.manual_seed(0)
    if kind == "anchor":
        # the anchor's GPT: (V, N, d, h, L, kinds, H, W); its W is the row length
        model = anchor.GPT(V, n, d, heads, n_layer, ["dense"], H, row_len).to(device)
        compiled = torch.compile(model)
        def loss_fn(t):
            return compiled(t, t)  # random tokens: the target does not change the cost
        params = sum(p.numel() for p in model.parameters()) - V * d - n * d
        flops = step_flops(params, ["dense"] * n_layer, d, H, row_len)
    else:
        model, loss_fn = our_model(kind, size, device, compile_mode, residual_dtype, mlp_backend)
        params = model.num_params()
        flops = model_step_flops(model)
    # torch.compile compiles in the untimed first steps; the anchor compiles as stock Inductor does
    with inductor_config.patch(inductor_settings(inductor)), column_sums_installed(kind != "anchor"):
        ms, mem, compile_s, host, clocks = _measure(training_step(model, loss_fn, batch, n, V, device), device,
                                                     quick)
    tokens_per_sec = batch * n / (ms / 1e3)
    peak = peak_flops()
    mfu = tokens_per_sec * flops / peak if peak else None
    del model, loss_fn
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    compiled_with = compile_mode if device == "cuda" and kind != "anchor" else "default"  # CPU: eager
    return {"size": label, "model": row_label(kind, compiled_with, residual_dtype, mlp_backend, inductor),
            "N": n, "batch": batch, "layers": n_layer, "d": d, "heads": heads, "params_M": params / 1e6,
            "ms_per_step": ms, "host_ms_per_step": host, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
            "peak_mem_gib": mem, "warmup_s": compile_s, "clocks": clocks}


def bench_train(quick: bool = False, anchor_path: str | None = None, sizes: list[int] | None = None,
                compile_modes: tuple[str, ...] = ("default",), residual_dtypes: tuple[str, ...] = ("float32",),
                models: tuple[str, ...] = ("dense", "sparse"), mlp_backends: tuple[str, ...] = ("torch",),
                inductor: tuple[str, ...] = ("",)) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    anchor = load_anchor(anchor_path) if anchor_path else None
    table = QUICK_SIZES if quick else SIZES
    rows = []
    for i, size in enumerate(table):
        if sizes is not None and i not in sizes:
            continue
        runs = [("anchor", "default", "float32", "torch", "")] if anchor else []
        modes = compile_modes if device == "cuda" else ("default",)  # nothing is compiled on a CPU
        runs += [(kind, mode, residual, mlp, settings) for mode in modes for residual in residual_dtypes
                 for mlp in mlp_backends for settings in inductor for kind in models]
        for kind, mode, residual, mlp, settings in runs:
            try:
                rows.append(bench_one(kind, size, device, quick, anchor, mode, residual, mlp, settings))
            except torch.OutOfMemoryError as e:  # a size that does not fit is a result, not a crash
                rows.append({"size": size[0], "model": row_label(kind, mode, residual, mlp, settings),
                             "error": f"out of memory: {str(e)[:120]}"})
            print(rows[-1], flush=True)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "peak_flops": peak_flops(), "train": rows}


def format_train(result: dict) -> str:
    out = [(f"Training step: forward + backward + fused AdamW, bf16 autocast, compiled "
            f"({result['device']}, torch {result['torch']}; medians)"),
           ("| size | N x batch | model | params | ms/step | host ms/step | tokens/s | x anchor | MFU | peak mem | "
            "SM clock (power-capped) |"),
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    anchors = {r["size"]: r for r in result["train"] if r["model"] == "anchor" and "error" not in r}
    for r in result["train"]:
        if "error" in r:
            out.append(f"| {r['size']} | | {r['model']} | | {r['error']} | | | | | | |")
            continue
        a = anchors.get(r["size"])
        ratio = f"{r['tokens_per_sec'] / a['tokens_per_sec']:.2f}x" if a else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "-"
        mem = "-" if math.isnan(r["peak_mem_gib"]) else f"{r['peak_mem_gib']:.1f} GiB"
        name = "anchor dense GPT" if r["model"] == "anchor" else f"ours, {r['model']}"
        host = f"{r['host_ms_per_step']:.2f}" if "host_ms_per_step" in r else "-"
        c = r.get("clocks") or {}
        clock = f"{c['sm_mhz']:.0f} MHz, {c['power_w']:.0f} W ({100 * c['power_capped']:.0f}%)" if c else "-"
        out.append(f"| {r['size']} | {r['N']} x {r['batch']} | {name} | {r['params_M']:.1f}M | {r['ms_per_step']:.2f} | "
                   f"{host} | {r['tokens_per_sec']:,.0f} | {ratio} | {mfu} | {mem} | {clock} |")
    return "\n".join(out)


KERNEL_GROUPS = (  # (group, substrings of kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "attn", "_band_", "_short_")),  # ours: imagegen.band/short_attention
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90", "sm80", "matmul", "aten::mm", "addmm", "bmm")),
    ("optimizer", ("adam", "multi_tensor")),
    ("compiled (Triton) fusions", ("triton",)),
)


# A user annotation's GPU range, e.g. Optimizer.step#AdamW.step: it spans kernels that are counted themselves
# (kernel names may hold '#' too, as in C++ lambdas `{lambda(float, float)#1}`, but never only word characters)
ANNOTATION = re.compile(r"^[\w.]+#[\w.]+$")


def is_kernel(device_type: str, name: str) -> bool:
    """Whether a profiler event is a GPU kernel (CUDA, and not one of the annotation ranges the profiler also
    files under the GPU, such as `Optimizer.step#AdamW.step`)."""
    return device_type == "CUDA" and not ANNOTATION.match(name)


def kernel_group(name: str) -> str:
    low = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


def profile_step(kind: str = "sparse", size_index: int = 0, quick: bool = False, steps: int = 5,
                 residual_dtype: str = "float32", mlp_backend: str = "torch",
                 compile_mode: str = "default", trace: str | None = None) -> dict:
    """Where one training step's GPU time goes: torch.profiler over `steps` steps of our model compiled with
    `compile_mode` (reduce-overhead: the kernels replayed from CUDA graphs, as the fastest train rows run),
    kernels summed by group (attention, matmul, Triton fusions, optimizer, other) and the top kernels.
    On a CPU (quick) it profiles the eager step's operators instead. `trace`: also write the profiled steps
    as a Chrome trace there (open it in https://ui.perfetto.dev; a name ending in .gz is gzipped), to see
    what the host was doing when the GPU sat idle."""
    from torch.profiler import ProfilerActivity, profile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = (QUICK_SIZES if quick else SIZES)[size_index]
    label, V, H, W, C, _, _, _, batch = size
    model, loss_fn = our_model(kind, size, device, compile_mode, residual_dtype=residual_dtype,
                               mlp_backend=mlp_backend)
    step = training_step(model, loss_fn, batch, H * W * C, V, device)
    with column_sums_installed():
        for _ in range(3):  # compile and warm up outside the trace
            step()
    with ClockSampler() as clocks:
        timed_ms = time_ms(step, quick, warmup_ms=200, rep_ms=1500)  # the step as the train table times it
    syncs = synchronizing_calls(step) if device == "cuda" else []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    kernels, operators = [], []
    for evt in prof.key_averages():
        if device == "cuda" and evt.device_type.name == "CPU" and evt.key.startswith("aten::"):
            launched = self_device_us(evt, own=False)  # the GPU time of the kernels it launched
            if launched > 0:
                operators.append({"name": evt.key, "ms_per_step": launched / 1e3 / steps,
                                  "calls_per_step": evt.count / steps})
        if device == "cuda":  # GPU kernels only (operators would count their kernels twice)
            if not is_kernel(evt.device_type.name, evt.key):
                continue
            t = self_device_us(evt)
        else:
            t = evt.self_cpu_time_total
        if t > 0:
            kernels.append({"name": evt.key, "group": kernel_group(evt.key), "ms_per_step": t / 1e3 / steps,
                            "calls_per_step": evt.count / steps})
    kernels.sort(key=lambda k: -k["ms_per_step"])
    operators.sort(key=lambda k: -k["ms_per_step"])
    groups: dict[str, float] = {}
    for k in kernels:
        groups[k["group"]] = groups.get(k["group"], 0.0) + k["ms_per_step"]
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "size": label, "model": with_settings(kind, compile_mode if device == "cuda" else "default",
                                                  residual_dtype, mlp_backend),
            "N": H * W * C, "batch": batch, "profiled_steps": steps, "timed_ms_per_step": timed_ms,
            "host_ms_per_step": host_ms(step, device),
            "launches_per_step": sum(k["calls_per_step"] for k in kernels), "groups": groups, "kernels": kernels,
            "operators": operators, "gaps": device_gaps(prof.events(), steps) if device == "cuda" else {},
            "clocks": clocks.summary(), "syncs": syncs}


def synchronizing_calls(step) -> list[str]:
    """The host-device synchronisations one call of step() makes, as torch.cuda.set_sync_debug_mode reports
    them (ATen operators that wait for the GPU, such as .item() or a copy to the CPU): each warning's text and
    the line that made it. A synchronisation in a step leaves the GPU idle until the host issues more work."""
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
            if "called a synchronizing" in str(w.message)]


GAP_BUCKETS_US = (5, 20, 100)


def device_gaps(events, steps: int, top: int = 12) -> dict:
    """Where the GPU sat idle between kernels over the profiled steps: the span from the first kernel's start to
    the last one's end, the time some kernel ran, the idle gaps per step by length (< 5 us, 5-20, 20-100,
    >= 100 us), the longest gaps with the kernels either side of them, the gaps summed by that pair of kernels,
    and the timeline of about one step in the middle (start us from its first kernel, duration us, kernel)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if is_kernel(e.device_type.name, e.name))
    if not spans:
        return {}
    busy, gaps = 0.0, []
    start, end, last = spans[0]
    for s, e, name in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, last, name))
            start = s
        if e > end:
            end, last = e, name
    busy += end - start
    limits = (0,) + GAP_BUCKETS_US + (float("inf"),)
    buckets = [{"from_us": lo, "to_us": hi, "per_step": sum(1 for g in gaps if lo <= g[0] < hi) / steps,
                "ms_per_step": sum(g[0] for g in gaps if lo <= g[0] < hi) / 1e3 / steps}
               for lo, hi in zip(limits, limits[1:])]
    longest = sorted(gaps, key=lambda g: -g[0])[:top]
    by_pair: dict[tuple[str, str], list[float]] = {}
    for us, after, before in gaps:
        by_pair.setdefault((after, before), []).append(us)
    pairs = sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:top]
    span = spans[-1][1] - spans[0][0]
    first = spans[0][0] + span * (steps // 2) / steps  # about where the middle step starts
    timeline = [[round(s - first, 2), round(e - s, 2), name] for s, e, name in spans
                if first <= s < first + span / steps]
    return {"span_ms_per_step": span / 1e3 / steps, "busy_ms_per_step": busy / 1e3 / steps,
            "buckets": buckets, "longest": [{"us": us, "after": a, "before": b} for us, a, b in longest],
            "by_pair": [{"after": a, "before": b, "per_step": len(v) / steps, "ms_per_step": sum(v) / 1e3 / steps}
                        for (a, b), v in pairs],
            "timeline": timeline}


def _clock_note(result: dict) -> str:
    c = result.get("clocks") or {}
    return (f" While it was timed the card ran at {c['sm_mhz']:.0f} MHz and {c['power_w']:.0f} W, held down by its "
            f"power limit in {100 * c['power_capped']:.0f}% of the samples." if c else "")


def _sync_note(result: dict) -> str:
    if "syncs" not in result or result["device"] == "cpu":
        return ""
    syncs = result["syncs"]
    return (" No ATen operator in the step synchronises the host with the GPU." if not syncs else
            f" {len(syncs)} ATen operator call(s) in the step synchronise the host with the GPU: "
            + "; ".join(f"`{s}`" for s in syncs[:5]) + ".")


def format_profile(result: dict, top: int = 25) -> str:
    total = sum(result["groups"].values())
    out = [(f"Where a training step's time goes: ours, {result['model']}, {result['size']}, {result['N']} x "
            f"{result['batch']} ({result['device']}, torch {result['torch']}; kernel self time per step)"),
           "| group | ms/step | share |", "|---|---|---|"]
    for group, ms in sorted(result["groups"].items(), key=lambda kv: -kv[1]):
        out.append(f"| {group} | {ms:.2f} | {100 * ms / total:.0f}% |")
    out += [f"| total | {total:.2f} | |", "",
            (f"The step as timed alone (a sustained run of steps, as the train table times it): "
             f"{result['timed_ms_per_step']:.2f} ms; the kernels above, from a burst of "
             f"{result.get('profiled_steps', 5)} profiled steps, {total:.2f} ms a step (under a power limit a "
             f"sustained run clocks lower than a burst; the idle time between kernels is below); issuing it takes the "
             f"host {result.get('host_ms_per_step', float('nan')):.2f} ms; "
             f"{result['launches_per_step']:.0f} kernels (operators on a CPU) per step.{_clock_note(result)}"
             f"{_sync_note(result)}"), "",
            f"Top {top} kernels", "| kernel | group | ms/step | calls/step |", "|---|---|---|---|"]
    for k in result["kernels"][:top]:
        out.append(f"| `{k['name'][:90]}` | {k['group']} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} |")
    if result.get("gaps"):
        g = result["gaps"]
        out += ["", (f"Idle GPU between kernels, per step: the kernels span {g['span_ms_per_step']:.2f} ms, some kernel "
                     f"runs {g['busy_ms_per_step']:.2f} ms of it (the first profiled step starts on an idle GPU, so "
                     f"the host's start-up shows among the longest gaps)"),
                "| gap | gaps/step | ms/step |", "|---|---|---|"]
        out += [f"| {b['from_us']}-{b['to_us']} us | {b['per_step']:.0f} | {b['ms_per_step']:.3f} |"
                for b in g["buckets"]]
        out += ["", "Longest gaps", "| us | after | before |", "|---|---|---|"]
        out += [f"| {x['us']:.0f} | `{x['after'][:60]}` | `{x['before'][:60]}` |" for x in g["longest"]]
        if g.get("by_pair"):
            out += ["", "Gaps summed by the kernels either side", "| after | before | gaps/step | ms/step |",
                    "|---|---|---|---|"]
            out += [f"| `{x['after'][:60]}` | `{x['before'][:60]}` | {x['per_step']:.1f} | {x['ms_per_step']:.3f} |"
                    for x in g["by_pair"]]
    if result.get("operators"):  # kernels launched through ATen, not Inductor's: cuBLAS GEMMs, reductions, AdamW
        out += ["", "ATen operators that launched kernels (GPU time of their kernels; nested operators count twice)",
                "| operator | ms/step | calls/step |", "|---|---|---|"]
        out += [f"| `{o['name']}` | {o['ms_per_step']:.3f} | {o['calls_per_step']:.0f} |"
                for o in result["operators"][:top]]
    return "\n".join(out)


def bench_mlp(quick: bool = False) -> dict:
    """The MLP alone, forward + backward under bf16 autocast and torch.compile, at each size's tokens per step
    and width: model.mlp_backend=torch (cuBLAS GEMMs and Inductor's GELU kernels) against cublaslt (the forward
    GELU in the epilogue of imagegen.gelu_mlp's cuBLASLt GEMM), with the relative difference of output and gradients."""
    from imagegen.model import MLP

    rows = []
    for label, V, H, W, C, _, d, heads, batch in (SIZES if not quick else SIZES[:1]):
        tokens = batch * H * W * C
        torch.manual_seed(0)
        x = torch.randn(tokens, d, device="cuda", requires_grad=True)  # the LayerNorm's fp32 output
        dy = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        results = {}
        for backend in ("torch", "cublaslt"):
            cfg = size_config("sparse", (label, V, H, W, C, 1, d, heads), mlp_backend=backend)
            torch.manual_seed(1)
            mlp = MLP(cfg).cuda()
            compiled = torch.compile(mlp)

            def step():
                x.grad = None
                mlp.zero_grad(set_to_none=True)
                with torch.autocast("cuda", torch.bfloat16):
                    y = compiled(x)
                y.backward(dy)
                return y

            y = step()
            grads = [y.detach().float(), x.grad.clone(), mlp.fc.weight.grad.clone(), mlp.proj.weight.grad.clone()]
            results[backend] = {"ms": time_ms(step, quick), "kernels": kernel_ms(step), "values": grads}
            torch._dynamo.reset()
        ref, got = results["torch"], results["cublaslt"]
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got["values"], ref["values"]))
        rows.append({"size": label, "tokens": tokens, "d": d, "hidden": 4 * d, "torch_ms": ref["ms"],
                     "cublaslt_ms": got["ms"],
                     "speedup": sum(ref["kernels"].values()) / sum(got["kernels"].values()), "max_rel_diff": err,
                     "torch_kernels": ref["kernels"], "cublaslt_kernels": got["kernels"]})
        print(rows[-1], flush=True)
    from imagegen import cublaslt

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "mlp": rows, "plans": cublaslt.plans()}


def format_mlp(result: dict) -> str:
    out = [(f"The MLP alone, forward + backward, bf16 autocast, compiled ({result['device']}, torch {result['torch']}; "
            "medians): model.mlp_backend=torch vs cublaslt (the forward GELU in the fc GEMM's epilogue). The times "
            "include the host's time to issue the calls; the speed-up is of the kernels' GPU time."),
           "| size | tokens x d (hidden) | torch ms | cublaslt ms | speed-up (kernels) | "
           "max rel. diff (y, dx, dW1, dW2) |", "|---|---|---|---|---|---|"]
    for r in result["mlp"]:
        out.append(f"| {r['size']} | {r['tokens']} x {r['d']} ({r['hidden']}) | {r['torch_ms']:.3f} | "
                   f"{r['cublaslt_ms']:.3f} | "
                   f"{r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |")
    for r in result["mlp"]:
        for backend in ("torch", "cublaslt"):
            kernels = r[f"{backend}_kernels"]
            out += ["", f"{r['size']}, mlp_backend={backend}: GPU time per kernel ({sum(kernels.values()):.3f} ms in all)"]
            out += [f"- {ms:.3f} ms `{name[:90]}`" for name, ms in kernels.items()]
    out += ["", "cuBLASLt algorithms: each shape's heuristic candidates timed on its first call (ms), and the one kept:"]
    out += [f"- {p['M']} x {p['N']} x {p['K']}, {p['epilogue']}: {p['candidate_ms']} -> #{p['chosen']}"
            for p in result.get("plans", [])]
    return "\n".join(out)


LARGEST = ("48L d512 16 heads, 64x64x3 subpixel (ImageNet 64x64, Sparse Transformer)", 256, 64, 64, 3, 48, 512, 16)


def fits(kind: str, batch: int, checkpointing: bool, size: tuple = LARGEST) -> dict | None:
    """Peak memory and time of two eager bf16 training steps at `batch`, or None when out of memory."""
    _, V, H, W, C = size[:5]
    model = step = None
    try:
        model = ImageTransformer(size_config(kind, size, checkpointing)).cuda()
        step = training_step(model, model.loss, batch, H * W * C, V, "cuda")
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "s_per_step_eager": times[-1]}
    except torch.OutOfMemoryError:
        return None
    finally:
        del model, step
        torch.cuda.empty_cache()


def largest_batch(fits_at, max_batch: int) -> tuple[int, dict | None, list[int]]:
    """The largest batch b <= max_batch with fits_at(b) not None, taking fits to be monotone in b: the batch doubles
    from 1 until it does not fit, then the gap between the last batch that fit and the first that did not is halved
    until none is left. -> (b, fits_at(b), the batches tried in order); (0, None, ...) when batch 1 does not fit."""
    best, result, tried = 0, None, []

    def attempt(batch: int) -> bool:
        nonlocal best, result
        tried.append(batch)
        got = fits_at(batch)
        if got is not None:
            best, result = batch, got
        return got is not None

    batch = 1
    while batch <= max_batch and attempt(batch):
        batch *= 2
    low, high = best, min(batch, max_batch + 1)  # low fits (or is 0), high does not or is past max_batch
    while high - low > 1 and best:
        middle = (low + high) // 2
        if attempt(middle):
            low = middle
        else:
            high = middle
    return best, result, tried


def bench_largest(max_batch: int = 128, memory_gib: float | None = None) -> dict:
    """The largest batch of the paper's ImageNet 64x64 size that trains on this card, dense and sparse,
    with and without activation checkpointing (largest_batch: doubled, then bisected). memory_gib: the caching
    allocator may hold no more than this (torch.cuda.set_per_process_memory_fraction), e.g. 79 on a larger card
    to ask what fits an 80 GB one (the CUDA context's own memory is not counted in the cap)."""
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if memory_gib is not None:
        if not 0 < memory_gib <= total:
            raise ValueError(f"memory_gib must be in (0, {total:.1f}] on this card, got {memory_gib}")
        torch.cuda.set_per_process_memory_fraction(memory_gib / total)
    rows = []
    try:
        for kind in ("dense", "sparse"):
            for checkpointing in (False, True):
                batch, got, tried = largest_batch(partial(fits, kind, checkpointing=checkpointing), max_batch)
                rows.append({"model": kind, "activation_checkpointing": checkpointing, "batch": batch,
                             "tried": tried, **(got or {})})
                print(rows[-1], flush=True)
    finally:
        if memory_gib is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)
    return {"device": torch.cuda.get_device_name(), "memory_gib": total, "cap_gib": memory_gib,
            "max_batch": max_batch, "size": LARGEST[0], "largest": rows}


def format_largest(result: dict) -> str:
    cap = result.get("cap_gib")
    memory = f"capped at {cap:g} of its {result['memory_gib']:.0f} GiB" if cap else f"{result['memory_gib']:.0f} GiB"
    search = ("batch doubled until out of memory" if "tried" not in result["largest"][0] else
              f"batch doubled until out of memory, then bisected; at most {result.get('max_batch')}")
    out = [f"Largest batch that trains: {result['size']} ({result['device']}, {memory}; eager bf16 steps, {search})",
           "| model | activation checkpointing | batch | tokens per step | peak memory | s/step (eager) |",
           "|---|---|---|---|---|---|"]
    for r in result["largest"]:
        if not r["batch"]:
            out.append(f"| {r['model']} | {r['activation_checkpointing']} | does not fit at batch 1 | | | |")
            continue
        out.append(f"| {r['model']} | {r['activation_checkpointing']} | {r['batch']} | {r['batch'] * 12288:,} | "
                   f"{r['peak_mem_gib']:.1f} GiB | {r['s_per_step_eager']:.2f} |")
    tried = [f"{r['model']}, checkpointing {r['activation_checkpointing']}: {r['tried']}"
             for r in result["largest"] if "tried" in r]
    if tried:
        out += ["", "Batches tried, in order: " + "; ".join(tried)]
    return "\n".join(out)
