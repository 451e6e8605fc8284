"""Keeping Axolotl's student patches off a teacher of the same architecture.

Axolotl speeds the student up by patching transformers' modeling modules in place:
it rewrites class methods (the LoRA kernels' ``Attention.forward``, which calls
``self.apply_qkv``; fused attention; Liger's and CCE's ``ForCausalLM.forward``; tiled
MLPs; packing fixes) and rebinds module names (Liger's ``LlamaRMSNorm = LigerRMSNorm``).
A teacher of the same architecture shares those classes but not the per-instance state
some patches rely on: ``apply_qkv`` is bound on the student's attention modules only,
so the teacher's first forward fails.

The fix works from a record of the teacher's modeling modules as transformers wrote
them, taken in the plugin's ``register`` hook. That hook runs while Axolotl reads the
config, before ``ModelLoader.load`` applies any patch (the LoRA attention rewrite comes
even before the plugins' ``pre_model_load``). Then:

- while the teacher loads (``original_modeling``), the recorded module names and class
  attributes are put back, so it is built from the original classes;
- once loaded (``restore_original_attributes``), each teacher submodule whose class has
  been patched since gets the original attributes on the instance
  (``module.forward = MethodType(original, module)``). They shadow the class's for that
  instance alone; the student keeps its patches.

Identity against a record, rather than markers such as the ``_original_forward`` the
LoRA rewrite leaves (a source string, not a function), covers every patch of these
modules without knowing any of them.

Not covered: names a forward looks up in its module while it runs (Liger's
``apply_rotary_pos_emb``), which take tensors only and compute the same thing for any
instance; and patches outside the recorded modules (``torch.nn.functional``, the
attention dispatch, transformers' loading code: the ZeRO-3 path patches that one for
the teacher itself, see ``zero3.full_loading``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import nn

LOG = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class _ModuleRecord:
    module: types.ModuleType
    names: dict[str, object]  # the module's namespace
    classes: dict[type, dict[str, object]]  # each nn.Module class it defines: its own attributes


# by module name; the first record wins, since a later one may already hold patches
_RECORDS: dict[str, _ModuleRecord] = {}


def modeling_modules(model_classes: Iterable[type]) -> list[types.ModuleType]:
    """The ``transformers.models`` modules defining these classes or their bases."""
    found: dict[str, types.ModuleType] = {}
    for cls in model_classes:
        for base in cls.__mro__:
            name = base.__module__
            if name.startswith("transformers.models.") and name in sys.modules:
                found.setdefault(name, sys.modules[name])
    return list(found.values())


def record_modules(modules: Iterable[types.ModuleType]) -> list[str]:
    """Record each module's namespace and its classes' attributes, once per process.

    Returns the names of the modules recorded by this call.
    """
    recorded = []
    for module in modules:
        if module.__name__ in _RECORDS:
            continue
        classes = {
            value: dict(vars(value))
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, nn.Module)
            and value.__module__ == module.__name__
        }
        _RECORDS[module.__name__] = _ModuleRecord(module, dict(vars(module)), classes)
        recorded.append(module.__name__)
        _warn_if_already_patched(classes)
    return recorded


# where the patches come from (transformers' own methods may come from `kernels` too)
_PATCHERS = ("axolotl.", "liger_kernel.", "cut_cross_entropy.")


def _warn_if_already_patched(classes: dict[type, dict[str, object]]) -> None:
    foreign = sorted(
        f"{cls.__name__}.{name}"
        for cls, attrs in classes.items()
        for name, value in attrs.items()
        if isinstance(value, types.FunctionType) and (value.__module__ or "").startswith(_PATCHERS)
    )
    if foreign:
        LOG.warning(
            "recorded the teacher's modeling code after it was patched (%s): a teacher of "
            "the student's architecture may run the student's patches",
            ", ".join(foreign),
        )


@contextlib.contextmanager
def original_modeling() -> Iterator[None]:
    """The recorded modules and classes as recorded, for as long as a model is built."""
    undo: list[tuple[object, str, object]] = []
    try:
        for record in _RECORDS.values():
            targets = [(record.module, record.names), *record.classes.items()]
            for target, before in targets:
                now = vars(target)
                for name, value in before.items():
                    current = now.get(name, _MISSING)
                    if current is not value:
                        undo.append((target, name, current))
                        setattr(target, name, value)
        yield
    finally:
        for target, name, current in reversed(undo):
            if current is _MISSING:
                delattr(target, name)
            else:
                setattr(target, name, current)


def restore_original_attributes(model: nn.Module) -> dict[str, list[str]]:
    """Bind on each submodule the recorded attributes its class has lost since.

    Only modules whose own class was recorded are touched: a class swapped in later
    (Liger's RMSNorm) was not built from the recorded code. Returns, by class name,
    the attributes restored.
    """
    recorded = {cls: attrs for record in _RECORDS.values() for cls, attrs in record.classes.items()}
    changes: dict[type, dict[str, object]] = {}
    restored: dict[str, set[str]] = {}
    for module in model.modules():
        cls = type(module)
        if cls not in recorded:
            continue
        if cls not in changes:
            changes[cls] = _changed_attributes(cls, recorded)
        for name, original in changes[cls].items():
            if _set_on_instance(module, cls, name, original):
                restored.setdefault(cls.__name__, set()).add(name)
    return {cls: sorted(names) for cls, names in restored.items()}


def _lookup(cls: type, name: str, recorded: dict[type, dict[str, object]]) -> object:
    """``name`` resolved through ``cls``'s MRO, reading recorded classes from their record."""
    for base in cls.__mro__:
        attrs = recorded.get(base, vars(base))
        if name in attrs:
            return attrs[name]
    return _MISSING


def _changed_attributes(cls: type, recorded: dict[type, dict[str, object]]) -> dict[str, object]:
    names: set[str] = set()
    for base in cls.__mro__:
        if base in recorded:
            names |= recorded[base].keys() | vars(base).keys()
    changed = {}
    for name in sorted(names):
        original = _lookup(cls, name, recorded)
        if original is _MISSING or original is _lookup(cls, name, {}):
            continue  # unchanged, or added by a patch (nothing to restore)
        if name.startswith("__") and name.endswith("__"):
            # Python looks special methods up on the type, never on the instance
            if name != "__init__":  # construction already ran the recorded one
                LOG.warning("%s.%s is patched and cannot be undone for the teacher", cls.__name__, name)
            continue
        changed[name] = original
    return changed


def _set_on_instance(module: nn.Module, cls: type, name: str, original: object) -> bool:
    if isinstance(original, types.FunctionType):
        value = types.MethodType(original, module)
    elif isinstance(original, staticmethod):
        value = original.__func__
    elif isinstance(original, classmethod):
        value = types.MethodType(original.__func__, cls)
    elif hasattr(type(original), "__set__") or hasattr(type(original), "__delete__"):
        LOG.warning("%s.%s is a patched descriptor and cannot be undone for the teacher", cls.__name__, name)
        return False
    else:
        value = original
    own = vars(module)
    if name == "forward" and "_old_forward" in own:
        name = "_old_forward"  # accelerate's device hook owns `forward` and calls this
    elif name in own:
        return False  # set on this instance on purpose: not a class patch
    object.__setattr__(module, name, value)  # not nn.Module's: a plain attribute
    return True
