import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_prune import PruningError, ShrinkOnFitEnd, SNIPCallback, load_pruned_checkpoint
from tests.helpers.modules import TinyModule, trainer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latency_batch_size": 0}, r"`ShrinkOnFitEnd\(latency_batch_size=0\)` is invalid"),
        ({"latency_repeats": 1.5}, r"`latency_repeats` must be an int >= 1; got 1.5"),
        (
            {"latency_modes": "compile"},
            r"`latency_modes` must be a list of modes from \['eager', 'channels_last'",
        ),
        (
            {"latency_modes": ["eager", "jit"]},
            r"ShrinkOnFitEnd\(latency_modes=\['eager', 'jit'\]\)` is invalid",
        ),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        ShrinkOnFitEnd(**kwargs)


def test_structured_snip_then_shrink_saves_a_checkpoint_that_reloads(tmp_path):
    pl.seed_everything(0)
    module = TinyModule(arch="resnet")
    shrinker = ShrinkOnFitEnd(save_path=tmp_path / "small.pt", latency_batch_size=8, latency_repeats=3)
    logger = CSVLogger(tmp_path, name="logs")
    trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker], max_epochs=2, logger=logger).fit(
        module
    )

    r = shrinker.report
    assert r.after.params < r.before.params
    assert r.after.macs < r.before.macs
    assert r.after.checkpoint_mb < r.before.checkpoint_mb
    assert r.after.latency_b1_ms > 0 and r.before.latency_batch_ms > 0 and r.before.batch_size == 8
    assert r.metrics()["shrink/latency_b8_ms_before"] == r.before.latency_batch_ms
    for figures in (r.before, r.after):
        lo, hi = figures.latency_b1_range
        assert lo <= figures.latency_b1_ms <= hi
        assert figures.macs_per_example == figures.macs / figures.examples and figures.examples == 2
    assert "shrink/macs_after" in (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "params" in str(shrinker.table().columns[0]._cells)

    raw = torch.load(tmp_path / "small.pt", weights_only=True)
    assert set(raw) >= {"state_dict", "hyper_parameters"}
    loaded = load_pruned_checkpoint(TinyModule, tmp_path / "small.pt")
    x = torch.randn(4, 3, 8, 8)
    module.eval()
    torch.testing.assert_close(loaded(x), module(x))
    assert sum(p.numel() for p in loaded.parameters()) == r.after.params


def test_unstructured_masks_become_permanent_and_dead_channels_go(tmp_path):
    pl.seed_everything(0)
    module = TinyModule()
    # prune everything feeding two channels of features.0 by hand, through a mask, BN included
    snip = SNIPCallback(limit=0.3)
    shrinker = ShrinkOnFitEnd(latency_repeats=2, latency_batch_size=4)

    class KillTwo(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            masks = {n: m.clone() for n, m in snip.masks.items()}
            masks["model.features.0.weight"][:2] = False
            snip.set_masks(pl_module, masks)
            snip._attach(trainer, pl_module)
            with torch.no_grad():
                pl_module.model.features[0].bias[:2] = 0
                pl_module.model.features[1].weight[:2] = 0
                pl_module.model.features[1].bias[:2] = 0
                for p in (
                    pl_module.model.features[0].bias,
                    pl_module.model.features[1].weight,
                    pl_module.model.features[1].bias,
                ):
                    p.requires_grad_(False)

    trainer(tmp_path, [snip, KillTwo(), shrinker], max_epochs=1).fit(module)
    assert snip.masks == {}  # permanent: the zeros are plain weights now
    assert module.model.features[0].out_channels == 6
    assert shrinker.report.channels_removed == 2
    assert shrinker.report.after.nonzero_params < 0.8 * shrinker.report.before.params


def test_resumed_fit_compares_with_the_first_start(tmp_path):
    pl.seed_everything(0)
    from lightning.pytorch.callbacks import ModelCheckpoint

    shrinker = ShrinkOnFitEnd(latency_repeats=2, latency_batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", save_top_k=-1)
    cbs = [SNIPCallback(limit=0.5, structured=True), shrinker, ckpt]
    trainer(tmp_path, cbs, max_epochs=1, enable_checkpointing=True).fit(TinyModule())
    first = shrinker.report.before.params
    again = ShrinkOnFitEnd(latency_repeats=2, latency_batch_size=4)
    cbs = [SNIPCallback(limit=0.5, structured=True), again]
    trainer(tmp_path, cbs, max_epochs=2).fit(TinyModule(), ckpt_path=tmp_path / "c" / "epoch=0-step=4.ckpt")
    assert again.report.before.params == first
    assert again.report.after.params < first


def test_the_table_says_when_a_latency_difference_is_within_the_noise():
    from lightning_prune.callbacks.reports import Figures, GainReport

    def figures(b1, spread):
        return Figures(100, 90, 1000, 2, b1, (b1 - spread, b1 + spread), 4 * b1, (3 * b1, 5 * b1), 8, 1.0)

    shrinker = ShrinkOnFitEnd()
    shrinker.report = GainReport(figures(1.0, 0.5), figures(0.9, 0.5), 3)  # ranges overlap
    assert "batch 1, batch 8): the start and end ranges overlap" in shrinker.table().caption
    shrinker.report = GainReport(figures(1.0, 0.01), figures(0.2, 0.01), 3)  # 5x faster, clearly
    assert "overlap" not in shrinker.table().caption
    assert "MACs per example" in str(shrinker.table().columns[0]._cells)


def test_the_shrunk_model_is_exported_with_torch_export_and_checked(tmp_path):
    pl.seed_everything(0)
    module = TinyModule()
    shrinker = ShrinkOnFitEnd(export_path=tmp_path / "out" / "small.pt2", latency_repeats=1)
    trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker], max_epochs=1).fit(module)
    program = torch.export.load(tmp_path / "out" / "small.pt2")
    x = torch.randn(3, 3, 8, 8)
    module.eval()
    torch.testing.assert_close(program.module()(x), module(x))
    weights = dict(program.module().named_parameters())
    assert weights["model.features.0.weight"].shape == module.model.features[0].weight.shape
    assert module.model.features[0].out_channels < 8


def test_a_model_torch_export_cannot_capture_fails_after_the_checkpoint_is_saved(tmp_path):
    class DataDependent(TinyModule):
        def forward(self, x):
            out = self.model(x)
            return out if float(out.sum()) > -1e9 else -out  # Python control flow on a value

    pl.seed_everything(0)
    module = DataDependent()
    shrinker = ShrinkOnFitEnd(save_path=tmp_path / "small.pt", export_path=tmp_path / "small.pt2")
    with pytest.raises(PruningError, match=r"export_path=.*torch.export cannot export DataDependent"):
        trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker], max_epochs=1).fit(module)
    assert (tmp_path / "small.pt").exists() and not (tmp_path / "small.pt2").exists()


