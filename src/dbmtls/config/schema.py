"""Frozen, validated models for the configuration: the small part of pydantic dbmtls used.

Why not pydantic itself: a sidecar keeps its configuration objects for its whole life, so the
validation library stays loaded in every pod; pydantic with its schema machinery held about
11 MiB of RSS in a process whose whole budget is 35 (docs/memory.md).  What dbmtls needs is
small and is all here, with the same API names so that the models read like pydantic models:

* fields from class annotations: ``str``, ``bool``, ``int``, ``float``, ``Literal[...]``,
  ``X | None``, ``tuple[X, ...]``, ``dict[str, X]``, nested models, and ``Annotated[X, ...]``
  carrying ``Field`` constraints (``ge``, ``le``, ``gt``, ``pattern``, ``min_length``) and
  ``BeforeValidator`` / ``AfterValidator`` functions;
* unknown keys are errors (``extra_forbidden``); a field without a default is required
  (``missing``); instances are frozen and compare by value;
* ``@field_validator`` (before or after the type check) and ``@model_validator(mode="after")``;
* ``model_validate``, ``model_dump`` (``mode="json"``, ``exclude_unset``), ``model_copy``,
  ``model_fields``, ``model_fields_set``;
* every error of a model is collected into one ``ValidationError`` whose ``errors()`` are dicts
  with ``type``, ``loc`` (the YAML path, as a tuple), ``msg`` and ``ctx`` (``{"error": exc}``
  for a validator's ValueError, so ``config/load.py`` can read a ``FieldError``'s field).  The
  messages are pydantic's ("Field required", "Input should be ..."), so they read the same as
  before the switch.

The input is what YAML and JSON give (str, int, float, bool, None, lists, dicts), so the type
checks are strict where pydantic's lax mode would convert: a quoted number is not an int.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, dataclass_transform

_M = TypeVar("_M", bound="Model")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
_SET = "__fields_set__"  # where an instance keeps model_fields_set, next to its fields


class ValidationError(ValueError):
    """Every error found validating one model, pydantic's shape (``errors()``)."""

    def __init__(self, title: str, errors: list[dict[str, Any]]) -> None:
        self.title = title
        self._errors = errors
        super().__init__(self._text())

    def errors(self) -> list[dict[str, Any]]:
        return list(self._errors)

    def error_count(self) -> int:
        return len(self._errors)

    def _text(self) -> str:
        n = len(self._errors)
        lines = [f"{n} validation error{'s' if n != 1 else ''} for {self.title}"]
        for e in self._errors:
            lines.append(".".join(str(p) for p in e["loc"]) or "(root)")
            lines.append(f"  {e['msg']} [type={e['type']}]")
        return "\n".join(lines)


