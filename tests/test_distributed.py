"""Quantization under torch.distributed: 2 CPU ranks (gloo) against one process.

Every rank must hold bit-identical quantization parameters after each step, a 2-rank run with
per-rank batch B must equal one process with batch 2B, sharded calibration must equal one process
over all the batches (exactly, for min-max and histogram observers), rank 0's checkpoint must
load into a 1-process model, and bad set-ups must fail with a message on every rank.
"""

from __future__ import annotations

import dist_workers as w
import pytest
import torch
import torch.distributed as dist
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
