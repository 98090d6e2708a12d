"""Try imagegen.dgelu_pingpong's register settings, each in its own process (a faulting kernel ends the CUDA
context): python scripts/pingpong_check.py [MAX,LOADER,CONSUMER,STAGES ...]   (GPU)

For each setting and shape: the backward kernel (gelu') against dgelu_matmul's Triton kernel, and the forward
kernel (h and gelu(h)) against cuBLASLt's GELU_AUX epilogue and cuBLASLt's plain GEMM; errors against fp32, times
of one call replayed from a CUDA graph."""
import subprocess
import sys

CHILD = r"""
import sys, torch
from imagegen import cublaslt, dgelu_pingpong as pp, dgelu_matmul as dm
from imagegen.benchmark import graph_time_ms
pp.MAX_REGISTERS, pp.LOADER_REGISTERS, pp.CONSUMER_REGISTERS, pp.STAGES = map(int, sys.argv[1].split(","))
for M, K, N in [(300, 128, 200), (4096, 512, 2048), (32768, 512, 2048), (24576, 512, 2048)]:
    torch.manual_seed(0)
    dy, w = torch.randn(M, K, device="cuda").bfloat16(), (torch.randn(K, N, device="cuda") / K**0.5).bfloat16()
    h = (torch.randn(M, N, device="cuda") * 2).bfloat16()
    ref = torch.ops.aten.gelu_backward(dy.float() @ w.float(), h.float(), approximate="tanh")
    out, compiled = pp.matmul_dgelu_pingpong(dy, w, h)
    torch.cuda.synchronize()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    ms = graph_time_ms(lambda: pp.matmul_dgelu_pingpong(dy, w, h))
    ms_triton = graph_time_ms(lambda: dm.matmul_dgelu(dy, w, h, launch=dm.LAUNCH["fallback"]))
    alone = graph_time_ms(lambda: pp.matmul_dgelu_pingpong(dy, w, h, dgelu=False))
    print(sys.argv[1], f"{M}x{K}x{N}: rel err {err:.2e}, pingpong {ms:.4f} ms (GEMM alone {alone:.4f}), "
          f"Triton {ms_triton:.4f} ms, regs {compiled.n_regs} spills {compiled.n_spills}", flush=True)
    x, w1 = dy, (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()  # the forward: x (M, K), w1 (N, K)
    h_ref = x.float() @ w1.float().t()
    g, h, compiled = pp.matmul_gelu_pingpong(x, w1)
    torch.cuda.synchronize()
    errs = [((a.float() - b).norm() / b.norm()).item() for a, b in ((h, h_ref), (g, torch.nn.functional.gelu(h_ref, approximate="tanh")))]
    ms = graph_time_ms(lambda: pp.matmul_gelu_pingpong(x, w1))
    ms_lt = graph_time_ms(lambda: cublaslt.matmul_gelu(x, w1.t()))
    ms_mm = graph_time_ms(lambda: cublaslt.matmul(x, w1.t()))
    print(sys.argv[1], f"forward {M}x{K}x{N}: rel err h {errs[0]:.2e} g {errs[1]:.2e}, pingpong {ms:.4f} ms, "
          f"cuBLASLt GELU_AUX {ms_lt:.4f} ms, cuBLASLt GEMM alone {ms_mm:.4f} ms, regs {compiled.n_regs} "
          f"spills {compiled.n_spills}", flush=True)
"""

for setting in sys.argv[1:] or ["168,40,232,5"]:
    done = subprocess.run([sys.executable, "-c", CHILD, setting], capture_output=True, text=True, timeout=240,
                          check=False)
    print(done.stdout.strip() or f"{setting}: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
