"""``model.arch``: the paper's parameter count and MACs, shapes, CSA locality, config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.arch import CSA, PAPER, ArchConfig, Generator, count_parameters, macs

TINY = ArchConfig(num_blocks=1, num_feat=8, num_grow=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def paper_nets() -> dict[str, Generator]:
    """The paper-size generator for each attention variant, built on the meta device (no memory)."""
    nets = {}
    for attention in ("csa", "csa_pooled", "none"):
        with torch.device("meta"):
            nets[attention] = Generator(ArchConfig(attention=attention))
    return nets


@pytest.mark.parametrize(
    ("attention", "expected"),
    [("csa", 16_746_902), ("csa_pooled", 16_746_902), ("none", 16_695_681)],
)
def test_paper_config_has_the_papers_parameter_count(paper_nets, attention, expected):
    assert PAPER.attention == "csa" and PAPER.num_blocks == 23 and PAPER.num_feat == 64
    assert count_parameters(paper_nets[attention]) == expected


def test_macs_difference_between_csa_and_pooled_is_the_per_position_mlp(paper_nets):
    """At 64² the per-position channel MLP (64→16→64) runs on every pixel of every block; the
    pooled ablation runs the same MLP on two pooled vectors (avg, max) per block instead."""
    csa, pooled = macs(paper_nets["csa"], 64), macs(paper_nets["csa_pooled"], 64)
    mlp = 64 * 16 + 16 * 64
    assert csa > pooled > 0
    assert csa - pooled == 23 * (64 * 64 - 2) * mlp  # = 23·64·64·mlp less the pooled MLP's 2 vectors
    assert macs(paper_nets["none"], 64) < pooled


def test_macs_formula_on_a_small_config():
    cfg = dict(num_blocks=3, num_feat=16, num_grow=8)
    csa = macs(Generator(ArchConfig(attention="csa", **cfg)), 16)
    pooled = macs(Generator(ArchConfig(attention="csa_pooled", **cfg)), 16)
    assert csa - pooled == 3 * (16 * 16 - 2) * (2 * 16 * 16 // 4)


@pytest.mark.parametrize("attention", ["csa", "csa_pooled", "none"])
def test_output_is_four_times_the_input_for_odd_sizes(attention):
    torch.manual_seed(0)
    net = Generator(ArchConfig(attention=attention, num_blocks=1, num_feat=8, num_grow=4)).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 7, 9))
    assert out.shape == (2, 1, 28, 36)
    assert torch.isfinite(out).all()


def _csa_output_change(pooled: bool) -> tuple[float, float]:
    """Change one input pixel at (0, 0); return the output change near it and at a far corner."""
    torch.manual_seed(0)
    csa = CSA(num_feat=8, reduction=4, spatial_kernel=7, pooled=pooled).eval()
    x = torch.rand(1, 8, 24, 24)
    x2 = x.clone()
    x2[0, :, 0, 0] += 3.0
    with torch.no_grad():
        a, b = csa(x), csa(x2)
    diff = (a - b).abs()
    return diff[..., :2, :2].max().item(), diff[..., 12:, 12:].max().item()  # far: > 7x7 reach


def test_csa_channel_attention_is_per_position():
    csa = CSA(num_feat=8, reduction=4, spatial_kernel=7, pooled=False)
    x = torch.rand(1, 8, 5, 6)
    assert csa._mlp(x).shape == x.shape  # one gate per channel *and* position
    near, far = _csa_output_change(pooled=False)
    assert near > 1e-3
    assert far == 0.0  # a pixel 12+ px away (beyond the 7x7 spatial conv) is untouched


def test_csa_pooled_channel_attention_is_global():
    near, far = _csa_output_change(pooled=True)
    assert near > 1e-3
    assert far > 1e-6  # the pooled gate sees the whole image


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"attention": "cbam"}, ["attention", "cbam"]),
        ({"scale": 2}, ["scale", "2"]),
        ({"num_feat": 30}, ["num_feat", "30", "reduction"]),
        ({"num_blocks": 0}, ["num_blocks"]),
        ({"spatial_kernel": 6}, ["spatial_kernel"]),
    ],
)
def test_arch_config_errors_name_the_argument(kwargs, names):
    with pytest.raises(ValueError) as err:
        ArchConfig(**kwargs)
    for name in names:
        assert name in str(err.value)


def test_arch_config_from_dict_rejects_unknown_keys_and_round_trips():
    assert ArchConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="num_layers"):
        ArchConfig.from_dict({**TINY.to_dict(), "num_layers": 3})


@pytest.mark.parametrize("attention", ["csa", "none"])
def test_global_skip_with_zero_last_conv_is_exactly_bicubic(attention):
    torch.manual_seed(0)
    net = Generator(ArchConfig(attention=attention, num_blocks=1, num_feat=8, num_grow=4, global_skip=True))
    x = torch.rand(1, 1, 11, 13)
    with torch.no_grad():
        out = net(x)
    expected = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    assert torch.equal(out, expected)
    # a non-zero last conv adds a residual: the comparison above can tell the two apart
    with torch.no_grad():
        torch.nn.init.normal_(net.conv_last.weight, std=0.1)
        assert not torch.allclose(net(x), expected, atol=1e-4)
