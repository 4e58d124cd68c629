"""Griffe extension for the API page: Sphinx roles become links, Lightning's hooks leave the page.

Loaded by mkdocstrings (``mkdocs.yml``: ``extensions: [docs/griffe_lightning_prune.py]``). Docstrings keep
the Sphinx roles that read well in ``help()`` (``:func:`~lightning_prune.shrink```); on the site each
becomes a cross-reference, linked when the target is on the API page and plain code otherwise (an
optional autoref: no warning for ``torch.load`` or Lightning's classes, which have no page here).

Methods that implement Lightning's hooks (``on_train_start``, ``setup``, ``state_dict``, ``training_step``
...) are how the classes plug into Lightning, not API to call: they are removed from the page; what they
do is in each class's docstring.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|attr|mod|data|exc|obj|const):"
    r"`(?P<tilde>~?)(?:(?P<title>[^`<]*?)\s*<(?P<target>[^`>]+)>|(?P<bare>[^`]+))`"
)

# Lightning's Callback, LightningModule and LightningDataModule hooks (and the methods Lightning calls),
# as named in Lightning's documentation.
LIGHTNING_HOOKS = frozenset(
    {
        "setup",
        "teardown",
        "state_dict",
        "load_state_dict",
        "state_key",
        "forward",
        "training_step",
        "validation_step",
        "test_step",
        "predict_step",
        "configure_optimizers",
        "configure_callbacks",
        "configure_model",
        "configure_gradient_clipping",
        "optimizer_step",
        "optimizer_zero_grad",
        "lr_scheduler_step",
        "backward",
        "prepare_data",
        "train_dataloader",
        "val_dataloader",
        "test_dataloader",
        "predict_dataloader",
        "transfer_batch_to_device",
    }
)
LIGHTNING_HOOK_PREFIXES = ("on_train_", "on_validation_", "on_test_", "on_predict_", "on_sanity_check_")
LIGHTNING_ON_HOOKS = frozenset(
    {
        "on_fit_start",
        "on_fit_end",
        "on_exception",
        "on_save_checkpoint",
        "on_load_checkpoint",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "on_before_batch_transfer",
        "on_after_batch_transfer",
    }
)
LIGHTNING_BASES = ("Callback", "LightningModule", "LightningDataModule")


def is_lightning_hook(name: str) -> bool:
    """Whether ``name`` is one of Lightning's hooks."""
    return name in LIGHTNING_HOOKS or name in LIGHTNING_ON_HOOKS or name.startswith(LIGHTNING_HOOK_PREFIXES)


def replace_roles(text: str, resolve: Callable[[str], str] = str) -> str:
    """Replace every Sphinx role in ``text`` by an optional autoref around inline code.

    ``resolve`` turns a role's target (``"IterativeSNIPCallback"``, ``"setup"``) into the identifier to
    link to; unresolved targets render as code.
    """

    def link(match: re.Match) -> str:
        target = (match["target"] or match["bare"]).strip()
        if match["title"]:
            title = match["title"]
        else:
            title = target.rsplit(".", 1)[-1] if match["tilde"] else target
            if match["role"] in ("func", "meth") and not title.endswith(")"):
                title += "()"
        target = resolve(target.removesuffix("()"))
        return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'

    return ROLE.sub(link, text)


def _extends_lightning(cls: griffe.Class) -> bool:
    """Whether ``cls`` derives from a Lightning base class (through the package's own classes)."""
    if any(str(base).rsplit(".", 1)[-1] in LIGHTNING_BASES for base in cls.bases):
        return True
    try:
        parents = cls.resolved_bases
    except Exception:  # a base griffe cannot resolve: not one of ours
        return False
    return any(_extends_lightning(parent) for parent in parents)


def _resolve(obj: griffe.Object, target: str) -> str:
    """``target`` as a full path: a member of ``obj``'s class or module, or of the package, if it is one."""
    head, dot, rest = target.partition(".")
    scopes = [obj if isinstance(obj, griffe.Class) else obj.parent, obj.module, obj.package]
    for scope in scopes:
        if scope is not None and head in scope.members and head != scope.package.name:
            member = scope.members[head]
            return (member.target_path if member.is_alias else member.path) + dot + rest
    return target


class LightningPruneDocs(griffe.Extension):
    """Renders the roles of every docstring and drops Lightning's hooks from the classes."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Visit every object of the loaded package once."""
        self._visit(pkg, set())

    def _visit(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = replace_roles(obj.docstring.value, lambda target: _resolve(obj, target))
        if isinstance(obj, griffe.Class) and _extends_lightning(obj):
            for name in [n for n in obj.members if is_lightning_hook(n)]:
                del obj.members[name]
        for member in list(obj.members.values()):
            if not member.is_alias:
                self._visit(member, seen)
