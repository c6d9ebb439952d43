"""The C++ CPU kernel: where it serves, where it must decline, and what happens where it cannot be built.
(Its numbers against the reference path: the "cpu-kernel" cases of test_fast_paths.py and test_numerics.py.)"""
import copy
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hypernorm
from hypernorm.nn import HyperNorm, cpu_kernel, set_fused

from ..conftest import use_cpu_kernel


def served_by_kernel(layer: HyperNorm, x: torch.Tensor) -> bool:
    taken = []
    forward = cpu_kernel.batchnorm_forward

    def spy(*args):
        taken.append(forward(*args))
        return taken[-1]

    cpu_kernel.batchnorm_forward, saved = spy, cpu_kernel.batchnorm_forward
    try:
        layer(x)
    finally:
        cpu_kernel.batchnorm_forward = saved
    return bool(taken) and taken[0] is not None


def test_kernel_serves_batchnorm_in_training_and_eval(monkeypatch):
    use_cpu_kernel(monkeypatch)
    layer = HyperNorm(8, "bn")
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "_LayerBackward"  # one autograd node for the whole layer
    assert served_by_kernel(layer, x)
    layer.eval()
    assert served_by_kernel(layer, x)
    with torch.no_grad():
        assert served_by_kernel(layer, x)
    assert served_by_kernel(HyperNorm(8, "syncbn").eval(), x)


@pytest.mark.parametrize("case", ["channels-last", "float64", "autocast", "far mean", "group norm", "syncbn training",
                                  "flop counter", "jit trace"])
def test_kernel_declines_what_it_does_not_compute(case, monkeypatch):
    """Each case still gives the reference path's output, through the Python paths."""
    use_cpu_kernel(monkeypatch)
    layer = HyperNorm(8, {"group norm": "gn", "syncbn training": "syncbn"}.get(case, "bn"))
    x = torch.randn(4, 8, 5, 5)
    if case == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "float64":
        layer, x = layer.double(), x.double()
    elif case == "far mean":
        x = x + 100.0
    reference = set_fused(copy.deepcopy(layer), False)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not served_by_kernel(layer, x)
        return
    if case == "flop counter":  # a dispatch mode sees every operator; the kernel's loops it could not
        with FlopCounterMode(display=False):
            assert not served_by_kernel(layer, x)
        return
    if case == "jit trace":  # a traced graph must hold operators, not the kernel's direct writes to memory
        def refuse(*args):
            raise AssertionError("the kernel ran under torch.jit.trace")

        monkeypatch.setattr(cpu_kernel, "batchnorm_forward", refuse)
        with torch.no_grad():
            traced = torch.jit.trace(layer.eval(), x, check_trace=False)
            torch.testing.assert_close(traced(x), reference.eval()(x), rtol=1e-4, atol=1e-4)
        return
    if case == "syncbn training":  # its statistics reduce across processes: not a BatchNorm2d's
        assert not cpu_kernel.applies(layer.norm, x)
        return
    assert not served_by_kernel(layer, x)
    if case == "far mean":
        assert int(layer.norm.num_batches_tracked) == 1  # once, by the path that served it
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-4)


def test_network_training_step_matches_float64(monkeypatch):
    """A BHN ResNet-20 training step with the kernel against the same step in float64. Forward quantities (loss,
    running statistics, eval outputs): within 1e-4 of each tensor's largest value (measured: 4e-7). Gradients:
    cosine similarity above 0.9999 per tensor, since one ReLU input that rounds to the other side of zero in
    float32 moves a weight's gradient by 0.6% of its largest value, on any path (the float32 reference path
    too). Per-layer gradients are compared exactly in test_fast_paths.py."""
    use_cpu_kernel(monkeypatch)

    def step(dtype: torch.dtype):
        torch.manual_seed(0)
        model = hypernorm.create_model("resnet20", "bhn", num_classes=10).to(dtype)
        x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype), torch.arange(8) % 10
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results = {"loss": loss.detach()}
        results.update({name: p.grad for name, p in model.named_parameters()})
        results.update({k: v for k, v in model.state_dict().items() if "running" in k})
        with torch.no_grad():
            results["eval logits"] = model.eval()(x)
        return results

    got, expected = step(torch.float32), step(torch.float64)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if name.endswith(("weight", "bias")):
            cosine = torch.cosine_similarity(got[name].double().flatten(), value.flatten(), dim=0)
            assert cosine > 0.9999, f"{name}: cosine {float(cosine):.6f}"
        else:
            error = float((got[name].double() - value).abs().max() / value.abs().max())
            assert error <= 1e-4, f"{name}: {error:.2e}"