def test_channels_last_converts_the_shrunk_model_and_keeps_its_function(tmp_path):
    pl.seed_everything(0)
    module = TinyModule()
    shrinker = ShrinkOnFitEnd(save_path=tmp_path / "small.pt", channels_last=True, latency_repeats=1)
    trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker], max_epochs=1).fit(module)
    conv = module.model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert "channels_last" in shrinker.table().caption
    loaded = load_pruned_checkpoint(TinyModule, tmp_path / "small.pt")  # loads like any other file
    x = torch.randn(2, 3, 8, 8)
    module.eval()
    torch.testing.assert_close(loaded.eval()(x), module(x))
    with pytest.raises(PruningError, match=r"`channels_last` must be a bool"):
        ShrinkOnFitEnd(channels_last="yes")


def test_the_shrunk_model_is_exported_to_onnx_and_checked_with_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pl.seed_everything(0)
    module = TinyModule(arch="resnet")
    shrinker = ShrinkOnFitEnd(export_path=tmp_path / "small.onnx", latency_repeats=1)
    trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker], max_epochs=1).fit(module)
    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 8, 8)  # another batch size than the example's: the batch dimension is dynamic
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    module.eval()
    torch.testing.assert_close(torch.from_numpy(got), module(x), rtol=1e-4, atol=1e-5)
    assert shrinker.report.after.params < shrinker.report.before.params


def test_onnx_export_without_the_onnx_packages_is_refused_at_construction(monkeypatch, tmp_path):
    import lightning_prune.callbacks.shrink as shrink_module

    monkeypatch.setattr(shrink_module, "find_spec", lambda name: None if name == "onnxruntime" else object())
    with pytest.raises(PruningError, match=r"needs the packages onnxruntime .* lightning-prune\[onnx\]"):
        ShrinkOnFitEnd(export_path=tmp_path / "m.onnx")
    ShrinkOnFitEnd(export_path=tmp_path / "m.pt2")  # torch.export needs nothing more


def test_latency_is_also_measured_channels_last_and_a_failing_mode_is_reported(tmp_path, monkeypatch):
    import lightning_prune.callbacks.shrink as shrink_module

    real = shrink_module.in_mode

    def no_compiler(model, inputs, mode):  # as on a machine where torch.compile cannot build kernels
        if mode == "compile":
            raise RuntimeError("no C++ compiler found")
        return real(model, inputs, mode)

    monkeypatch.setattr(shrink_module, "in_mode", no_compiler)
    pl.seed_everything(0)
    module = TinyModule()
    shrinker = ShrinkOnFitEnd(
        latency_repeats=3, latency_batch_size=4, latency_modes=["compile", "channels_last"]
    )
    trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker], max_epochs=1).fit(module)
    r = shrinker.report
    for figures in (r.before, r.after):
        assert set(figures.modes) == {"channels_last"}
        median, lo, hi = figures.modes["channels_last"]
        assert 0 < lo <= median <= hi
    assert not module.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)  # a copy ran
    assert r.metrics()["shrink/latency_b4_channels_last_ms_after"] == r.after.modes["channels_last"][0]
    labels = str(shrinker.table().columns[0]._cells)
    assert "latency, batch 4, channels_last (ms, median)" in labels and "compile (ms" not in labels
    assert "compile latency not measured (RuntimeError: no C++ compiler found)" in shrinker.table().caption
    from lightning_prune.callbacks.reports import Figures

    assert Figures.from_short(r.after.short(), 4) == r.after  # resumable with the mode figures


