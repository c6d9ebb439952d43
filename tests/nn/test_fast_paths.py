"""The fused paths (HyperNorm's one-pass standardize-and-affine, the two-GEMM LSTM step) against the
readable reference paths: same outputs, same gradients, same running statistics."""
import copy

import pytest
import torch
from torch import nn

from hypernorm.nn import HyperNorm, TrimmedLSTMCell, convert, set_fused, share_relay
from hypernorm.nn import fused as fused_kernels

from ..conftest import TinyNet, use_cpu_kernel

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(params=["cpu-kernel", "direct", "shifted", "native-norm"])
def eager_path(request, monkeypatch):
    """Eager training on CPU takes the C++ kernel for a BatchNorm (hypernorm/nn/cpu_kernel.py), else the direct
    path (unshifted moments, x * scale + bias) unless a mean is far from its spread, then the shifted one-pass
    path; below a size limit the native norm kernel (with the two-GEMM LSTM). Each is forced here in turn on
    small tensors."""
    use_cpu_kernel(monkeypatch, request.param == "cpu-kernel")
    limit = 1 << 40 if request.param == "native-norm" else 0
    monkeypatch.setattr(fused_kernels, "SMALL_EAGER_TRAINING_NUMEL", limit)
    monkeypatch.setattr(fused_kernels, "SMALL_EAGER_TRAINING_NUMEL_CPU", limit)
    if request.param == "shifted":
        monkeypatch.setattr(fused_kernels, "_direct_standardize_affine", lambda *args: None)
    return request.param


@pytest.fixture
def python_paths(monkeypatch):
    use_cpu_kernel(monkeypatch, False)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def run(model: nn.Module, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Output, input gradient and parameter gradients of a loss that weighs every output differently."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = (forward if forward is not None else model)(x)
    (y * torch.linspace(-1, 2, y.numel(), device=y.device).view_as(y)).sum().backward()
    return y.detach(), x.grad, grads(model)


def assert_same_run(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **(tol or TOL))
    torch.testing.assert_close(a[1], b[1], **(tol or TOL))
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], **(tol or TOL), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_step_backward_passes_gradcheck(with_state):
    """The hand-written backward of the fused step against finite differences (float64), for u, the state and
    the fused weights."""
    torch.manual_seed(0)
    cell = TrimmedLSTMCell(6, reduction=2).double()
    weights = tuple(w.detach().clone().requires_grad_(True) for w in cell.fused_weights())
    u = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    state = (torch.rand(3, 6, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 6, dtype=torch.float64, requires_grad=True)) if with_state else ()

    def step(u, *rest):
        h, c = cell(u, tuple(rest[:2]) if with_state else None, rest[-4:])
        return h, c

    assert torch.autograd.gradcheck(step, (u, *state, *weights))


@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_step_matches_reference(with_state):
    cell = TrimmedLSTMCell(12, reduction=4)
    u = torch.randn(5, 12, requires_grad=True)
    state = (torch.rand(5, 12, requires_grad=True), torch.randn(5, 12, requires_grad=True)) if with_state else None
    outputs = []
    for step in (cell.forward, cell.forward_reference):
        cell.zero_grad(set_to_none=True)
        h, c = step(u, state)
        (h.sum() + (c * c).sum()).backward()
        inputs = [u] + (list(state) if state else [])
        outputs.append((h.detach(), c.detach(), [t.grad.clone() for t in inputs], grads(cell)))
        for t in inputs:
            t.grad = None
    (h1, c1, in1, p1), (h2, c2, in2, p2) = outputs
    torch.testing.assert_close(h1, h2, **TOL)
    torch.testing.assert_close(c1, c2, **TOL)
    for g1, g2 in zip(in1, in2):
        torch.testing.assert_close(g1, g2, **TOL)
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], **TOL)