class _Invalid(Exception):
    """Errors below one value, raised up to the model that collects them."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors


def _error(kind: str, loc: tuple[Any, ...], msg: str, value: Any, ctx: dict[str, Any] | None = None) -> _Invalid:
    e: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx is not None:
        e["ctx"] = ctx
    return _Invalid([e])


def _value_error(loc: tuple[Any, ...], exc: ValueError, value: Any) -> _Invalid:
    return _error("value_error", loc, f"Value error, {exc}", value, {"error": exc})


@dataclass(frozen=True)
class BeforeValidator:
    """Runs on the raw value, before the type check (pydantic's name)."""

    func: Callable[[Any], Any]


@dataclass(frozen=True)
class AfterValidator:
    """Runs on the checked value; returns the value to keep (pydantic's name)."""

    func: Callable[[Any], Any]


@dataclass(frozen=True)
class FieldInfo:
    """A field's default and constraints (``Field(...)``); ``annotation`` is its type, without
    ``Annotated``'s extras, as pydantic's ``model_fields`` gives it."""

    default: Any = MISSING
    default_factory: Callable[[], Any] | None = None
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    pattern: str | None = None
    min_length: int | None = None
    annotation: Any = None

    def is_required(self) -> bool:
        return self.default is MISSING and self.default_factory is None

    def get_default(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default


def Field(  # noqa: N802 -- pydantic's name, read as a field specifier by type checkers
    default: Any = MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    pattern: str | None = None,
    min_length: int | None = None,
) -> Any:
    return FieldInfo(default, default_factory, ge, le, gt, pattern, min_length)


PositiveInt = typing.Annotated[int, Field(gt=0)]


@dataclass(frozen=True)
class _FieldValidator:
    fields: tuple[str, ...]
    mode: Literal["before", "after"]
    func: Callable[..., Any]


@dataclass(frozen=True)
class _ModelValidator:
    func: Callable[..., Any]


def field_validator(*fields: str, mode: Literal["before", "after"] = "after") -> Callable[[Any], Any]:
    """``@field_validator("a", "b")`` over a ``@classmethod`` taking the value, returning the value
    to keep; a ValueError becomes the field's error."""

    def mark(method: Any) -> Any:
        return _FieldValidator(fields, mode, getattr(method, "__func__", method))

    return mark


def model_validator(*, mode: Literal["after"]) -> Callable[[Any], Any]:
    """``@model_validator(mode="after")`` over a method of the built instance, returning it; a
    ValueError becomes the model's error (at its own location)."""

    def mark(method: Any) -> Any:
        return _ModelValidator(method)

    return mark


@dataclass(frozen=True)
class _Field:
    name: str
    info: FieldInfo
    check: Callable[[Any, tuple[Any, ...]], Any]  # (raw value, loc) -> value, or raises _Invalid


def _describe(choices: tuple[Any, ...]) -> str:
    parts = [repr(c) for c in choices]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" or {parts[-1]}"


_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


def _checker(tp: Any, extras: tuple[Any, ...] = ()) -> Callable[[Any, tuple[Any, ...]], Any]:
    """A function validating a raw value against ``tp`` (with Annotated's extras)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *more = typing.get_args(tp)
        return _checker(base, (*extras, *more))
    before = [x.func for x in extras if isinstance(x, BeforeValidator)]
    after = [x.func for x in extras if isinstance(x, AfterValidator)]
    limits = [x for x in extras if isinstance(x, FieldInfo)]
    core = _core_checker(tp)

    if not (before or after or limits):
        return core

    def check(value: Any, loc: tuple[Any, ...]) -> Any:
        for func in before:
            try:
                value = func(value)
            except ValueError as exc:
                raise _value_error(loc, exc, value) from None
        value = core(value, loc)
        for info in limits:
            _limits(info, value, loc)
        for func in after:
            try:
                value = func(value)
            except ValueError as exc:
                raise _value_error(loc, exc, value) from None
        return value

    return check


def _limits(info: FieldInfo, value: Any, loc: tuple[Any, ...]) -> None:
    if info.ge is not None and value < info.ge:
        raise _error("greater_than_equal", loc, f"Input should be greater than or equal to {info.ge}", value)
    if info.gt is not None and value <= info.gt:
        raise _error("greater_than", loc, f"Input should be greater than {info.gt}", value)
    if info.le is not None and value > info.le:
        raise _error("less_than_equal", loc, f"Input should be less than or equal to {info.le}", value)
    if info.min_length is not None and len(value) < info.min_length:
        n = info.min_length
        raise _error("string_too_short", loc, f"String should have at least {n} character{'s' * (n != 1)}", value)
    if info.pattern is not None and not re.search(info.pattern, value):
        raise _error("string_pattern_mismatch", loc, f"String should match pattern '{info.pattern}'", value)


def _core_checker(tp: Any) -> Callable[[Any, tuple[Any, ...]], Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, Model):
        model = tp

        def check_model(value: Any, loc: tuple[Any, ...]) -> Any:
            if isinstance(value, model):
                return value
            if not isinstance(value, Mapping):
                raise _error(
                    "model_type", loc, "Input should be a valid dictionary or instance of " + model.__name__, value
                )
            return model._build(value, loc)

        return check_model
    if origin is Literal:

        def check_literal(value: Any, loc: tuple[Any, ...]) -> Any:
            if any(value == c and type(value) is type(c) for c in args):
                return value
            raise _error("literal_error", loc, f"Input should be {_describe(args)}", value)

        return check_literal
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        inner = _checker(members[0]) if len(members) == 1 else None
        if inner is None or len(members) + 1 != len(args):
            raise TypeError(f"unsupported union {tp!r}: only X | None")

        def check_optional(value: Any, loc: tuple[Any, ...]) -> Any:
            return None if value is None else inner(value, loc)

        return check_optional
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported tuple {tp!r}: only tuple[X, ...]")
        item = _checker(args[0])

        def check_tuple(value: Any, loc: tuple[Any, ...]) -> Any:
            if not isinstance(value, list | tuple):
                raise _error("tuple_type", loc, "Input should be a valid tuple", value)
            out, errors = [], []
            for i, v in enumerate(value):
                try:
                    out.append(item(v, (*loc, i)))
                except _Invalid as exc:
                    errors += exc.errors
            if errors:
                raise _Invalid(errors)
            return tuple(out)

        return check_tuple
    if origin is dict:
        if args[0] is not str:
            raise TypeError(f"unsupported dict {tp!r}: only dict[str, X]")
        item = _checker(args[1])

        def check_dict(value: Any, loc: tuple[Any, ...]) -> Any:
            if not isinstance(value, Mapping):
                raise _error("dict_type", loc, "Input should be a valid dictionary", value)
            out, errors = {}, []
            for k, v in value.items():
                if not isinstance(k, str):
                    errors.append(
                        _error("string_type", (*loc, k, "[key]"), "Input should be a valid string", k).errors[0]
                    )
                    continue
                try:
                    out[k] = item(v, (*loc, k))
                except _Invalid as exc:
                    errors += exc.errors
            if errors:
                raise _Invalid(errors)
            return out

        return check_dict
    if tp is str:

        def check_str(value: Any, loc: tuple[Any, ...]) -> Any:
            if not isinstance(value, str):
                raise _error("string_type", loc, "Input should be a valid string", value)
            return value

        return check_str
    if tp is bool:

        def check_bool(value: Any, loc: tuple[Any, ...]) -> Any:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise _error("bool_parsing", loc, "Input should be a valid boolean", value)

        return check_bool
    if tp is int:

        def check_int(value: Any, loc: tuple[Any, ...]) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _error("int_type", loc, "Input should be a valid integer", value)

        return check_int
    if tp is float:

        def check_float(value: Any, loc: tuple[Any, ...]) -> Any:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise _error("float_type", loc, "Input should be a valid number", value)

        return check_float
    raise TypeError(f"unsupported field type {tp!r}")


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(Field,))
class Model:
    """The base of the config models: build with keywords or ``model_validate(dict)``."""

    model_fields: ClassVar[dict[str, FieldInfo]]
    _fields: ClassVar[dict[str, _Field]]
    _field_validators: ClassVar[dict[str, list[_FieldValidator]]]
    _model_validators: ClassVar[list[Callable[..., Any]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hints = typing.get_type_hints(cls, include_extras=True)
        cls._fields, cls.model_fields = {}, {}
        cls._field_validators, cls._model_validators = {}, []
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                if isinstance(value, _FieldValidator):
                    for name in value.fields:
                        cls._field_validators.setdefault(name, []).append(value)
                elif isinstance(value, _ModelValidator):
                    cls._model_validators.append(value.func)
        for name, tp in hints.items():
            if typing.get_origin(tp) is ClassVar or name.startswith("_"):
                continue
            default = cls.__dict__.get(name, MISSING)
            info = default if isinstance(default, FieldInfo) else FieldInfo(default=default)
            core = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
            info = FieldInfo(**{**info.__dict__, "annotation": core})
            check = _checker(tp, (info,) if _constrained(info) else ())
            cls._fields[name] = _Field(name, info, check)
            cls.model_fields[name] = info
            if name in cls.__dict__:
                delattr(cls, name)  # the instance's value, never the class default, is what is read
        unknown = set(cls._field_validators) - set(cls._fields)
        if unknown:
            raise TypeError(f"{cls.__name__}: validators for unknown fields {sorted(unknown)}")

    def __init__(self, **data: Any) -> None:
        built = type(self)._build(data, ())
        object.__setattr__(self, "__dict__", built.__dict__)

    @classmethod
    def model_validate(cls: type[_M], data: Any) -> _M:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise ValidationError(
                cls.__name__,
                _error(
                    "model_type", (), f"Input should be a valid dictionary or instance of {cls.__name__}", data
                ).errors,
            )
        return cls._build(data, ())

    @classmethod
    def _build(cls: type[_M], data: Mapping[str, Any], loc: tuple[Any, ...]) -> _M:
        errors: list[dict[str, Any]] = []
        values: dict[str, Any] = {}
        for key in data:
            if key not in cls._fields:
                errors += _error("extra_forbidden", (*loc, key), "Extra inputs are not permitted", data[key]).errors
        for name, f in cls._fields.items():
            where = (*loc, name)
            if name not in data:
                if f.info.is_required():
                    errors += _error("missing", where, "Field required", dict(data)).errors
                else:
                    values[name] = f.info.get_default()
                continue
            try:
                values[name] = cls._field(f, data[name], where)
            except _Invalid as exc:
                errors += exc.errors
        if errors:
            raise _Invalid(errors) if loc else ValidationError(cls.__name__, errors)
        self = object.__new__(cls)
        object.__setattr__(self, "__dict__", {**values, _SET: frozenset(k for k in data if k in cls._fields)})
        for func in cls._model_validators:
            try:
                self = func(self)
            except ValueError as exc:
                err = _value_error(loc, exc, dict(data))
                raise err if loc else ValidationError(cls.__name__, err.errors) from None
        return self

    @classmethod
    def _field(cls, f: _Field, value: Any, loc: tuple[Any, ...]) -> Any:
        validators = cls._field_validators.get(f.name, ())
        for v in validators:
            if v.mode == "before":
                value = _call(v, cls, value, loc)
        value = f.check(value, loc)
        for v in validators:
            if v.mode == "after":
                value = _call(v, cls, value, loc)
        return value

    @property
    def model_fields_set(self) -> frozenset[str]:
        """The fields the input gave (the others hold their defaults)."""
        given: frozenset[str] = self.__dict__[_SET]
        return given

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name} cannot be set")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name} cannot be deleted")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    def __hash__(self) -> int:
        return hash((type(self), *(_hashable(getattr(self, n)) for n in self._fields)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for n in self._fields:
            yield n, getattr(self, n)

    def model_dump(
        self, *, mode: Literal["python", "json"] = "python", exclude_unset: bool = False, by_alias: bool = False
    ) -> dict[str, Any]:
        """The fields as plain data (``mode="json"``: lists for tuples); ``exclude_unset``: only
        the fields the input gave, at every level.  ``by_alias`` is accepted for pydantic's
        callers: no field has an alias."""
        del by_alias
        return {
            n: _dump(getattr(self, n), mode, exclude_unset)
            for n in self._fields
            if not exclude_unset or n in self.model_fields_set
        }

    def model_copy(self: _M, *, update: Mapping[str, Any] | None = None) -> _M:
        """A copy with ``update``'s fields replaced, not validated again (as pydantic does)."""
        new = object.__new__(type(self))
        fields = {**self.__dict__, **(update or {})}
        fields[_SET] = self.model_fields_set | frozenset(update or {})
        object.__setattr__(new, "__dict__", fields)
        return new


def _constrained(info: FieldInfo) -> bool:
    return any(x is not None for x in (info.ge, info.le, info.gt, info.pattern, info.min_length))


def _call(v: _FieldValidator, cls: type, value: Any, loc: tuple[Any, ...]) -> Any:
    try:
        return v.func(cls, value)
    except ValueError as exc:
        raise _value_error(loc, exc, value) from None


def _dump(value: Any, mode: str, exclude_unset: bool) -> Any:
    if isinstance(value, Model):
        return value.model_dump(mode=mode, exclude_unset=exclude_unset)  # type: ignore[arg-type]
    if isinstance(value, tuple | list):
        items = [_dump(v, mode, exclude_unset) for v in value]
        return items if mode == "json" else tuple(items)
    if isinstance(value, dict):
        return {k: _dump(v, mode, exclude_unset) for k, v in value.items()}
    return value


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
