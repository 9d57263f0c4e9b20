"""Small models and helpers shared by the tests (imported via pytest's pythonpath)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from avalanche_rebasin import discover_spec


def mlp(
    hidden_layers: int = 2, width: int = 32, in_features: int = 20, out_features: int = 5, bias: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, width, bias=bias), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(width, width, bias=bias), nn.ReLU()]
    layers.append(nn.Linear(width, out_features, bias=bias))
    return nn.Sequential(*layers)


class LayerNormMLP(nn.Module):
    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, width)
        self.norm1 = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.norm1(self.fc1(x)))
        x = torch.tanh(self.norm2(self.fc2(x)))
        return self.head(x)


class PreLNResidualMLP(nn.Module):
    """x → embed → [x + fc2(gelu(fc1(LN(x))))] × depth → LN → head."""

    def __init__(self, width: int = 16, hidden: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(10, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(width),
                    "fc1": nn.Linear(width, hidden),
                    "fc2": nn.Linear(hidden, width),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block["fc2"](torch.nn.functional.gelu(block["fc1"](block["norm"](x))))
        return self.head(self.norm(x))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU ×2 with a flatten of C×H×W into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.nn.functional.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        return self.out(torch.relu(self.fc(x)))


def vgg11_bn_small(num_classes: int = 10) -> nn.Module:
    """torchvision's vgg11_bn trunk (8 conv-BN groups) with a narrow head on a 2×2 pool.

    The 4096-wide classifier of the original makes a single soft-permutation step cost
    about a teraflop, which CPU tests cannot afford; the convolutional part, where the
    BatchNorm groups live, is unchanged, and the flatten still mixes C×H×W.
    """
    model = torchvision.models.vgg11_bn(num_classes=num_classes)
    model.avgpool = nn.AdaptiveAvgPool2d(2)
    model.classifier = nn.Sequential(
        nn.Linear(512 * 4, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, num_classes)
    )
    return model


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (in place)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=generator))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
    return model


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(current[k], v), f"tensor '{k}' changed"


def teacher_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes from a fixed random two-layer teacher on 16-d Gaussian inputs."""
    teacher = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(16, 32, generator=teacher), torch.randn(32, 4, generator=teacher)
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def train_mlp(seed: int, x: torch.Tensor, y: torch.Tensor, width: int = 64, epochs: int = 15) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp(2, width=width, in_features=16, out_features=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _outputs(model: nn.Module, x, train: bool) -> list[torch.Tensor]:
    """Output tensors in train or eval mode; dropout off (its masks are only equivariant in
    distribution), BatchNorm on batch statistics in train mode."""
    from avalanche_rebasin.discovery.reachable import reachable_tensors

    model.train(train)
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    return [t.detach() for t in reachable_tensors(out)]


def assert_function_preserved(model: nn.Module, x, spec=None, seed: int = 0, atol: float = 1e-5):
    """Discover (or take) a spec, permute ``model`` at random and compare the outputs in eval and
    in train mode (max |Δ| ≤ ``atol``); the model's state must be untouched. Returns the spec."""
    from avalanche_rebasin import permute, random_permutation

    before = state_copy(model)
    spec = spec if spec is not None else discover_spec(model, x)
    assert_state_equal(model, before)
    perms = random_permutation(spec, torch.Generator().manual_seed(seed))
    assert not spec.groups or any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = permute(model, spec, perms)
    for train in (False, True):
        expected, got = _outputs(model, x, train), _outputs(permuted, x, train)
        assert len(expected) == len(got) > 0
        for a, b in zip(expected, got):
            assert (a - b).abs().max() <= atol, f"train={train}: max |Δ| {(a - b).abs().max():.3g}"
    model.eval()
    return spec


def assert_recovered(model: nn.Module, x, method: str, seed: int = 0, **kwargs) -> None:
    """A random permutation of ``model`` is undone exactly by ``weight_matching`` or ``align``."""
    from avalanche_rebasin import align, permute, random_permutation, weight_matching

    spec = discover_spec(model, x)
    permuted = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(seed)))
    if method == "weight_matching":
        recovered = permute(permuted, spec, weight_matching(model, permuted, spec=spec, **kwargs))
    else:
        kwargs.setdefault("init", "identity")  # Sinkhorn on its own: weight matching would start exact
        recovered = align(model, permuted, spec=spec, cost="l2", progress=False, **kwargs).model
    wrong = [k for k, v in recovered.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert not wrong, f"{method} left {len(wrong)} tensors permuted, e.g. {wrong[:3]}"
