"""The ceiling `notbugs bench` prints beside each of notbugs' rows: which convolutions a job kind
differentiates through, with which gradients, and the replay that times them alone."""

from __future__ import annotations

import pytest
import torch

from notbugs import bench
from notbugs.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _model_and_batch(arch="small_cnn", n=8):
    torch.manual_seed(0)
    model = build_model(arch, 10, [0.5] * 3, [0.25] * 3).eval()
    return model, torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))


def test_an_attack_differentiates_every_convolution_for_its_input_only():
    model, x, y = _model_and_batch()
    calls = bench.convolutions_of(bench.job_kind_workload("attack", model, x, y, steps=2)[0])
    assert [call.input_shape[1] for call in calls] == [3, 16, 32, 64]  # small_cnn's four
    assert all(call.input_grad and call.weight_grads == () for call in calls)
    assert all(call.input_dtype == torch.float32 and not call.autocast for call in calls)
    # the image arrives as given (NCHW); the fast paths' channels_last starts at the first convolution
    assert [call.layout for call in calls] == [torch.contiguous_format] + [torch.channels_last] * 3
    # 2 steps, each differentiated, and the evaluation of the returned images without a backward pass
    assert all((call.differentiated, call.forward_only) == (2, 1) for call in calls)


def test_an_inversion_also_counts_its_goal_and_its_last_evaluation():
    model, x, y = _model_and_batch()
    calls = bench.convolutions_of(bench.job_kind_workload("inversion", model, x, y, steps=3)[0])
    assert len(calls) == 4 and all((call.differentiated, call.forward_only) == (3, 2) for call in calls)


def test_training_needs_weight_gradients_everywhere_and_no_image_gradient():
    model, x, y = _model_and_batch()
    calls = bench.convolutions_of(bench.job_kind_workload("training", model, x, y, steps=2)[0])
    assert len(calls) == 4 and all(call.weight_grads == ("weight",) for call in calls)
    assert [call.input_grad for call in calls] == [False, True, True, True]
    assert all((call.differentiated, call.forward_only) == (1, 0) for call in calls)


def test_bf16_autocast_is_recorded_with_the_dtypes_the_convolutions_receive():
    model, x, y = _model_and_batch()
    calls = bench.convolutions_of(bench.job_kind_workload("attack", model, x, y, steps=2, bf16=True)[0])
    assert all(call.autocast for call in calls)
    assert [call.input_dtype for call in calls] == [torch.float32] + [torch.bfloat16] * 3


def test_each_pass_is_counted_as_differentiated_or_forward_only():
    model, x, _ = _model_and_batch()

    def two_passes_one_differentiated():
        with torch.no_grad():
            model(x)
        model(x).sum().backward()

    calls = bench.convolutions_of(two_passes_one_differentiated)
    assert len(calls) == 4 and all((call.differentiated, call.forward_only) == (1, 1) for call in calls)
    assert all(call.weight_grads == ("weight",) for call in calls)  # recorded from the differentiated pass


def test_timing_the_convolutions_alone_leaves_the_model_as_it_found_it():
    model, x, y = _model_and_batch()
    calls = bench.convolutions_of(bench.job_kind_workload("training", model, x, y, steps=2)[0])
    calls[1].module.weight.requires_grad_(False)  # a state the replay must restore, whatever it sets
    params = [p for call in calls for p in call.module.parameters()]
    flags, grads = [p.requires_grad for p in params], [p.grad for p in params]
    assert all(g is not None for g in grads)  # the training step leaves its gradients behind
    assert bench.convolutions_alone_seconds(calls, min_seconds=0.01) > 0
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is g for p, g in zip(params, grads))


def test_the_replay_computes_only_the_gradients_the_job_needs():
    """The backward pass of each convolution is asked for exactly the recorded gradients: the
    ceiling of an attack must not include weight gradients, nor training's the image's."""
    model, x, y = _model_and_batch()
    calls = bench.convolutions_of(bench.job_kind_workload("training", model, x, y, steps=2)[0])
    masks = []
    original = torch.ops.aten.convolution_backward.default

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is original:
                masks.append(tuple(args[-1]))
            return func(*args, **(kwargs or {}))

    with Spy():
        bench.convolutions_alone_seconds(calls[:2], min_seconds=0.0)
    # output_mask = (input, weight, bias): the stem needs its weight only, the next layer both
    assert set(masks) == {(False, True, False), (True, True, False)}

    # an attack's replay on weights that require gradients (as they do outside the attack):
    # the input's gradient only
    calls = bench.convolutions_of(bench.job_kind_workload("attack", model, x, y, steps=2)[0])
    for call in calls:
        call.module.requires_grad_(True)
    masks.clear()
    with Spy():
        bench.convolutions_alone_seconds(calls, min_seconds=0.0)
    assert set(masks) == {(True, False, False)}


def test_a_model_without_convolutions_gets_no_ceiling(monkeypatch):
    monkeypatch.setattr(bench, "native_bf16", lambda device: False)
    lines = []
    rows = bench.run(archs=("mlp",), batch=8, steps=1, min_seconds=0.05, print_fn=lines.append)
    assert rows and all(row["convolutions_alone"] is None for row in rows)
    assert not any("ceiling" in line for line in lines if "% of the" in line or "ratio" in line)