def test_fused_weights_are_both_gate_maps():
    cell = TrimmedLSTMCell(8, reduction=2)
    w0, b0, w1, b1 = cell.fused_weights()
    assert w0.shape == (16, 8) and w1.shape == (8, 32)
    u, h = torch.randn(3, 8), torch.randn(3, 8)
    gates = torch.relu(torch.cat([u, h], 1) @ w0 + b0) @ w1 + b1
    torch.testing.assert_close(gates, cell.input_map(u) + cell.hidden_map(h))


@pytest.mark.parametrize("norm", ["bn", "gn", "in", "ln"])
@pytest.mark.parametrize("training", [True, False])
def test_layer_fused_matches_reference(norm, training, eager_path):
    fused = HyperNorm(8, norm)
    if training is False and norm == "bn":  # non-trivial running statistics to fold
        fused.norm.running_mean.uniform_(-1, 1)
        fused.norm.running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(fused)
    reference.fused = False
    fused.train(training), reference.train(training)
    x = torch.randn(4, 8, 5, 6) * 2 + 0.7
    assert_same_run(run(fused, x), run(reference, x))
    if norm == "bn" and training:  # running statistics moved identically, over two steps
        run(fused, x + 1), run(reference, x + 1)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fused.norm, key), getattr(reference.norm, key), **TOL)


@pytest.mark.parametrize("momentum, track", [(None, True), (0.1, False)])
def test_batchnorm_options_match_reference(momentum, track, eager_path):
    standardizer = nn.BatchNorm2d(6, affine=False, momentum=momentum, track_running_stats=track)
    fused = HyperNorm(6, standardizer)
    reference = copy.deepcopy(fused)
    reference.fused = False
    for step in range(3):
        x = torch.randn(3, 6, 4, 4) + step
        assert_same_run(run(fused, x), run(reference, x))
    if track:
        torch.testing.assert_close(fused.norm.running_var, reference.norm.running_var, **TOL)
    fused.eval(), reference.eval()
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(fused(x), reference(x), **TOL)


def test_relayed_stage_fused_matches_reference(eager_path):
    layers = [HyperNorm(6, "bn") for _ in range(3)]
    share_relay(layers)
    stage = nn.Sequential(*layers)
    reference = set_fused(copy.deepcopy(stage), False)
    x = torch.randn(4, 6, 3, 3)
    assert_same_run(run(stage, x), run(reference, x))
    assert layers[0].relay.state is None and layers[0].relay.weights is None, "nothing survives the pass"


