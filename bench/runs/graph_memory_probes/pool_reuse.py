"""Does a later CUDA graph capture reuse the memory an earlier capture of the same pool freed?"""
import torch

MB = 1 << 20
dev = torch.device("cuda")
pool = torch.cuda.graph_pool_handle()
s = torch.cuda.Stream()


def pool_bytes():
    segs = [g for g in torch.cuda.memory._snapshot()["segments"] if tuple(g.get("segment_pool_id", (0, 0))) != (0, 0)]
    return sum(g["total_size"] for g in segs) / MB, sum(g["allocated_size"] for g in segs) / MB


x = torch.ones(64 * MB // 4, device=dev)
keep = []


def capture(name, fn):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool, stream=s):
        out = fn()
    keep.append(g)
    print(name, "pool reserved/allocated MB", pool_bytes(), flush=True)
    return out


def temps(n):  # n 64 MB temporaries alive together, freed inside the capture
    def fn():
        ts = [x * (i + 1) for i in range(n)]
        return sum(t.sum() for t in ts).reshape(1)
    return fn


def grads_like(n):  # n 64 MB tensors that stay referenced after the capture ends (like .grad), then dropped
    held = []
    def fn():
        held.extend(x * (i + 2) for i in range(n))
        return held[0][:1] * 1
    return fn, held


o = capture("A temps(4)", temps(4))
o = capture("B temps(4)", temps(4))
o = capture("C temps(8)", temps(8))
fn, held = grads_like(4)
o = capture("D held(4)", fn)
held.clear()
print("after dropping D's held", pool_bytes())
o = capture("E temps(8)", temps(8))
# autograd: a small model's backward in a capture, then another
lin = torch.nn.Linear(4096, 4096, device=dev)
inp = torch.randn(2048, 4096, device=dev)
def bw():
    lin.zero_grad(set_to_none=True)
    y = lin(inp).relu().pow(2).sum()
    y.backward()
    return y.detach().reshape(1)
for _ in range(2):
    with torch.cuda.stream(s):
        bw()
torch.cuda.synchronize()
o = capture("F backward", bw)
lin.zero_grad(set_to_none=True)
print("after dropping F grads", pool_bytes())
o = capture("G backward", bw)
lin.zero_grad(set_to_none=True)
o = capture("H temps(12)", temps(12))
