"""Build a base network from a JSON spec: a registry name or an ``nn.Module`` class by import path.

Two forms, both plain JSON::

    {"name": "psp_seg_s", "in_channels": 1, "out_channels": 3}           # prunekit3d.models registry
    {"import_path": "monai.networks.nets.DynUNet", "kwargs": {...}}        # any installed nn.Module class

A spec travels inside artifacts, which may come from anywhere, so an import path is checked BEFORE
anything is imported:

- it must lie in the import allow-list: :data:`DEFAULT_IMPORTS` (``prunekit3d``, ``monai.networks``,
  ``dynamic_network_architectures``), the prefixes passed as ``allow_imports=[...]`` and those in the
  environment variable :data:`ALLOW_IMPORTS_ENV` (``PRUNEKIT3D_ALLOW_IMPORTS=mypkg,other.nets``).
  A prefix matches whole dotted components: ``monai.networks`` allows ``monai.networks.nets.DynUNet``,
  never ``monai.apps...`` or ``monai.networksfoo``.
- its components are plain names (no ``_private`` or ``__dunder__`` attribute walks);
- it must name an ``nn.Module`` subclass, never a callable such as ``os.system``, and it may not leave
  the allowed package through a module another module imported (``monai.networks.nets.torch...``);
- its kwargs are plain JSON at every depth (strings, numbers, booleans, null, lists, string-keyed dicts).

Registry names (``{"name": ...}``) need no allow-list: the registry holds only what code already
imported registered. Factory functions (or networks that need non-JSON arguments such as
``conv_op=nn.Conv3d``) go through the registry (:func:`prunekit3d.models.register_model`), or pass the
built instance to ``load(path, model=...)``. A spec the user typed (``--model mypkg.Net``) is consent:
pass its own path, ``from_spec(spec, allow_imports=[spec["import_path"]])``.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import inspect
import math
import os
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from prunekit3d.models import create_model

__all__ = ["ALLOW_IMPORTS_ENV", "DEFAULT_IMPORTS", "allowed_imports", "check_import_path", "check_spec", "from_spec"]

#: Import prefixes a spec may build from without being told: this package, MONAI's and nnU-Net's networks.
DEFAULT_IMPORTS = ("prunekit3d", "monai.networks", "dynamic_network_architectures")
#: Environment variable with more allowed import prefixes, comma-separated.
ALLOW_IMPORTS_ENV = "PRUNEKIT3D_ALLOW_IMPORTS"

_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def check_spec(spec: Any) -> dict[str, Any]:
    """Return ``spec`` as a dict if it has one of the two forms and is JSON; raise a ValueError naming the problem."""
    form = 'pass {"name": registry_name, **kwargs} or {"import_path": "pkg.module.Class", "kwargs": {...}}'
    if not isinstance(spec, Mapping):
        raise ValueError(f"a model spec must be a dict, got {type(spec).__name__}; {form}")
    spec = dict(spec)
    if ("name" in spec) == ("import_path" in spec):
        raise ValueError(f"a model spec needs exactly one of 'name' and 'import_path', got keys {sorted(spec)}; {form}")
    key = "name" if "name" in spec else "import_path"
    if not isinstance(spec[key], str) or not spec[key]:
        raise ValueError(f"spec[{key!r}] must be a non-empty string, got {spec[key]!r}")
    if key == "import_path":
        unknown = sorted(set(spec) - {"import_path", "kwargs"})
        if unknown or not isinstance(spec.get("kwargs", {}), Mapping):
            raise ValueError(f"an import_path spec holds 'import_path' and a dict 'kwargs', got {sorted(spec)}; {form}")
    _check_plain_json(spec, "spec")
    return spec


def _check_plain_json(value: Any, where: str) -> None:
    """Raise a ValueError naming the first value (at any depth) that JSON would not give back as it is."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; a model spec must be plain JSON, which has no NaN or infinity")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"{where} has the key {key!r}; a model spec must be plain JSON, whose keys are strings"
                )
            _check_plain_json(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a model spec must be plain JSON "
        "(numbers, strings, booleans, null, lists, dicts); register a builder (prunekit3d.models.register_model) "
        "for networks that need other arguments"
    )