def test_a_kernel_that_cannot_be_built_warns_once_and_the_python_paths_serve(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'hypernorm_batchnorm_cpu'\nc++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernel, "_kernel", None)
    monkeypatch.setattr(cpu_kernel, "_failure", None)
    monkeypatch.setattr(cpu_kernel, "ENABLED", True)
    layer = HyperNorm(8, "bn")
    reference = set_fused(copy.deepcopy(layer), False)
    x = torch.randn(4, 8, 5, 5)
    with pytest.warns(RuntimeWarning, match=r"C\+\+ CPU kernel could not be built \(RuntimeError: c\+\+: command not"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call neither warns nor tries to build again
        torch.testing.assert_close(layer(x), y)
    assert not cpu_kernel.applies(layer.norm, x)
    torch.testing.assert_close(y, reference(x), rtol=1e-4, atol=1e-5)


def test_environment_variable_turns_it_off(monkeypatch):
    import importlib

    monkeypatch.setenv("HYPERNORM_CPU_KERNEL", "0")
    try:
        assert importlib.reload(cpu_kernel).ENABLED is False
    finally:
        monkeypatch.delenv("HYPERNORM_CPU_KERNEL")
        importlib.reload(cpu_kernel)
    assert cpu_kernel.ENABLED is True


@pytest.mark.parametrize("channels,batch,size", [(3, 2, 5), (16, 8, 4), (20, 4, 7), (64, 128, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_kernel_matches_the_reference_path_over_widths_and_batches(channels, batch, size, training, monkeypatch):
    """Widths that fill no vector exactly (3, 20), maps with tails (5x5, 7x7), and a batch large enough that the
    LSTM's GEMMs go to ATen (64 channels at batch 128: 2^20 multiply-adds, above the loops' 2^18). Relayed state
    from a first layer, outputs and every gradient against the reference path in float64."""
    use_cpu_kernel(monkeypatch)
    torch.manual_seed(0)
    first, second = HyperNorm(channels, "bn"), HyperNorm(channels, "bn")
    hypernorm.nn.share_relay([first, second])
    stage = torch.nn.Sequential(first, torch.nn.ReLU(), second).train(training)
    if not training:
        for layer in (first, second):
            layer.norm.running_mean.uniform_(-1, 1)
            layer.norm.running_var.uniform_(0.5, 2)
    reference = set_fused(copy.deepcopy(stage).double(), False)
    x = torch.randn(batch, channels, size, size) * 2 + 0.5
    upstream = torch.randn(x.shape)

    def run(net, dtype):
        inputs = x.to(dtype).clone().requires_grad_()
        out = net(inputs)
        (out * upstream.to(dtype)).sum().backward()
        return [out, inputs.grad, *(p.grad for p in net.parameters())]

    got, expected = run(stage, torch.float32), run(reference, torch.float64)
    assert served_by_kernel(copy.deepcopy(first), x)  # a copy: a training step would move the statistics again
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = max(float(b.abs().max()), 1e-3)  # a dead bottleneck unit's gradient is all zeros
        error = float((a.double() - b).abs().max()) / scale
        assert error < 1e-4, f"tensor {index}: relative error {error:.2e}"  # float32 rounding: measured below 3e-6
    if training:
        torch.testing.assert_close(stage[0].norm.running_var.double(), reference[0].norm.running_var,
                                   rtol=1e-5, atol=1e-6)


def test_each_cpu_capability_gets_its_own_build(monkeypatch):
    """A build's name carries the instruction set it was compiled for, so a cache shared by different machines
    never loads one built for instructions this machine lacks; other architectures get a portable build."""
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "x86_64")
    for capability, flag in (("AVX512", "-mavx512f"), ("AVX2", "-mavx2")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        name, flags = cpu_kernel._instruction_set()
        assert name == capability and flag in flags and f"-DCPU_CAPABILITY_{capability}" in flags
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert cpu_kernel._instruction_set() == ("default", [])
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # never x86 flags elsewhere
    assert cpu_kernel._instruction_set() == ("default", [])


def test_a_parametrized_lstm_weight_reaches_the_kernel_and_gets_its_gradient(monkeypatch):
    """gate_parameters reads the Linear layers' dicts for speed; a parametrized weight (weight norm) is not in them
    and must still be computed and differentiated."""
    use_cpu_kernel(monkeypatch)
    torch.manual_seed(0)
    layer = HyperNorm(8, "bn")
    torch.nn.utils.parametrizations.weight_norm(layer.relay.cell.input_map[0])
    reference = set_fused(copy.deepcopy(layer), False)
    x = torch.randn(4, 8, 5, 5)
    assert served_by_kernel(layer, x)
    layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    got = layer.relay.cell.input_map[0].parametrizations.weight.original1.grad
    expected = reference.relay.cell.input_map[0].parametrizations.weight.original1.grad
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_the_lstm_output_layers_are_laid_out_once_per_stage_and_pass(monkeypatch):
    """A stage's layers share one LSTM: its output layers are transposed for the kernel by the stage's first layer
    only, and a weight changed between passes is read afresh by the next pass."""
    use_cpu_kernel(monkeypatch)
    torch.manual_seed(0)
    model = hypernorm.create_model("resnet20", "bhn", num_classes=10).eval()
    built = []
    layout = cpu_kernel.output_weights
    monkeypatch.setattr(cpu_kernel, "output_weights", lambda parameters: built.append(1) or layout(parameters))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        assert len(built) == 3  # ResNet-20's three stages
        stage = next(m for m in model.modules() if isinstance(m, HyperNorm))
        stage.relay.cell.input_map[2].weight.add_(0.5)  # in place, as an optimizer step
        reference = set_fused(copy.deepcopy(model), False)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    assert len(built) == 6


def test_a_slow_build_is_announced_while_it_runs(monkeypatch, caplog):
    """A fresh build pauses the first forward pass for about a minute: say so while it runs, not after."""
    import time

    from torch.utils import cpp_extension

    def slow_build(*args, **kwargs):
        time.sleep(0.5)
        return "built"

    monkeypatch.setattr(cpp_extension, "load", slow_build)
    monkeypatch.setattr(cpu_kernel, "_kernel", None)
    monkeypatch.setattr(cpu_kernel, "_failure", None)
    monkeypatch.setattr(cpu_kernel, "ANNOUNCE_AFTER_S", 0.1)
    with caplog.at_level("WARNING", logger="hypernorm.nn.cpu_kernel"):
        assert cpu_kernel.load() == "built"
    assert any("compiling the C++ CPU kernel" in record.getMessage() for record in caplog.records)


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    """The kernel's forward passes split the feature maps over torch's threads (at::parallel_for); each map is
    summed by one thread in one order, so 1 and 2 threads give the same bits (131,072 elements: four chunks). The
    backward's GEMMs are BLAS's, whose blocking may follow the thread count: equal to float32 rounding."""
    use_cpu_kernel(monkeypatch)
    torch.manual_seed(0)
    layer = HyperNorm(32, "bn")
    x = torch.randn(16, 32, 16, 16, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            step = copy.deepcopy(layer)
            inputs = x.detach().clone().requires_grad_()
            out = step(inputs)
            out.square().sum().backward()
            results.append((out.detach(), inputs.grad, step.norm.running_var.clone()))
    finally:
        torch.set_num_threads(threads)
    (out_1, grad_1, var_1), (out_2, grad_2, var_2) = results
    assert torch.equal(out_1, out_2) and torch.equal(var_1, var_2)
    torch.testing.assert_close(grad_1, grad_2, rtol=1e-5, atol=1e-7)
