import time, torch, torch.nn.functional as F
def t(f, n=5000):
    for _ in range(200): f()
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e6
with torch.inference_mode():
    u = torch.randn(1, 32); h = torch.randn(1, 576)
    print("erf+addcmul", t(lambda: torch.addcmul(u, u, torch.erf(u))))
    print("F.gelu", t(lambda: F.gelu(u)))
    print("F.gelu tanh", t(lambda: F.gelu(u, approximate="tanh")))
    print("norm+div", t(lambda: h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)))
    print("F.rms_norm", t(lambda: F.rms_norm(h, (576,), None, 1e-5)))
    print("F.normalize", t(lambda: F.normalize(h, dim=-1)))
    print("rsqrt manual", t(lambda: h * h.square().sum(-1, keepdim=True).rsqrt()))
    x = torch.randn(1, 1536); w = torch.randn(1536, 32); b = torch.randn(32); wt = w.t().contiguous()
    print("addmm", t(lambda: torch.addmm(b, x, w)))
    print("mm", t(lambda: x @ w))
    print("F.linear wt", t(lambda: F.linear(x, wt, b)))
    print(torch.get_num_threads())
