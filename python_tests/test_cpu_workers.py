"""Where the C++ kernels' worker threads come from (csrc/cpu/parallel.h): torch's own OpenMP pool
when torch has one, else std::thread. Either way the results must be the same bits, since the
chunks depend only on the sizes and the thread count, never on which thread runs them."""

import os
import subprocess
import sys

import pytest
import torch

from astromer_fast.kernels import _ext, input_embedding, masked_attention, weighted_rmse

pytestmark = pytest.mark.skipif(_ext.cpu_ext() is None, reason="astromer_fast._C is not built")

TORCH_HAS_OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _all_ops(seed=0):
    """Forward and backward of the three ops on the C++ backend, at sizes that split into chunks."""
    g = torch.Generator().manual_seed(seed)
    B, H, L, hd, D = 6, 4, 37, 64, 256
    q, k, v = (torch.randn(B, H, L, hd, generator=g, requires_grad=True) for _ in range(3))
    kh = torch.rand(B, L, generator=g) < 0.3
    kh[0] = True  # an all-hidden window
    out = masked_attention(q, k, v, kh, "key", backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g))
    t = torch.rand(B * 40, L, generator=g) * 1000
    m = torch.randn(B * 40, L, generator=g)
    w, b, tok = (torch.randn(n, generator=g, requires_grad=True) for n in (D, D, 1))
    x0 = input_embedding(t, m, t > 500, w, b, tok, backend="cpu")
    x0_grads = torch.autograd.grad(x0.sum(), (w, b, tok))
    pred = torch.randn(4096, 200, generator=g, requires_grad=True)
    valid = torch.rand(4096, 200, generator=g) < 0.9
    probed = valid & (torch.rand(4096, 200, generator=g) < 0.5)
    err = torch.rand(4096, 200, generator=g) + 0.01
    loss = weighted_rmse(pred, torch.randn(4096, 200, generator=g), err, probed, valid, backend="cpu")
    (dpred,) = torch.autograd.grad(loss, pred)
    return [out, *grads, x0, *x0_grads, loss, dpred]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not TORCH_HAS_OPENMP,
                    reason="torch's OpenMP pool is attached on Linux builds of torch with OpenMP only")
def test_torch_openmp_pool_is_used_by_default():
    info = _ext.cpu_workers()
    assert info["workers"] == "torch", info
    assert "omp" in os.path.basename(info["runtime"]), info
    assert _ext.cpu_ext().threading_runtime() == info["runtime"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not TORCH_HAS_OPENMP,
                    reason="torch's OpenMP pool is attached on Linux builds of torch with OpenMP only")
def test_same_bits_on_torch_pool_and_on_own_threads():
    ext = _ext.cpu_ext()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 3))  # more chunks than this CI machine has cores
        ext.attach_openmp(_ext._libtorch_cpu_path())
        on_pool = _all_ops()
        ext.detach_openmp()
        on_threads = _all_ops()
    finally:
        torch.set_num_threads(threads)
        ext.attach_openmp(_ext._libtorch_cpu_path())
    for a, b in zip(on_pool, on_threads):
        assert torch.equal(a, b)


def test_environment_variable_forces_own_threads():
    code = ("from astromer_fast.kernels import _ext; i = _ext.cpu_workers(); "
            "assert i['workers'] == 'threads' and 'threads' in i['why'], i; "
            "assert _ext.cpu_ext().threading_runtime() is None")
    env = dict(os.environ, ASTROMER_FAST_CPU_WORKERS="threads")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_attaching_a_library_that_is_not_loaded_says_so():
    ext = _ext.cpu_ext()
    before = ext.threading_runtime()
    with pytest.raises(RuntimeError, match="not loaded in this process"):
        ext.attach_openmp("/nonexistent/libgomp.so.1")
    assert ext.threading_runtime() == before  # a failed attach keeps the previous state
