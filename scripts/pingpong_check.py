"""Try imagegen.dgelu_pingpong's register settings, each in its own process (a faulting kernel ends the CUDA
context): python scripts/pingpong_check.py [MAX,LOADER,CONSUMER,STAGES ...]   (GPU)"""
import subprocess
import sys

CHILD = r"""
import sys, torch
from imagegen import dgelu_pingpong as pp, dgelu_matmul as dm
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
"""

for setting in sys.argv[1:] or ["168,40,232,5"]:
    done = subprocess.run([sys.executable, "-c", CHILD, setting], capture_output=True, text=True, timeout=120,
                          check=False)
    print(done.stdout.strip() or f"{setting}: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