def allowed_imports(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The import allow-list: :data:`DEFAULT_IMPORTS`, then ``extra``, then :data:`ALLOW_IMPORTS_ENV`'s prefixes."""
    from_env = os.environ.get(ALLOW_IMPORTS_ENV, "").split(",")
    prefixes = [*DEFAULT_IMPORTS, *extra, *from_env]
    return tuple(dict.fromkeys(p.strip() for p in prefixes if p and p.strip()))


def _allows(prefixes: Iterable[str], path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def check_import_path(path: str, allow_imports: Iterable[str] = ()) -> None:
    """Refuse ``path`` unless it is a plain dotted name under an allowed prefix; imports nothing.

    Raises:
        ValueError: in one line, naming the problem and, for a path outside the allow-list, how to allow it.
    """
    parts = path.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"import_path {path!r} must be 'package.module.Class' (dotted Python names)")
    private = [p for p in parts if p.startswith("_")]
    if private:
        raise ValueError(f"import_path {path!r} walks through {private[0]!r}; a spec may only name public classes")
    if importlib.util.find_spec(parts[0]) is None:  # looks on disk only: nothing runs
        raise ValueError(f"import_path {path!r}: module {parts[0]!r} is not importable (is the package installed?)")
    allowed = allowed_imports(allow_imports)
    if not _allows(allowed, path):
        raise ValueError(
            f"import_path {path!r} is outside the import allow-list ({', '.join(allowed)}), so it was not imported: "
            f"if you trust it, pass allow_imports=[{parts[0]!r}] (to load or from_spec) or set "
            f"{ALLOW_IMPORTS_ENV}={parts[0]}"
        )


def _resolve(path: str) -> Any:
    """The object ``path`` names: the longest importable module prefix, then attributes (path checked first)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                continue  # this prefix is no module: the rest are attributes of a shorter one
            raise ValueError(f"import_path {path!r}: importing {module_name!r} failed: {err} (install it)") from err
        except ImportError as err:
            raise ValueError(f"import_path {path!r}: importing {module_name!r} failed: {err}") from err
    else:
        raise ValueError(f"import_path {path!r}: module {parts[0]!r} is not importable (is the package installed?)")
    for depth, attr in enumerate(parts[i:], start=i):
        if not hasattr(obj, attr):
            owner = ".".join(parts[:depth])
            close = difflib.get_close_matches(attr, [n for n in dir(obj) if not n.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"import_path {path!r}: {owner!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, attr)
        here = ".".join(parts[: depth + 1])
        if isinstance(obj, types.ModuleType) and obj.__name__ != here:
            raise ValueError(
                f"import_path {path!r}: {here!r} is the module {obj.__name__!r} imported there, outside the path's "
                "package; name the class by the module that defines or exports it"
            )
    return obj


def _check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> None:
    """Name the keyword arguments ``fn`` does not take and the required ones ``kwargs`` lacks."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # no introspectable signature: the call itself will complain
    named = [n for n, p in params.items() if p.kind in _KEYWORD]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(named))
        if unknown:
            raise ValueError(f"{what} does not take {unknown}; its arguments are {named}")
    missing = [n for n in named if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ValueError(f"{what} needs {missing}, which the spec does not give; add them to the spec")


def from_spec(spec: Mapping[str, Any], *, allow_imports: Iterable[str] = ()) -> nn.Module:
    """Build the network a JSON spec describes (see the module docstring for the two forms and the checks).

    The model gets ``model.spec`` (a copy of ``spec``) unless its builder set one, so
    :func:`prunekit3d.io.save` records it without ``spec=``.

    Args:
        spec: ``{"name": ..., **kwargs}`` or ``{"import_path": ..., "kwargs": {...}}``.
        allow_imports: import prefixes to allow beyond :data:`DEFAULT_IMPORTS` and :data:`ALLOW_IMPORTS_ENV`,
            e.g. ``["mypkg"]``, or ``[spec["import_path"]]`` for a spec the user gave.

    Raises:
        ValueError: the spec has neither form or is not plain JSON, the import path is outside the
            allow-list (nothing is imported then), the module is not importable, the attribute is missing
            or not an ``nn.Module`` class, the registry has no such name, or the keyword arguments do not
            fit the constructor (named in the message).

    Example::

        >>> net = from_spec({"import_path": "monai.networks.nets.DynUNet", "kwargs": dict(
        ...     spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3],
        ...     strides=[1, 2, 2], upsample_kernel_size=[2, 2])})
        >>> type(net).__name__, net.spec["import_path"]
        ('DynUNet', 'monai.networks.nets.DynUNet')
    """
    spec = check_spec(spec)
    if "name" in spec:
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        try:
            model = create_model(spec["name"], **kwargs)
        except TypeError as err:  # the registry hides its builders: report what the call said
            raise ValueError(f"spec arguments {sorted(kwargs)} do not fit model {spec['name']!r}: {err}") from err
    else:
        path, kwargs = spec["import_path"], dict(spec.get("kwargs", {}))
        check_import_path(path, allow_imports)
        cls = _resolve(path)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(
                f"import_path {path!r} names a {type(cls).__name__}, not an nn.Module class; a spec may only name "
                "a network class (register factory functions with prunekit3d.models.register_model and use 'name')"
            )
        _check_kwargs(cls, kwargs, f"{cls.__name__} ({path})")
        model = cls(**kwargs)
    if getattr(model, "spec", None) is None:
        model.spec = copy.deepcopy(spec)
    return model
