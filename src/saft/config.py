"""Settings as data: one dataclass per configuration, each field carrying its own help.

A step's configuration is written once, as a dataclass whose fields are declared with
:func:`setting` (default, help, allowed values). Everything else is derived from it:

* the command line (:func:`add_arguments`, :func:`from_arguments`): one flag per field,
  its type, default and help;
* the command line of the same step under torchrun (:func:`to_argv`, the inverse);
* ``params.yaml`` sections and the settings JSON of a Kubeflow component
  (:func:`from_mapping`, :func:`to_mapping`): keys checked against the fields, values
  against their types, a typo answered with the closest known key;
* the checks (:func:`check`): allowed values and bounds from the field's metadata.

Nothing here imports saft or a third-party package: every layer may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, Field

_META = "saft"


class ConfigError(ValueError):
    """A setting has a value its field does not allow (the message names the field and the source)."""


def setting(default=MISSING, *, help: str, factory=MISSING, choices: typing.Sequence | None = None,
            minimum: float | None = None, maximum: float | None = None, flag: str | None = None,
            metavar: str | None = None, required: bool = False, cli: bool = True) -> Field:
    """A dataclass field with its help text and checks.

    ``choices``/``minimum``/``maximum`` are enforced by :func:`check` (call it from
    ``__post_init__``); ``flag`` overrides the derived ``--field-name``; ``required`` makes
    the flag mandatory on the command line (the field keeps a default for the library);
    ``cli=False`` keeps the field off the command line (it is set by the program).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "minimum": minimum,
            "maximum": maximum, "flag": flag, "metavar": metavar, "required": required, "cli": cli}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata={_META: meta})
    return dataclasses.field(default=default, metadata={_META: meta})


def meta(f: Field) -> dict:
    return f.metadata.get(_META, {"help": "", "choices": None, "minimum": None, "maximum": None, "flag": None,
                                  "metavar": None, "required": False, "cli": True})


