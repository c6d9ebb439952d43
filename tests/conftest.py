import pytest
import torch
from torch import nn

from hypernorm.nn import convert


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' tensors are tiny: one thread is several times faster than threads fighting for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _cpu_kernel_built():
    """Build HyperNorm's C++ CPU kernel once, up front (about a minute on a fresh machine): the subprocesses of
    CLI and DDP tests then load it from torch's extension cache instead of each waiting on the build."""
    from hypernorm.nn import cpu_kernel

    if cpu_kernel.ENABLED:
        cpu_kernel.load()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def use_cpu_kernel(monkeypatch, on: bool = True) -> None:
    """Switch HyperNorm's C++ CPU kernel on (built if needed) or off for one test. On a machine without a C++
    compiler the kernel cannot exist and a test that needs it skips; where a compiler exists it must build."""
    import shutil

    from hypernorm.nn import cpu_kernel

    monkeypatch.setattr(cpu_kernel, "ENABLED", on)
    if on and cpu_kernel.load() is None:
        if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
            pytest.skip("no C++ compiler: the CPU kernel cannot be built here")
        pytest.fail("a C++ compiler exists but the CPU kernel did not build")


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A 64/32-image CIFAR-10 in the official pickle layout, md5s patched into torchvision."""
    from tests.data.cifar_fixture import patch_checksums, write_official

    root = tmp_path / "data"
    patch_checksums(monkeypatch, "cifar10", write_official(root, "cifar10", n_train=64, n_test=32))
    return root


class TinyBlock(nn.Module):
    """A residual basic block, small enough for compile/export tests on a CPU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyNet(nn.Module):
    def __init__(self, widths=(8, 16), blocks=2, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        stages, in_ch = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(*[TinyBlock(in_ch if b == 0 else w, w, 2 if (i and b == 0) else 1)
                                          for b in range(blocks)]))
            in_ch = w
        self.stage1, self.stage2 = stages
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def tiny_net():
    return TinyNet()


@pytest.fixture
def tiny_bhn():
    return convert(TinyNet(), "bhn")