def test_in_mode_compile_runs_the_same_function():
    from lightning_prune.stats import in_mode

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    x = torch.randn(2, 3, 8, 8)
    net(x)
    compiled, inputs = in_mode(net, x, "compile")
    try:
        got = compiled(inputs)
    except Exception as err:  # a machine without a working compiler toolchain
        pytest.skip(f"torch.compile unavailable here: {type(err).__name__}")
    torch.testing.assert_close(got, net(x))
    with pytest.raises(PruningError, match=r"`mode` must be one of \['eager', 'channels_last', 'compile'\]"):
        in_mode(net, x, "tensorrt")


def test_fold_bn_exports_a_folded_copy_and_leaves_the_module_and_checkpoint_alone(tmp_path):
    pl.seed_everything(0)
    module = TinyModule()
    shrinker = ShrinkOnFitEnd(
        save_path=tmp_path / "small.pt", export_path=tmp_path / "small.pt2", fold_bn=True, latency_repeats=1
    )
    trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker], max_epochs=1).fit(module)
    program = torch.export.load(tmp_path / "small.pt2")
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("batch_norm" in op for op in ops) and any("conv" in op for op in ops)
    assert isinstance(module.model.features[1], torch.nn.BatchNorm2d)  # the module keeps its BatchNorms
    assert module.model.features[0].out_channels < 8  # shrunk
    x = torch.randn(3, 3, 8, 8)
    module.eval()
    torch.testing.assert_close(program.module()(x), module(x), rtol=1e-4, atol=1e-5)
    assert (
        "model.features.1.running_mean" in torch.load(tmp_path / "small.pt", weights_only=True)["state_dict"]
    )
    assert shrinker.folded == 2 and "2 BatchNorm layer(s) folded" in shrinker.table().caption


def test_fold_bn_needs_an_export_path_and_something_to_fold(tmp_path):
    with pytest.raises(
        PruningError, match=r"`ShrinkOnFitEnd\(fold_bn=True\)` is invalid without `export_path`"
    ):
        ShrinkOnFitEnd(fold_bn=True)
    shrinker = ShrinkOnFitEnd(export_path=tmp_path / "m.pt2", fold_bn=True, latency_repeats=1)
    module = TinyModule(arch="densenet")  # every BatchNorm reads a concatenation or a shared output
    with pytest.raises(
        PruningError, match=r"TinyModule has no BatchNorm layer that follows .* before training"
    ):
        trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker]).fit(module)
    assert not (tmp_path / "m.pt2").exists()


def test_fold_bn_names_the_batchnorms_it_leaves(tmp_path):
    class InputNorm(TinyModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), self.model)

    shrinker = ShrinkOnFitEnd(export_path=tmp_path / "m.pt2", fold_bn=True, latency_repeats=1)
    with pytest.warns(UserWarning, match=r"export 1 BatchNorm layer\(s\) of InputNorm unfolded: 'model.0'"):
        trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker]).fit(InputNorm())
    assert shrinker.folded == 2


def test_a_fold_that_fails_at_the_end_exports_unfolded_and_the_fit_finishes(tmp_path, monkeypatch):
    def failing(model, example, strict):
        raise PruningError("`fold_batchnorm` cannot fold 1 BatchNorm layer(s) of TinyModule: 'x'")

    monkeypatch.setattr("lightning_prune.callbacks.shrink.fold_batchnorm", failing)
    shrinker = ShrinkOnFitEnd(
        save_path=tmp_path / "small.pt", export_path=tmp_path / "m.pt2", fold_bn=True, latency_repeats=1
    )
    module = TinyModule()
    with pytest.warns(UserWarning, match=r"exports the model unfolded: `fold_batchnorm` cannot fold"):
        trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), shrinker], max_epochs=1).fit(module)
    ops = {
        str(n.target) for n in torch.export.load(tmp_path / "m.pt2").graph.nodes if n.op == "call_function"
    }
    assert any("batch_norm" in op for op in ops)  # exported as it is
    assert (tmp_path / "small.pt").exists() and shrinker.folded == 0 and shrinker.report is not None
