"""What stops a later capture from reusing a shared pool's free memory? replays? eager work on the capture stream?"""
import torch

MB = 1 << 20
dev = torch.device("cuda")
x = torch.ones(64 * MB // 4, device=dev)


def pool_bytes():
    segs = [g for g in torch.cuda.memory._snapshot()["segments"] if tuple(g.get("segment_pool_id", (0, 0))) != (0, 0)]
    return sum(g["total_size"] for g in segs) / MB, sum(g["allocated_size"] for g in segs) / MB


def temps(n):
    def fn():
        ts = [x * (i + 1) for i in range(n)]
        return sum(t.sum() for t in ts).reshape(1)
    return fn


def trial(name, between):
    pool = torch.cuda.graph_pool_handle()
    s = torch.cuda.Stream()
    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1, pool=pool, stream=s):
        temps(4)()
    a = pool_bytes()[0]
    between(g1, s)
    torch.cuda.synchronize()
    with torch.cuda.graph(g2, pool=pool, stream=s):
        temps(4)()
    print(f"{name}: pool after A {a:.0f} MB, after B {pool_bytes()[0] - a:+.0f} MB", flush=True)
    return g1, g2


keep = []
keep.append(trial("nothing between", lambda g, s: None))
keep.append(trial("10 replays of A", lambda g, s: [g.replay() for _ in range(10)]))

def eager_on_stream(g, s):
    with torch.cuda.stream(s):
        for _ in range(3):
            y = [x * 2 for _ in range(4)]
            del y
keep.append(trial("eager work on the capture stream", eager_on_stream))

def eager_default(g, s):
    for _ in range(3):
        y = [x * 2 for _ in range(4)]
        del y
keep.append(trial("eager work on the default stream", eager_default))

def eager_side_recorded(g, s):
    with torch.cuda.stream(s):
        y = x * 2
    y.record_stream(torch.cuda.current_stream())
    del y
keep.append(trial("a record_stream'd tensor", eager_side_recorded))

def backward_on_stream(g, s):
    lin = torch.nn.Linear(4096, 4096, device=dev)
    inp = torch.randn(4096, 4096, device=dev)
    with torch.cuda.stream(s):
        lin(inp).sum().backward()
keep.append(trial("eager backward on the capture stream", backward_on_stream))
