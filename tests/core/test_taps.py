"""Module taps (kdcompose.training.taps) and the protocol primitives, on small torch modules: what is
recorded, when, from which call, through which wrapper prefix, and what a bad path says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcompose import LossContext, Tap
from kdcompose.errors import ConfigError
from kdcompose.primitives import connected_zero
from kdcompose.training.projectors import module_width, tap_width
from kdcompose.training.taps import ModuleTaps, capture


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (self.norm(self.proj(x)), None)  # decoder layers return tuples


class Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(width), Block(width)])
        self.shared = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)[0]
        x = self.shared(self.shared(x))  # runs twice per forward
        return self.head(x)


class Peft(nn.Module):
    """Names its wrapped model `base_model.model`, as PEFT does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_model.model(x)


def test_records_only_inside_recording_and_clears_on_exit():
    net = Net()
    tap = Tap("student", "layers.1")
    recorder = ModuleTaps(net, [tap])
    net(torch.randn(2, 4))  # outside: ignored (e.g. generation, checkpoint recomputation)
    with capture(recorder) as recorded:
        out = net(torch.randn(2, 4))
    assert len(recorded[tap]) == 1 and recorded[tap][0].shape == (2, 4)
    assert recorded[tap][0].requires_grad, "student taps keep the graph"
    assert recorder.recorded()[tap] == [], "records are dropped when the block ends"
    out.sum().backward()
    recorder.close()
    assert not any(m._forward_hooks for m in net.modules())


def test_tuple_outputs_inputs_calls_and_children():
    net = Net()
    x = torch.randn(2, 4)
    every = Tap("teacher", "shared")
    first, last = Tap("teacher", "shared", call=0), Tap("teacher", "shared", call=-1)
    head_input = Tap("teacher", "head", io="input")
    children = Tap("teacher", "layers", children=True)
    recorder = ModuleTaps(net, [every, first, last, head_input, children], detach=True)
    with torch.no_grad(), capture(recorder) as rec:
        net(x)
    expected_first = net.shared(net.layers[1](net.layers[0](x)[0])[0])
    assert len(rec[every]) == 2
    torch.testing.assert_close(rec[first][0], expected_first)
    torch.testing.assert_close(rec[last][0], net.shared(expected_first))
    torch.testing.assert_close(rec[head_input][0], rec[last][0], msg="the head's input is the last output")
    assert len(rec[children]) == 2 and not rec[children][0].requires_grad
    recorder.close()


def test_peft_and_ddp_prefixes_are_resolved():
    wrapped = Peft(Net())
    recorder = ModuleTaps(wrapped, [Tap("student", "layers.0")])
    assert [h.name for h in recorder.hooked] == ["base_model.model.layers.0"]
    recorder.close()


def test_a_bad_path_names_the_yaml_key_and_close_module_names_before_any_hook():
    net = Net()
    bad = Tap("student", "layer.1", origin="rlhf.loss_terms.hidden_kd.pairs.0.student")
    good = Tap("student", "layers.0")
    with pytest.raises(ConfigError) as info:
        ModuleTaps(net, [good, bad])
    assert info.value.paths == ("rlhf.loss_terms.hidden_kd.pairs.0.student",)
    assert "'layer.1'" in str(info.value) and "layers.1" in str(info.value)
    assert not any(m._forward_hooks for m in net.modules()), "a failed set-up leaves no hook"


def test_widths_are_read_from_structure():
    net = Net(width=6)
    assert module_width(net.head) == 3 and module_width(net.head, "input") == 6
    assert module_width(net.layers[0]) == 6  # ends in a norm
    assert tap_width(Peft(net), Tap("student", "layers.1")) == 6
    assert tap_width(net, Tap("student", "no.such")) is None


def test_connected_zero_stays_finite_with_infinite_logits_and_keeps_the_graph():
    logits = torch.tensor([[0.0, float("inf")], [float("-inf"), 1.0]], requires_grad=True)
    assert torch.isnan(logits.sum() * 0.0), "the naive zero this replaces"
    zero = connected_zero(logits)
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert LossContext(student_logits=logits).zero().item() == 0.0
