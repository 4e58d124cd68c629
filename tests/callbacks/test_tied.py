"""Tied and shared weights in unstructured pruning: one parameter object is one unit everywhere."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import IterativeSNIPCallback, PruningError, SNIPCallback, SNIPit
from lightning_prune.structure.layers import is_root
from tests.helpers.modules import trainer

VOCAB, DIM = 64, 16


def token_loader(n: int = 32, length: int = 9, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (n, length), generator=gen)), batch_size=8)


class TiedLM(pl.LightningModule):
    """Embedding → Linear → LM head whose weight IS the embedding matrix."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.hidden(self.embed(ids))))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)

    def train_dataloader(self):
        return token_loader()


class ScoreSpy:
    """Wraps a criterion: records which tensors it was asked to score, under which names."""

    def __init__(self, criterion) -> None:
        self.criterion, self.calls = criterion, []

    def __getattr__(self, name):
        return getattr(self.criterion, name)

    def weight_scores(self, inputs):
        self.calls.append([(n, id(w)) for n, w in inputs.weights.items()])
        return self.criterion.weight_scores(inputs)


def distinct_weights(module: nn.Module) -> dict[int, nn.Parameter]:
    """The weights of every prunable layer (Linear, GPT-2's Conv1D), one per parameter object (what limit
    counts against)."""
    return {id(m.weight): m.weight for m in module.modules() if is_root(m)}


def check_masks(pruner, module: nn.Module, limit: float) -> None:
    """One mask per parameter object; exactly round(n·(1 − limit)) kept, n counted once; masked = 0."""
    params = dict(module.named_parameters())
    n = sum(w.numel() for w in distinct_weights(module).values())
    masked = {id(params[name]) for name in pruner.masks}
    assert len(masked) == len(pruner.masks) == len(distinct_weights(module))
    assert pruner.initial["weights"] == n
    assert sum(int(m.sum()) for m in pruner.masks.values()) == round(n * (1 - limit))
    assert pruner.report.weight_sparsity == pytest.approx(limit, abs=1 / n)
    for name, mask in pruner.masks.items():
        assert torch.all(params[name][~mask] == 0), name  # weight decay and Adam did not revive them
        assert torch.count_nonzero(params[name][mask]) >= 0.9 * int(mask.sum()), name  # the rest trained


CALLBACKS = {
    "snip": lambda: SNIPCallback(limit=0.5),
    "snipit": lambda: SNIPit(limit=0.8, steps=2, num_batches=2),
}


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_a_head_tied_to_the_embedding_is_pruned_once_and_stays_tied(tmp_path, name):
    pl.seed_everything(0)
    module, pruner = TiedLM(), CALLBACKS[name]()
    pruner.criterion = spy = ScoreSpy(pruner.criterion)
    trainer(tmp_path, [pruner], max_epochs=2).fit(module)
    assert module.lm_head.weight is module.embed.weight
    assert list(pruner.masks) == ["hidden.weight", "embed.weight"]  # the tied head by its canonical name
    assert len(spy.calls) == len(pruner.schedule)
    for call in spy.calls:  # scored once per step: one entry for the shared tensor
        assert [n for n, _ in call] == ["hidden.weight", "embed.weight"]
        assert dict(call)["embed.weight"] == id(module.embed.weight)
    check_masks(pruner, module, pruner.limit)
    rows = (~pruner.masks["embed.weight"]).any(1)
    assert rows.any()  # the head's mask zeros entries of token embeddings too, as documented
    assert pruner.tied == {"lm_head.weight": "embed.weight"}


def test_excluding_the_tied_head_keeps_the_embedding_whole(tmp_path):
    module, pruner = TiedLM(), SNIPCallback(limit=0.5, exclude=["lm_head"])
    trainer(tmp_path, [pruner], max_steps=2).fit(module)
    assert list(pruner.masks) == ["hidden.weight"]
    assert torch.count_nonzero(module.embed.weight) == module.embed.weight.numel()
    assert pruner.initial["weights"] == DIM * DIM


# -- Hugging Face causal LMs ---------------------------------------------------------------------------
def hf_causal_lm(arch: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            **common,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **common)
    return transformers.GPT2LMHeadModel(config)


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM trained on random tokens with its own shifted cross-entropy."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.model = hf_causal_lm(arch)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return token_loader()


@pytest.mark.parametrize("name", list(CALLBACKS))
@pytest.mark.parametrize(("arch", "embedding"), [("llama", "embed_tokens"), ("gpt2", "transformer.wte")])
def test_hugging_face_causal_lms_with_tied_embeddings(tmp_path, arch, embedding, name):
    pl.seed_everything(0)
    module, pruner = CausalLM(arch), CALLBACKS[name]()
    hf = module.model
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    trainer(tmp_path, [pruner], max_steps=3).fit(module)
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    shared = f"model.{'model.' if arch == 'llama' else ''}{embedding}.weight"
    assert shared in pruner.masks and "model.lm_head.weight" not in pruner.masks
    assert pruner.tied == {"model.lm_head.weight": shared}
    check_masks(pruner, module, pruner.limit)  # GPT-2's Conv1D layers are pruned with the tied head