@pytest.mark.parametrize("norm", ["bhn", "ghn"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_network_fused_matches_reference(norm, mode, eager_path):
    model = convert(TinyNet(), norm)
    model.train()
    model(torch.randn(8, 3, 8, 8))  # running statistics away from their initial values
    getattr(model, mode)()
    reference = set_fused(copy.deepcopy(model), False)
    x = torch.randn(4, 3, 8, 8)
    assert_same_run(run(model, x), run(reference, x))


@pytest.mark.parametrize("norm", ["bhn", "ghn"])
def test_channels_last_input(eager_path, norm):
    """Channels-last maps take their own moments on the direct path (x * x in the output buffer)."""
    model = convert(TinyNet(), norm).to(memory_format=torch.channels_last)
    reference = set_fused(copy.deepcopy(model), False)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    assert_same_run(run(model, x), run(reference, x))
    layer = model.stage1[0].bn1
    y = layer(torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_autocast_close_to_reference():
    model = convert(TinyNet(), "bhn").eval()
    reference = set_fused(copy.deepcopy(model), False)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = model(x), reference(x)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["bhn", "ghn"])
def test_autocast_training_follows_float32(eager_path, norm, dtype):
    """Mixed-precision training: every path runs a backward under autocast (the LSTM step's once failed on a
    float16 GEMM against float32 weights), the LSTM computes in float32, and the run follows float32's.
    Bounds: over 30 seeds the worst cosines to float32 were 0.9999738 (outputs) and 0.937 (gradients, which
    half-precision convolutions round at the 1% level and sums cancel)."""
    model = convert(TinyNet(), norm)
    reference = set_fused(copy.deepcopy(model), False)
    full = copy.deepcopy(model)
    lstm_dtypes = set()
    model.stage1[0].bn1.relay.cell.register_forward_hook(lambda m, args, out: lstm_dtypes.add(out[0].dtype))
    x = torch.randn(4, 3, 8, 8)

    def mixed(net):
        def forward(x):
            with torch.autocast("cpu", dtype=dtype):
                return net(x)
        return forward

    runs = run(model, x, mixed(model)), run(reference, x, mixed(reference))
    y32, _, grads32 = run(full, x)
    assert lstm_dtypes == {torch.float32}
    assert runs[0][0].dtype == runs[1][0].dtype == dtype
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    for y, dx, grads in runs:
        assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads.values())
        flat = torch.cat([grads[name].flatten() for name in grads32])
        assert torch.cosine_similarity(y.float().flatten(), y32.flatten(), dim=0) > 0.999
        assert torch.cosine_similarity(flat, flat32, dim=0) > 0.85


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast on CUDA needs a CUDA device")
@pytest.mark.parametrize("norm", ["bhn", "ghn"])
def test_cuda_float16_autocast_training_follows_float32(norm):
    """train.amp's setting on a GPU (the CPU tests above cover the same code in bfloat16 and float16)."""
    model = convert(TinyNet(), norm).cuda()
    full = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, device="cuda")

    def mixed(x):
        with torch.autocast("cuda", dtype=torch.float16):
            return model(x)

    (y, _, grads), (y32, _, grads32) = run(model, x, mixed), run(full, x)
    assert y.dtype == torch.float16
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads.values())
    assert torch.cosine_similarity(y.float().flatten(), y32.flatten(), dim=0) > 0.999
    flat, flat32 = (torch.cat([g[name].flatten() for name in grads32]) for g in (grads, grads32))
    assert torch.cosine_similarity(flat, flat32, dim=0) > 0.85


def test_unfusable_standardizers_take_the_reference_path():
    class MyBatchNorm(nn.BatchNorm2d):  # a subclass may compute other statistics: not fused
        def forward(self, x):
            return super().forward(x) * 0.5

    layer = HyperNorm(4, MyBatchNorm(4, affine=False))
    reference = copy.deepcopy(layer)
    reference.fused = False
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


def small_stage(norm: str) -> nn.Sequential:
    """conv, HN, conv, HN, conv, HN with one relay: the least that exercises the relay under compile."""
    layers = [HyperNorm(8, norm) for _ in range(3)]
    share_relay(layers)
    convs = [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(3)]
    return nn.Sequential(*(m for pair in zip(convs, layers) for m in pair))


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_compiled_fullgraph_matches_reference(norm):
    model = small_stage(norm).train()
    reference = set_fused(copy.deepcopy(model), False)
    # fullgraph: any graph break raises. aot_eager traces forward and backward as the default backend
    # does, without its slow code generation (test_hypernorm.py compiles with inductor).
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 6, 6)
    assert_same_run(run(model, x, compiled), run(reference, x), rtol=1e-4, atol=1e-4)  # sums reordered
    if norm == "bn":
        torch.testing.assert_close(model[5].norm.running_var, reference[5].norm.running_var)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), **TOL)


