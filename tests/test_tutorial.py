"""The tutorial's script (docs/tutorial.md) runs end to end: prune, train, shrink, reload, fine-tune."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "prune_your_own_model.py"


@pytest.fixture
def tutorial():
    spec = importlib.util.spec_from_file_location("prune_your_own_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the script picks 1 thread for its tiny network


def test_tutorial_script_prunes_shrinks_reloads_and_fine_tunes(tutorial, tmp_path, recwarn):
    pytest.importorskip("sklearn")
    result = tutorial.main(epochs=1, out=str(tmp_path))
    assert (tmp_path / "mynet_shrunk.pt").is_file()
    assert result["small_params"] < 0.15 * result["dense_params"]  # 70% of the channels of every layer
    assert result["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert not [w for w in recwarn if "in eval mode" in str(w.message)]  # fine-tuned in training mode
