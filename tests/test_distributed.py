"""Quantization under torch.distributed: 2 CPU ranks (gloo) against one process.

Every rank must hold bit-identical quantization parameters after each step, a 2-rank run with
per-rank batch B must equal one process with batch 2B, sharded calibration must equal one process
over all the batches (exactly, for min-max and histogram observers), rank 0's checkpoint must
load into a 1-process model, and bad set-ups must fail with a message on every rank.
"""

from __future__ import annotations

import copy

import dist_workers as w
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing import ProcessRaisedException

import lowbit
from lowbit import QuantConfig

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built in")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("preset", ["w8a8-qat", "w4a8-lsq", "w1a8-slb"])
def test_two_ranks_train_as_one_process_with_twice_the_batch(preset, tmp_path):
    ranks = w.launch(w.train_qat, 2, tmp_path, preset)
    alone = w.run_alone(w.train_qat, preset)
    assert_same(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")
    assert_close(ranks[0]["state"], alone["state"], atol=1e-5)
    assert ranks[0]["steps"] == ranks[1]["steps"] == alone["steps"]
    assert ranks[0]["temperature"] == ranks[1]["temperature"] == alone["temperature"]


def test_lagged_ranges_reduce_once_a_step_and_still_equal_one_process(tmp_path):
    """``lag_ranges``: one all-reduce per step (after the first, where each quantizer sets its
    range at once), ranks identical, and 2 ranks x B equal 1 process x 2B lagging the same way;
    the ranges differ from the unlagged run's (they trail by one step)."""
    ranks = w.launch(w.train_qat, 2, tmp_path, "w8a8-qat", True, True)
    alone = w.run_alone(w.train_qat, "w8a8-qat", True, True)
    assert_same(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")
    assert_close(ranks[0]["state"], alone["state"], atol=1e-5)
    # Step 1: each quantizer sets its range at once; step 2 queues its ranges; from step 3
    # on, each step's forward first reduces the previous step's queue in one all-reduce.
    counts = ranks[0]["all_reduces"]
    assert counts[0] > 1 and counts[1] == 0 and all(n == 1 for n in counts[2:]), counts
    unlagged = w.run_alone(w.train_qat, "w8a8-qat")
    ema = [k for k in alone["state"] if k.endswith("observer.hi")]
    assert ema and any(not torch.equal(alone["state"][k], unlagged["state"][k]) for k in ema)


def test_without_reductions_ranks_drift_apart(tmp_path):
    """The control: the same job with reductions off leaves the ranks' ranges different."""
    ranks = w.launch(w.train_qat, 2, tmp_path, "w8a8-qat", False)  # reductions off
    differ = [k for k in ranks[0]["state"] if "observer" in k
              and not torch.equal(ranks[0]["state"][k], ranks[1]["state"][k])]
    assert differ


def test_sharded_calibration_equals_one_process_over_all_batches(tmp_path):
    ranks = w.launch(w.calibrate_observers, 2, tmp_path)
    alone = w.run_alone(w.calibrate_observers)
    assert ranks[0].keys() == alone.keys()
    for case in alone:
        assert_same(ranks[0][case], ranks[1][case], f"{case}: rank 0 vs rank 1")
        assert_same(ranks[0][case], alone[case], f"{case}: 2 ranks vs 1 process")


def test_weight_algorithms_and_bias_correction_agree_across_ranks(tmp_path):
    ranks = w.launch(w.calibrate_weight_algorithms, 2, tmp_path)
    alone = w.run_alone(w.calibrate_weight_algorithms)
    for case in alone:
        assert_same(ranks[0][case], ranks[1][case], f"{case}: rank 0 vs rank 1")
    # Maxima, means and the GPTQ Hessian are reduced exactly: the same weights as one process
    # reading all the batches (up to float summation order).
    for case in ("smoothing", "gptq", "bias_correction"):
        assert_close(ranks[0][case], alone[case], atol=1e-5)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_rank0_checkpoint_loads_into_one_process_and_exports(sharding, tmp_path):
    ranks = w.launch(w.train_mlp, 2, tmp_path, "w4a8-lsq", sharding, str(tmp_path / "dcp"))
    alone = w.run_alone(w.train_mlp, "w4a8-lsq", sharding)
    state = ranks[0]
    # Min-max observers count one batch per rank for the one global calibration batch.
    assert_close({k: v for k, v in state.items() if not k.endswith("observer.count")},
                 {k: v for k, v in alone.items() if not k.endswith("observer.count")}, atol=1e-5)
    single = lowbit.prepare_qat(w.mlp(), QuantConfig.preset("w4a8-lsq"))
    single.load_state_dict(state)
    assert_same(w.tensors(single), state, "loaded vs saved")
    single.eval()
    probe = torch.randn(5, 16)
    deployed = lowbit.convert(single)
    torch.testing.assert_close(deployed(probe), single(probe), atol=1e-5, rtol=1e-5)
    out = lowbit.export_onnx(deployed, tmp_path / "mlp.onnx", example_inputs=(probe,))
    assert (tmp_path / "mlp.onnx").exists() and out is not None
    if sharding == "fsdp":  # the sharded checkpoint holds the same state
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(tmp_path / "dcp", tmp_path / "from_dcp.pt")
        from_dcp = torch.load(tmp_path / "from_dcp.pt", weights_only=False)
        assert_same({k: v.cpu() for k, v in from_dcp.items()}, state, "DCP vs full state dict")


def test_bad_setups_fail_on_every_rank_with_the_cause(tmp_path):
    ranks = w.launch(w.mismatches, 2, tmp_path)
    for messages in ranks:
        train, calib, fsdp = messages
        assert train.startswith("train: ranks hold different quantized models")
        assert "rank 1 has" in train and "w4a8" not in train  # names the layer and spec
        assert "bits=4" in train or "bits=8" in train
        assert calib.startswith("calibrate: ranks hold different numbers of calibration")
        assert "batch 3" in calib
        assert fsdp.startswith("fsdp: 1 learned quantizer(s)") and "'2' (input)" in fsdp
        assert "before fully_shard" in fsdp


def test_a_failing_rank_surfaces_its_error(tmp_path):
    with pytest.raises(ProcessRaisedException, match="RankMismatchError"):
        w.launch(_raise_mismatch, 2, tmp_path)


def _raise_mismatch(rank: int, world: int) -> None:
    qm = lowbit.prepare_qat(w.mlp() if rank == 0 else w.conv_net(), QuantConfig.preset("w8a8-qat"))
    qm(torch.randn(2, 16) if rank == 0 else torch.randn(2, 1, 8, 8))


def test_process_group_needs_an_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="initialised"):
        with lowbit.distributed.process_group(object()):
            pass


def test_one_process_never_reduces():
    assert lowbit.distributed.active_group() is None
    with lowbit.distributed.local():
        assert lowbit.distributed.active_group() is None


def test_lagged_ranges_quantize_with_the_previous_steps_range():
    """One process: step 1 sets the EMA range, step 2 is quantized with it and queues its own
    range, step 3's forward folds step 2's range in first (EMA: rate·r1 + (1 − rate)·r2)."""
    torch.manual_seed(0)
    qm = lowbit.prepare_qat(nn.Sequential(nn.Linear(4, 4)), QuantConfig.preset("w8a8-qat"))
    queue = lowbit.distributed.lag_ranges(qm)
    assert lowbit.distributed.lag_ranges(qm) is queue  # idempotent: one hook, one queue
    observer = qm[0].input_quant.observer
    rate = observer.spec.moving_rate
    x1, x2, x3 = torch.randn(8, 4), 3 * torch.randn(8, 4), torch.randn(8, 4)
    qm.train()
    qm(x1)
    assert torch.equal(observer.hi, x1.max().reshape(1))
    scale = qm[0].input_quant.scale.clone()
    qm(x2)
    assert torch.equal(observer.hi, x1.max().reshape(1)) and len(queue.pending) == 1
    assert torch.equal(qm[0].input_quant.scale, scale)  # x2 was quantized on x1's range
    copied = copy.deepcopy(qm)  # a copy keeps lagging, without this process's pending range
    assert not copied[0].input_quant.observer.lag.pending
    qm.eval()
    qm(x3)  # eval forwards neither flush nor queue
    assert len(queue.pending) == 1
    qm.train()
    qm(x3)
    expected = rate * x1.max() + (1 - rate) * x2.max()
    torch.testing.assert_close(observer.hi, expected.reshape(1))
    assert not torch.equal(qm[0].input_quant.scale, scale) and len(queue.pending) == 1


def test_lag_ranges_refuses_what_it_cannot_lag():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        lowbit.distributed.lag_ranges("model")
    with pytest.raises(ValueError, match="no activation quantizer with a range observer"):
        lowbit.distributed.lag_ranges(nn.Linear(2, 2))
