"""Two CPU processes (DDP over gloo): every rank prunes exactly the same weights and channels."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_prune import PruningError, SNIPCallback
from tests.helpers.modules import TinyModule

SCRIPT = Path(__file__).with_name("ddp_run.py")


def two_ranks(tmp_path, mode):
    """Run ddp_run.py in `mode` on two CPU processes; each rank's final state dict."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))


@pytest.mark.parametrize(
    "mode",
    [
        "unstructured",
        "structured",
        "snapit-during",
        "slimming",
        pytest.param("sensitivity", marks=pytest.mark.slow),  # 83 s on the shared 2-core machine
    ],
)
def test_two_ranks_agree(tmp_path, mode):
    a, b = two_ranks(tmp_path, mode)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key] == 0, b[key] == 0), key  # identical zero patterns
        torch.testing.assert_close(a[key], b[key])  # and DDP kept training them in sync
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    zeros = sum(int((a[k] == 0).sum()) for k in weights) / sum(a[k].numel() for k in weights)
    if mode != "unstructured":
        assert a["model.stem.0.weight"].shape[0] < 8
    else:
        assert zeros == pytest.approx(0.6, abs=1e-3)
        # the decision is the top 40% of the scores SUMMED over both ranks (each saw different batches)
        s0 = torch.load(tmp_path / "scores0.pt", weights_only=True)
        s1 = torch.load(tmp_path / "scores1.pt", weights_only=True)
        masks = torch.load(tmp_path / "masks0.pt", weights_only=True)
        assert not torch.equal(s0["model.stem.0.weight"], s1["model.stem.0.weight"])
        total = torch.cat([(s0[k] + s1[k]).flatten() for k in masks])
        kept = torch.cat([masks[k].flatten() for k in masks])
        assert total[kept].min() >= total[~kept].max()
        rank0 = torch.cat([s0[k].flatten() for k in masks])
        assert not rank0[kept].min() >= rank0[~kept].max()  # rank 0's own scores would decide otherwise


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hoyer", "group-hoyer", "l0"])
def test_two_ranks_agree_on_the_regularised_baselines(tmp_path, mode):
    a, b = two_ranks(tmp_path, mode)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])  # same pruning, same gates, same training on both ranks
    dense = TinyModule(arch="resnet").state_dict()
    if mode == "hoyer":
        weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
        assert sum(int((a[k] == 0).sum()) for k in weights) > 0
    else:  # channels were removed physically
        assert sum(v.numel() for v in a.values()) < sum(v.numel() for v in dense.values())


def test_structured_under_ddp_spawn_is_refused_in_setup(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        logger=False,
        default_root_dir=tmp_path,
    )
    snip = SNIPCallback(structured=True)
    trainer.fit_loop._data_source.instance = TinyModule()  # what Trainer.fit sets up before `setup`
    with pytest.raises(PruningError, match=r"spawning strategy \(ddp_spawn\)"):
        snip.setup(trainer, TinyModule(), "fit")
