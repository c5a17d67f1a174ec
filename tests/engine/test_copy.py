"""reconviz's working copy: ``tree_copy`` is ``copy.deepcopy`` for a module tree, faster."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import reconviz as rv
from reconviz.probe import eval_copy, tree_copy


class Tied(nn.Module):
    """A module tree with what deepcopy must get right: tied weights, a submodule used twice,
    plain Python state in lists, dicts and sets, a plain tensor attribute, a module with a
    __setstate__ of its own (Conv2d) and one with a __deepcopy__ of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 8)
        self.again = self.fc  # the same submodule under two names
        self.head = nn.Linear(8, 8)
        self.head.weight = self.fc.weight  # tied weights
        self.log: list = [1, "a", (2, 3)]
        self.table: dict = {"scale": 2.0, "nested": [4, 5]}
        self.tags = {"x", "y"}
        self.offset = torch.tensor([1.5])
        self.custom = Custom()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __deepcopy__(self, memo):
        new = Custom()
        new.copies = self.copies + 1
        return new


def _structure(m: nn.Module) -> list:
    return [(name, type(sub).__name__, sorted(k for k in vars(sub) if not k.startswith("_")))
            for name, sub in m.named_modules(remove_duplicate=False)]


def test_tree_copy_copies_as_deepcopy_does():
    model = Tied()
    ours, theirs = tree_copy(model, {}), copy.deepcopy(model)
    assert _structure(ours) == _structure(theirs)
    assert ours.again is ours.fc and ours.head.weight is ours.fc.weight  # sharing kept
    assert ours.fc is not model.fc and ours.fc.weight is not model.fc.weight
    assert ours.log == model.log and ours.log is not model.log
    assert ours.table == model.table and ours.table["nested"] is not model.table["nested"]
    assert ours.tags == model.tags and ours.tags is not model.tags
    assert torch.equal(ours.offset, model.offset) and ours.offset is not model.offset
    assert ours.custom.copies == 1  # its own __deepcopy__ ran
    assert ours.conv.padding_mode == "zeros"
    x = torch.randn(2, 8)
    assert torch.equal(ours.head(x), model.head(x))
    ours.log.append(9)
    ours.table["nested"].append(6)
    assert model.log == [1, "a", (2, 3)] and model.table["nested"] == [4, 5]


def test_eval_copy_shares_nothing_with_the_model_and_keeps_its_ties():
    model = Tied().train()
    with pytest.warns(rv.TrainingModeWarning):
        work = eval_copy(model, torch.float64, torch.device("cpu"))
    assert work.head.weight is work.fc.weight and work.fc.weight.dtype == torch.float64
    assert not any(m.training for m in work.modules()) and model.training
    ids = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not ids & {id(t) for t in [*work.parameters(), *work.buffers()]}
    assert model.fc.weight.dtype == torch.float32


class ListModule(nn.Module, list):
    """A module that is also a list: deepcopy copies its items too."""


def test_tree_copy_leaves_what_it_does_not_rebuild_itself_to_deepcopy():
    """An OrderedDict with attributes of its own, a module that is also a list, and a class that
    gains a __deepcopy__ after a first copy are copied exactly as deepcopy copies them."""
    model = nn.Linear(2, 2)
    model.table = OrderedDict(a=1)
    model.table.extra = [1]
    model.items = ListModule()
    model.items.extend([1, 2])
    ours = tree_copy(model, {})
    assert ours.table == {"a": 1} and ours.table.extra == [1] and ours.table.extra is not model.table.extra
    assert list(ours.items) == [1, 2]

    class Late(nn.Module):
        pass

    tree_copy(Late(), {})
    Late.__deepcopy__ = lambda self, memo: "custom"
    assert tree_copy(Late(), {}) == copy.deepcopy(Late()) == "custom"
