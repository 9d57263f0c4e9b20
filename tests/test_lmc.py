import torch
from rebasin_testkit import SmallCNN, assert_state_equal, mlp, state_copy

from avalanche_rebasin import barrier_and_auc, interpolate, lmc_curve, reestimate_batchnorm


def _loss_fn(x, y):
    def evaluate(model):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    return evaluate


def test_curve_of_model_with_itself_has_zero_barrier():
    torch.manual_seed(0)
    model = mlp(2)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    curve = lmc_curve(model, model, _loss_fn(x, y), n_points=5)
    assert len(curve.values) == 5 and curve.alphas[0] == 0.0 and curve.alphas[-1] == 1.0
    assert abs(curve.barrier) < 1e-6 and abs(curve.auc) < 1e-6


def test_interpolate_endpoints_and_inputs_untouched():
    torch.manual_seed(0)
    a, b = SmallCNN(), SmallCNN()
    sa, sb = state_copy(a), state_copy(b)
    zero, one = interpolate(a, b, 0.0), interpolate(a, b, 1.0)
    for k, v in a.state_dict().items():
        assert torch.equal(zero.state_dict()[k], v)
        if v.is_floating_point():
            assert torch.equal(one.state_dict()[k], b.state_dict()[k])
    half = interpolate(a, b, 0.5)
    torch.testing.assert_close(half.conv1.weight, (a.conv1.weight + b.conv1.weight) / 2)
    assert_state_equal(a, sa)
    assert_state_equal(b, sb)


def test_barrier_definition_on_a_known_curve():
    lambdas = [0.0, 0.5, 1.0]
    barrier, auc = barrier_and_auc(lambdas, [1.0, 3.0, 2.0])
    assert barrier == 1.5 and abs(auc - 0.75) < 1e-12
    acc_barrier, _ = barrier_and_auc(lambdas, [0.9, 0.5, 0.8], higher_is_better=True)
    assert abs(acc_barrier - 0.35) < 1e-12


def test_batchnorm_reestimation_changes_statistics_and_restores_mode():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = [(torch.randn(16, 1, 16, 16) * 3 + 1, None) for _ in range(3)]
    reestimate_batchnorm(model, data)
    assert not model.training and model.bn1.momentum == 0.1
    assert model.bn1.running_var.mean() > 2.0  # learned from the scaled data, not the reset value 1
    a, b = SmallCNN(), SmallCNN()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    curve = lmc_curve(a, b, _loss_fn(x, y), n_points=3, bn_data=data)
    assert len(curve.values) == 3 and all(torch.isfinite(torch.tensor(curve.values)))