def test_compiled_autocast_training_is_one_graph_that_follows_float32():
    """Under autocast the LSTM step leaves it (float32, in the graph); bounds as in the eager test above."""
    model = small_stage("bn").train()
    full = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def mixed(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(x)

    x = torch.randn(4, 3, 6, 6)
    (y, _, grads), (y32, _, grads32) = run(model, x, mixed), run(full, x)
    assert y.dtype == torch.bfloat16
    assert torch.cosine_similarity(y.float().flatten(), y32.flatten(), dim=0) > 0.999
    flat, flat32 = (torch.cat([g[name].flatten() for name in grads32]) for g in (grads, grads32))
    assert torch.cosine_similarity(flat, flat32, dim=0) > 0.85


def test_input_without_grad_takes_plain_ops_with_same_gradients(eager_path):
    # the hand-written backwards serve inputs that need a gradient; parameters alone use autograd's ops
    fused = HyperNorm(6, "bn")
    reference = copy.deepcopy(fused)
    reference.fused = False
    x = torch.randn(3, 6, 4, 4)
    for layer in (fused, reference):
        (layer(x) * torch.arange(3 * 6 * 16.0).view(3, 6, 4, 4)).sum().backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("norm", ["bn", "gn", "in"])
@pytest.mark.parametrize("mean", [0.5, 1e3])
def test_direct_path_only_where_the_mean_is_near_the_spread(norm, mean, monkeypatch, python_paths):
    """The direct path serves ordinary inputs and declines (before touching running statistics) where
    x * scale + bias would cancel; the shifted path then gives the result."""
    taken = []
    direct = fused_kernels._direct_standardize_affine
    monkeypatch.setattr(fused_kernels, "_direct_standardize_affine",
                        lambda *args: taken.append(direct(*args)) or taken[-1])
    layer = HyperNorm(6, norm)
    reference = set_fused(copy.deepcopy(layer), False)
    x = torch.randn(4, 6, 5, 5) + mean
    assert_same_run(run(layer, x), run(reference, x), rtol=1e-4, atol=1e-4 * mean)
    assert len(taken) == 1 and (taken[0] is None) == (mean > 100)
    if norm == "bn":
        assert int(layer.norm.num_batches_tracked) == 1
        torch.testing.assert_close(layer.norm.running_mean, reference.norm.running_mean)


def test_direct_path_backward_writes_the_input_gradient_once(python_paths):
    """The layer's autograd nodes: one for the statistics, one for the affine, one for the LSTM step (the
    fused weights' few nodes aside); the input gradient comes from the statistics node alone."""
    layer = HyperNorm(8, "bn")
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_DirectAffineBackward"
    nodes, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    names = sorted(type(node).__name__ for node in nodes)
    assert names.count("_StatisticsBackward") == 1 and names.count("_CellStepBackward") == 1
    elementwise = ("Mul", "Addcmul", "Sigmoid", "Tanh", "Slice", "Mean", "Rsqrt")
    assert not [name for name in names if name.startswith(elementwise)], names


def test_eval_batchnorm_follows_its_running_statistics():
    """The direct path keeps 1/sigma of a BN in eval between calls: changed buffers must be seen, whether
    changed in place (load_state_dict) or replaced (.double())."""
    layer = HyperNorm(6, "bn").eval()
    reference = set_fused(copy.deepcopy(layer), False)
    x = torch.randn(3, 6, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), **TOL)
        state = {k: v + 0.5 if k.startswith("norm.running") else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state), reference.load_state_dict(state)
        torch.testing.assert_close(layer(x), reference(x), **TOL)
        layer.double(), reference.double()
        layer.norm.running_var.mul_(3), reference.norm.running_var.mul_(3)
        torch.testing.assert_close(layer(x.double()), reference(x.double()), **TOL)


@pytest.mark.parametrize("norm", ["bhn", "ghn"])
def test_training_steps_leave_no_tensors_behind(norm):
    """A tensor held by the graph's own nodes (an output kept as a ctx attribute or in the backward link) is a
    reference cycle that keeps every step's statistics alive: a BHN grid run grew to 18 GB that way."""
    import gc

    import hypernorm

    model = hypernorm.create_model("resnet20", norm, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    def live_tensors_after(steps):
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        del loss
        gc.collect()
        return sum(torch.is_tensor(o) for o in gc.get_objects())

    live_tensors_after(2)  # optimizer state, cached weights
    assert live_tensors_after(3) == live_tensors_after(3)
