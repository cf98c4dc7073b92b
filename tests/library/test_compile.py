"""torch.compile of a converted ResNet: no graph breaks caused by kalmannorm, same numbers."""
import pytest
import torch

import kalmannorm as kn
from benchmarks.model import graph_breaks
from kalmannorm.harness.models import build_model

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="needs torch.compile")


def test_converted_resnet_has_no_graph_breaks():
    # explain traces the training forward (shadow rows, Kalman step, samples) with dynamo only:
    # a few seconds, no C++ compiler needed. The prediction is in forward hooks of the model:
    # a call of the model inside a compiled function (the training step) inlines them into the
    # one graph; explain(model) itself compiles each hook as its own small graph.
    torch.manual_seed(0)
    model = kn.convert_batchnorm(build_model("preact_resnet20", 10,
                                             kn.get_norm_layer("batchnorm")), micro_batch=2)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: model(x))(torch.randn(4, 3, 16, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    result = graph_breaks("preact_resnet20", micro_batch=2, batch=4, size=16)
    assert result["reasons"] == [] and result["graphs"] <= 3  # model, pre-hook, post-hook


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    net = build_model("preact_resnet8", 10, kn.get_norm_layer("batchnorm"), width=4)
    model = kn.convert_batchnorm(net, gain=0.9, micro_batch=2)
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    def step(fn):
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(1)  # the same shadow-row samples in both runs
        out = fn(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_eager, grads_eager = step(model)
    out_compiled, grads_compiled = step(compiled)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