# -- one layer in two places ------------------------------------------------------------------------------
class SharedLayers(pl.LightningModule):
    """``block`` runs twice (once under a second attribute name) and lends its weight to ``twin``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.alias = self.block  # the same module under a second name
        self.twin = nn.Linear(16, 16)  # its own bias, block's weight
        self.twin.weight = self.block.weight
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.block(h))
        h = torch.relu(self.alias(h))  # the block a second time
        return self.out(torch.relu(self.twin(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(32, 8, generator=gen)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()), batch_size=8)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_a_layer_used_twice_is_scored_once_and_stays_one_object(tmp_path, name):
    pl.seed_everything(0)
    module, pruner = SharedLayers(), CALLBACKS[name]()
    block, weight = module.block, module.block.weight
    pruner.criterion = spy = ScoreSpy(pruner.criterion)
    trainer(tmp_path, [pruner], max_epochs=2).fit(module)
    assert module.alias is module.block is block
    assert module.twin.weight is module.block.weight is weight
    for call in spy.calls:
        assert [n for n, _ in call] == ["inp.weight", "block.weight", "out.weight"]
    assert list(pruner.masks) == ["inp.weight", "block.weight", "out.weight"]
    assert pruner.tied == {"alias.weight": "block.weight", "twin.weight": "block.weight"}
    check_masks(pruner, module, pruner.limit)
    assert pruner.initial["weights"] == 8 * 16 + 16 * 16 + 16 * 4


def test_masks_given_under_another_name_of_a_shared_weight_are_combined(tmp_path):
    module, pruner = SharedLayers(), SNIPCallback(limit=0.5)
    trainer(tmp_path, [pruner], max_steps=1).fit(module)
    first = torch.ones(16, 16, dtype=torch.bool)
    first[0] = False
    second = torch.ones(16, 16, dtype=torch.bool)
    second[:, 1] = False
    pruner.set_masks(module, {"twin.weight": first, "alias.weight": second})
    assert list(pruner.masks) == ["block.weight"]
    assert torch.equal(pruner.masks["block.weight"], first & second)
    assert torch.all(module.twin.weight[0] == 0) and torch.all(module.block.weight[:, 1] == 0)
    with pytest.raises(PruningError, match=r"mask for nothing\.weight, which is not a parameter"):
        pruner.set_masks(module, {"nothing.weight": first})


# -- checkpoints ---------------------------------------------------------------------------------------------
def during() -> IterativeSNIPCallback:
    return IterativeSNIPCallback(
        limit=0.8, steps=1, when="during", prune_delay=0, prune_freq=1, num_batches=2
    )


def test_resume_keeps_the_tie_and_the_masks(tmp_path):
    pl.seed_everything(0)
    first, cb = TiedLM(), during()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [cb, ckpt], max_epochs=4, enable_checkpointing=True).fit(first)
    assert cb.step == 3 and first.lm_head.weight is first.embed.weight

    path = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"  # after the first of three steps (start of epoch 2)
    state = torch.load(path, weights_only=True)  # bools, strings and numbers only
    saved = state["callbacks"][cb.state_key]
    assert saved["step"] == 1 and list(saved["masks"]) == ["hidden.weight", "embed.weight"]
    assert saved["tied"] == {"lm_head.weight": "embed.weight"}
    weights = state["state_dict"]
    assert torch.equal(weights["lm_head.weight"], weights["embed.weight"])  # state_dict keeps both names
    assert torch.all(weights["embed.weight"][~saved["masks"]["embed.weight"]] == 0)

    pl.seed_everything(1)  # everything comes from the checkpoint
    resumed, cb2 = TiedLM(), during()
    trainer(tmp_path, [cb2], max_epochs=4).fit(resumed, ckpt_path=path, weights_only=True)
    assert resumed.lm_head.weight is resumed.embed.weight
    assert cb2.step == 3 and cb2.masks.keys() == cb.masks.keys()
    assert all(torch.equal(cb.masks[k], cb2.masks[k]) for k in cb.masks)
    check_masks(cb2, resumed, 0.8)
    a, b = first.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # ends like the uninterrupted run
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_tied_masks_are_refused_by_an_untied_model(tmp_path):
    """(Resuming a whole run fails earlier, in the optimizer state: the untied model has one more tensor.)"""
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [during(), ckpt], max_epochs=3, enable_checkpointing=True).fit(TiedLM())
    state = torch.load(tmp_path / "ckpt" / "epoch=1-step=8.ckpt", weights_only=True)
    cb = during()
    cb.load_state_dict(state["callbacks"][cb.state_key])
    cb.set_masks(TiedLM(), cb.masks)  # tied as before: accepted
    with pytest.raises(
        PruningError, match=r"lm_head\.weight was tied to embed\.weight .* separate parameter"
    ):
        cb.set_masks(TiedLM(tied=False), cb.masks)


def test_a_weight_that_is_no_parameter_is_refused_before_training(tmp_path):
    module = SharedLayers()
    nn.utils.parametrizations.weight_norm(module.out)  # `out.weight` is now computed, not a parameter
    with pytest.raises(PruningError, match=r"the weights of \['out'\] are not parameters registered"):
        trainer(tmp_path, [SNIPCallback(limit=0.5)], max_steps=1).fit(module)