def default_of(f: Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def defaults(cls) -> dict:
    """Every field's default (``MISSING`` where there is none)."""
    return {f.name: default_of(f) for f in dataclasses.fields(cls)}


def hints(cls) -> dict:
    return typing.get_type_hints(cls)


def flag_name(f: Field) -> str:
    return meta(f)["flag"] or "--" + f.name.replace("_", "-")


def did_you_mean(word: str, options: typing.Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean X?)`` for the closest option at least ``cutoff`` alike (difflib's ratio), or ``""``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""


# --------------------------------------------------------------------------- checks


def _describe(values: typing.Iterable) -> str:
    return ", ".join(str(v) for v in values)


def check(obj, where: str = "") -> None:
    """Allowed values and bounds of every field of ``obj``, from the fields' metadata."""
    prefix = f"{where}: " if where else ""
    for f in dataclasses.fields(obj):
        m, value = meta(f), getattr(obj, f.name)
        items = value if isinstance(value, (list, tuple)) and m["choices"] is not None else [value]
        for item in items:
            if m["choices"] is not None and item not in m["choices"]:
                raise ConfigError(f"{prefix}{f.name} must be one of {_describe(m['choices'])}, got {item!r}"
                                  + did_you_mean(item, m["choices"]))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if m["minimum"] is not None and value < m["minimum"]:
                raise ConfigError(f"{prefix}{f.name} must be >= {m['minimum']:g}, got {value!r}")
            if m["maximum"] is not None and value > m["maximum"]:
                raise ConfigError(f"{prefix}{f.name} must be <= {m['maximum']:g}, got {value!r}")


# --------------------------------------------------------------------------- mappings (params.yaml, settings JSON)


def _optional(tp):
    """``X`` for ``X | None`` (``None`` otherwise)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def type_name(tp) -> str:
    inner = _optional(tp)
    if inner is not None:
        return f"{type_name(inner)} or null"
    origin = typing.get_origin(tp)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp, key: str, source: str):
    """``value`` checked against the annotation ``tp`` (ints widened to floats; integral floats of int fields, as
    protobuf Structs and the KFP UI write every number, narrowed back to ints)."""
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else coerce(value, inner, key, source)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must hold {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        out = [coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {str(k): coerce(v, item, f"{key}.{k}", source) for k, v in value.items()}
    if tp is typing.Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
            except ValueError:
                pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is str and value is None:
        return ""
    if tp in (int, bool, str) and type(value) is tp:
        return value
    raise ConfigError(f"{source}: {key} must be {type_name(tp)}, got {value!r}")


def from_mapping(cls, data: dict, *, source: str, prefix: str = "", **fixed):
    """``cls`` from a mapping of its field names (unknown keys refused with the closest known one).

    ``fixed`` are set by the program (they may not appear in ``data``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'the settings'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise ConfigError(f"{source}: unknown key {dotted}{did_you_mean(key, known)} "
                              f"(known here: {', '.join(sorted(known))})")
        if key in fixed:
            raise ConfigError(f"{source}: {dotted} is set by the program here, not by the settings")
    types_ = hints(cls)
    kwargs = {k: coerce(v, types_[k], f"{prefix}.{k}" if prefix else k, source) for k, v in data.items()}
    try:
        return cls(**kwargs, **fixed)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def to_mapping(obj, *, skip: typing.Iterable[str] = ()) -> dict:
    """``obj``'s fields as plain JSON/YAML values (tuples as lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return to_mapping(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    skip = set(skip)
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}


# --------------------------------------------------------------------------- command line


def _cli_fields(cls, skip) -> list[Field]:
    """The fields with a flag: required ones first, then in declaration order, those of a base class marked
    ``FLAGS_LAST`` (a shared group such as the loader settings) at the end."""
    skip = set(skip)
    last = {name for base in cls.__mro__ if vars(base).get("FLAGS_LAST", False)
            for name in getattr(base, "__dataclass_fields__", {})}
    chosen = [f for f in dataclasses.fields(cls) if meta(f)["cli"] and f.name not in skip]
    return sorted(chosen, key=lambda f: (not meta(f)["required"], f.name in last))


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "none"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: typing.Iterable[str] = ()) -> None:
    """One flag per field of ``cls`` (but ``skip``), typed, with the field's default and help."""
    types_ = hints(cls)
    for f in _cli_fields(cls, skip):
        m, tp, default = meta(f), types_[f.name], default_of(f)
        inner = _optional(tp) or tp
        origin = typing.get_origin(inner)
        kwargs: dict = {"dest": f.name, "help": m["help"]}
        if m["required"]:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            kwargs["help"] += f" (default: {_show(default)})"
        if m["metavar"]:
            kwargs["metavar"] = m["metavar"]
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            args = [a for a in typing.get_args(inner) if a is not Ellipsis]
            kwargs["type"] = args[0] if args else str
            fixed = origin is tuple and typing.get_args(inner)[-1] is not Ellipsis
            kwargs["nargs"] = len(args) if fixed else ("*" if default == [] or default == () else "+")
            if m["choices"] is not None:
                kwargs["choices"] = m["choices"]
        elif origin is dict:
            raise TypeError(f"{cls.__name__}.{f.name}: a mapping has no flag; mark it setting(..., cli=False)")
        else:
            kwargs["type"] = inner
            if m["choices"] is not None:
                kwargs["choices"] = m["choices"]
        # argparse's help formatting reads % as a format character
        kwargs["help"] = kwargs["help"].replace("%", "%%")
        parser.add_argument(flag_name(f), **kwargs)


def from_arguments(cls, args: argparse.Namespace, **fixed):
    """``cls`` from a namespace :func:`add_arguments` filled (``fixed`` set by the program)."""
    values = {f.name: getattr(args, f.name) for f in _cli_fields(cls, fixed) if hasattr(args, f.name)}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    types_ = hints(cls)
    for name, value in values.items():
        if typing.get_origin(_optional(types_[name]) or types_[name]) is tuple and value is not None:
            values[name] = tuple(value)
    try:
        return cls(**values, **fixed)
    except ValueError as err:  # a check names the field: on the command line, name its flag
        text = str(err)
        for f in _cli_fields(cls, fixed):
            if text.startswith(f.name + " "):
                raise type(err)(flag_name(f) + text[len(f.name):]) from None
        raise


def to_argv(obj, *, skip: typing.Iterable[str] = ()) -> list[str]:
    """The flags that give back ``obj`` through :func:`add_arguments` + :func:`from_arguments` (the inverse)."""
    types_ = hints(type(obj))
    argv: list[str] = []
    for f in _cli_fields(type(obj), skip):
        value, tp = getattr(obj, f.name), types_[f.name]
        inner = _optional(tp) or tp
        flag = flag_name(f)
        if value is None:
            if default_of(f) is not None:
                raise ValueError(f"{type(obj).__name__}.{f.name} is None, which its flag {flag} cannot express")
            continue
        if inner is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif typing.get_origin(inner) in (list, tuple):
            if len(value) == 0:
                if default_of(f) not in ([], ()):
                    raise ValueError(f"{type(obj).__name__}.{f.name} is empty, which its flag {flag} cannot express")
                continue
            argv += [flag, *(_arg(v) for v in value)]
        else:
            argv += [flag, _arg(value)]
    return argv


def _arg(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def describe(cls, *, skip: typing.Iterable[str] = ()) -> list[tuple[str, str, object, str]]:
    """(name, type, default, help) of every field: for documentation and params.yaml comments."""
    types_ = hints(cls)
    skip = set(skip)
    return [(f.name, type_name(types_[f.name]), default_of(f), meta(f)["help"])
            for f in dataclasses.fields(cls) if f.name not in skip]


def field_of(cls, name: str, *, default=MISSING) -> Field:
    """A copy of ``cls``'s field ``name`` (its default, help and checks) for another dataclass: the same setting
    under another name or in another section. ``default`` replaces its default (see :func:`section`)."""
    f = cls.__dataclass_fields__[name]
    if default is not MISSING:
        return dataclasses.field(default=default, metadata=f.metadata)
    if f.default_factory is not MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def section(name: str, *classes, drop: typing.Iterable[str] = (),
            extra: typing.Sequence[tuple[str, object, Field]] = (), doc: str | None = None,
            defaults: dict | None = None) -> type:
    """A dataclass holding the fields of ``classes`` but ``drop``, plus ``extra`` ``(name, type, field)``.

    A ``params.yaml`` section is its step's configuration without what the pipeline sets
    per task (the model, the seed, the method...): deriving it keeps one default and one
    help text per setting. ``defaults`` names the few settings whose pipeline default
    differs from the command line's on purpose (kept beside the step's definition).
    """
    drop, defaults = set(drop), dict(defaults or {})
    unknown = (drop | set(defaults)) - {f.name for cls in classes for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"section {name}: no field(s) {', '.join(sorted(unknown))} to drop or redefault")
    spec = []
    for cls, f in ((cls, f) for cls in classes for f in dataclasses.fields(cls)):
        types_ = hints(cls)
        if f.name in drop:
            continue
        spec.append((f.name, types_[f.name], field_of(cls, f.name, default=defaults.get(f.name, MISSING))))
    out = dataclasses.make_dataclass(name, [*spec, *extra])
    out.__doc__ = doc or f"The {classes[0].__name__} settings a pipeline sets once for every task."
    out.__module__ = classes[0].__module__
    return out
