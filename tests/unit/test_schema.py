"""config/schema.py: the validation the config models run on, without pydantic.

The config tests (test_config.py and others) pin what users see through the loader; these pin
the layer itself: each type, each error's type, location and message (pydantic's words), the
validators' order and what ``model_dump``, ``model_copy`` and frozen instances do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest

from dbmtls.config.schema import (
    AfterValidator,
    BeforeValidator,
    Field,
    Model,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)


class Inner(Model):
    host: str
    port: int = Field(default=1, ge=1, le=65535)


def _double(v: int) -> int:
    if v > 100:
        raise ValueError("too big to double")
    return v * 2


class Outer(Model):
    name: str = Field(pattern=r"^[a-z]+$")
    mode: Literal["A", "B"] = "A"
    flag: bool = False
    limit: PositiveInt | None = None
    ratio: float = 1.0
    tags: tuple[str, ...] = ()
    inner: Inner = Inner(host="default")
    by_user: dict[str, Inner] = Field(default_factory=dict)
    doubled: tuple[Annotated[int, AfterValidator(_double)], ...] = ()
    size: Annotated[int, BeforeValidator(lambda v: int(v[:-1]) * 1024 if isinstance(v, str) else v)] = 0
    text: str = Field(default="x", min_length=1)

    @field_validator("name", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("tags")
    @classmethod
    def _sorted(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _check(self) -> Outer:
        if self.mode == "B" and not self.flag:
            raise ValueError("mode B needs flag")
        return self


def errors(data: dict[str, Any]) -> list[tuple[str, tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    return [(e["type"], e["loc"], e["msg"]) for e in info.value.errors()]


def test_values_defaults_and_validators() -> None:
    o = Outer.model_validate(
        {"name": "ABC", "tags": ["b", "a"], "size": "2k", "doubled": [1, 2], "by_user": {"u": {"host": "h"}}}
    )
    assert (o.name, o.tags, o.size, o.doubled) == ("abc", ("a", "b"), 2048, (2, 4))
    assert o.by_user == {"u": Inner(host="h", port=1)}
    assert o.inner == Inner(host="default") and o.mode == "A" and o.limit is None
    assert Outer(name="k", limit=3, ratio=2).ratio == 2.0  # an int is a float
    assert Outer.model_fields["mode"].default == "A"
    assert Outer.model_fields["tags"].annotation == tuple[str, ...]


def test_every_error_is_collected_with_its_location() -> None:
    got = errors(
        {
            "name": "has space",
            "mode": "C",
            "flag": "maybe",
            "limit": 0,
            "ratio": "fast",
            "tags": "not-a-list",
            "inner": {"port": 70000, "hots": "x"},
            "by_user": {"u": 5},
            "doubled": [1, 200],
            "text": "",
            "extra": 1,
        }
    )
    assert sorted(got) == sorted(
        [
            ("string_pattern_mismatch", ("name",), "String should match pattern '^[a-z]+$'"),
            ("literal_error", ("mode",), "Input should be 'A' or 'B'"),
            ("bool_parsing", ("flag",), "Input should be a valid boolean"),
            ("greater_than", ("limit",), "Input should be greater than 0"),
            ("float_type", ("ratio",), "Input should be a valid number"),
            ("tuple_type", ("tags",), "Input should be a valid tuple"),
            ("less_than_equal", ("inner", "port"), "Input should be less than or equal to 65535"),
            ("extra_forbidden", ("inner", "hots"), "Extra inputs are not permitted"),
            ("missing", ("inner", "host"), "Field required"),
            ("model_type", ("by_user", "u"), "Input should be a valid dictionary or instance of Inner"),
            ("value_error", ("doubled", 1), "Value error, too big to double"),
            ("string_too_short", ("text",), "String should have at least 1 character"),
            ("extra_forbidden", ("extra",), "Extra inputs are not permitted"),
        ]
    )


def test_a_missing_field_and_strict_types() -> None:
    assert errors({}) == [("missing", ("name",), "Field required")]
    # YAML gives typed values: a quoted number is a string, not an int
    assert errors({"name": "a", "limit": "5"}) == [("int_type", ("limit",), "Input should be a valid integer")]
    assert errors({"name": "a", "limit": True}) == [("int_type", ("limit",), "Input should be a valid integer")]
    assert errors({"name": 5}) == [("string_type", ("name",), "Input should be a valid string")]


def test_model_validator_runs_after_the_fields_and_carries_the_exception() -> None:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"name": "a", "mode": "B"})
    (e,) = info.value.errors()
    assert (e["type"], e["loc"], e["msg"]) == ("value_error", (), "Value error, mode B needs flag")
    assert isinstance(e["ctx"]["error"], ValueError)
    # not run when a field is already wrong: its error is the one reported
    assert errors({"name": "a", "mode": "B", "ratio": "x"}) == [
        ("float_type", ("ratio",), "Input should be a valid number")
    ]
    assert "1 validation error for Outer" in str(info.value)


def test_keywords_validate_like_a_dict() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Inner(host="h", prot=2)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Inner(host="h", port=0)


def test_frozen_equal_hashable_and_dumped() -> None:
    o = Outer.model_validate({"name": "a", "tags": ["x"], "by_user": {"u": {"host": "h", "port": 2}}})
    with pytest.raises(AttributeError, match="frozen"):
        o.name = "b"  # type: ignore[misc]
    same = Outer.model_validate({"name": "a", "tags": ["x"], "by_user": {"u": {"host": "h", "port": 2}}})
    assert o == same and hash(o) == hash(same) and o != Outer(name="b")
    assert o.model_dump(mode="json")["tags"] == ["x"]
    assert o.model_dump()["tags"] == ("x",)
    assert o.model_dump(exclude_unset=True) == {"name": "a", "tags": ("x",), "by_user": {"u": {"host": "h", "port": 2}}}
    assert o.model_fields_set == {"name", "tags", "by_user"}
    assert Outer.model_validate(o.model_dump(mode="json")) == o  # what check prints loads again


def test_model_copy_replaces_without_validating() -> None:
    o = Outer(name="a")
    c = o.model_copy(update={"mode": "B"})
    assert (c.mode, o.mode, c.name) == ("B", "A", "a")
    assert "mode" in c.model_fields_set and "mode" not in o.model_fields_set


def test_validators_for_unknown_fields_are_a_definition_error() -> None:
    with pytest.raises(TypeError, match="unknown fields"):

        class Broken(Model):
            a: int = 0

            @field_validator("b")
            @classmethod
            def _b(cls, v: int) -> int:
                return v
