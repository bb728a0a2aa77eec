"""Build a base network from a JSON spec: a registry name or an ``nn.Module`` class by import path.

Two forms, both plain JSON::

    {"name": "psp_seg_s", "in_channels": 1, "out_channels": 3}           # prunekit3d.models registry
    {"import_path": "monai.networks.nets.DynUNet", "kwargs": {...}}        # any installed nn.Module class

An import path must name an ``nn.Module`` subclass, never an arbitrary callable: a spec travels inside
artifacts, and ``{"import_path": "os.system", ...}`` must not run. Factory functions (or networks that
need non-JSON arguments such as ``conv_op=nn.Conv3d``) go through the registry
(:func:`prunekit3d.models.register_model`), or pass the built instance to ``load(path, model=...)``.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from prunekit3d.models import create_model

__all__ = ["check_spec", "from_spec"]

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
    try:
        json.dumps(spec, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"a model spec must be plain JSON (numbers, strings, lists, dicts): {err}") from None
    return spec


def _resolve(path: str) -> Any:
    """The object ``path`` names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    if len(parts) < 2:
        raise ValueError(f"import_path {path!r} must be 'package.module.Class'")
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


def from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Build the network a JSON spec describes (see the module docstring for the two forms).

    The model gets ``model.spec`` (a copy of ``spec``) unless its builder set one, so
    :func:`prunekit3d.io.save` records it without ``spec=``.

    Raises:
        ValueError: the spec has neither form or is not JSON, the module is not importable, the
            attribute is missing or not an ``nn.Module`` class, the registry has no such name, or
            the keyword arguments do not fit the constructor (named in the message).

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
