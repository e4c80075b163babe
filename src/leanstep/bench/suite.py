"""Suites: a named list of cases with how to run them (rounds, timeout), from a TOML file.

The suites leanstep ships live in the package (``leanstep/suites/*.toml``) and are found by
name (``seed-cpu``); any other suite is a path to its file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .cases import MODEL_OPTION_KEYS, REFERENCE_KEYS, Case

__all__ = [
    "Suite",
    "check_suite_name",
    "find_suite",
    "is_suite",
    "list_suites",
    "load_suite",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_CASE_KEYS = tuple(
    f.name for f in dataclasses.fields(Case) if f.name not in ("suite", "group", "name", "index",
                                                               "reference")
) + MODEL_OPTION_KEYS + REFERENCE_KEYS
_SUITE_KEYS = ("name", "description", "rounds", "timeout", "defaults", "group")
_GROUP_KEYS = ("name", "description", "case", *_CASE_KEYS)
_CASE_ENTRY_KEYS = ("name", *_CASE_KEYS)


@dataclass(frozen=True)
class Suite:
    """What ``leanstep bench`` runs: cases (in order) and how (rounds, timeout in seconds)."""

    name: str
    cases: tuple[Case, ...]
    rounds: int = 1
    timeout: float | None = None
    description: str = ""
    source: str = field(default="", compare=False)

    def __post_init__(self):
        check_suite_name(self.name)
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        timeout = self.timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if not self.cases:
            raise ValueError(f"suite {self.name!r} gives no cases")
        keys = [case.key for case in self.cases]
        twice = sorted({key[2] for key in keys if keys.count(key) > 1})
        if twice:
            raise ValueError(f"the same case twice: {', '.join(twice)}")

    def replace(self, **changes) -> Suite:
        return dataclasses.replace(self, **changes)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(case.group for case in self.cases))

    def only_groups(self, names: list[str]) -> Suite:
        """The suite with only the groups ``names`` (case-insensitive)."""
        wanted = {name.strip().lower() for name in names}
        unknown = wanted - {name.lower() for name in self.groups}
        if unknown:
            raise ValueError(
                f"unknown group(s) {', '.join(repr(n) for n in sorted(unknown))}; groups: "
                f"{', '.join(repr(n) for n in self.groups)}"
            )
        return self.replace(cases=tuple(c for c in self.cases if c.group.lower() in wanted))


def check_suite_name(name: object) -> None:
    """A suite name becomes part of a file name under results/: letters, digits, ``_.-`` only,
    not starting with a dot (``../x`` would write elsewhere)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"suite name {name!r} must be letters, digits and _ . - (not starting with . or -)"
        )


def _shipped() -> dict[str, object]:
    folder = resources.files("leanstep") / "suites"
    if not folder.is_dir():
        return {}
    return {
        entry.name.removesuffix(".toml"): entry
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    }


def list_suites() -> list[str]:
    """Names of the suites shipped with leanstep."""
    return sorted(_shipped())


def is_suite(target: str) -> bool:
    """Whether a MODEL_OR_SUITE argument names a suite (a .toml path or a shipped suite's name)
    rather than a model."""
    return target.endswith(".toml") or Path(target).is_file() or target in _shipped()


def find_suite(target: str) -> tuple[str, str]:
    """(source label, TOML text) of the suite file path or shipped suite name ``target``."""
    path = Path(target)
    if path.is_file():
        return str(path), path.read_text()
    shipped = _shipped()
    if target in shipped:
        return f"{target} (shipped)", shipped[target].read_text()
    if target.endswith(".toml"):
        raise ValueError(f"suite file {target!r} not found")
    raise ValueError(f"unknown suite {target!r}; shipped suites: {', '.join(sorted(shipped))}")


def _toml_reader():
    """tomllib (Python 3.11+), or its backport tomli on Python 3.10."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError(
                "reading suite files needs Python 3.11+ or `pip install tomli`"
            ) from None
    return tomllib


def _check_keys(table: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown suite key {key!r}{hint} in {where}; allowed: {', '.join(allowed)}"
            )


def _table(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table ([...] with key = value lines), got {value!r}")
    return value


def _tables(value: object, where: str, header: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(
            f"{where} must be a list of tables written {header} (double brackets), got {value!r}"
        )
    return value


def _case_from_entry(suite: str, group: str, entry: dict, index: int) -> Case:
    values = dict(entry)
    name = values.pop("name")
    options = dict(values.pop("options", {}))
    for key in MODEL_OPTION_KEYS:
        if key in values:
            options[key] = values.pop(key)
    if options.get("checkpoint") == "none":
        options["checkpoint"] = None
    reference = {key: values.pop(key) for key in REFERENCE_KEYS if key in values}
    if "model" not in values:
        raise ValueError(f"case {name!r} of group {group!r} names no model")
    return Case(
        suite=suite, group=group, name=str(name), options=options, reference=reference,
        index=index, **values,
    )


def load_suite(target: str | Path) -> Suite:
    """The suite in a TOML file (a path, or the name of a shipped suite), cases in file order.

    Layout: top-level ``name``, ``description``, ``rounds``, ``timeout``, a ``[defaults]`` table of
    case keys, and ``[[group]]`` tables (``name``, case keys as the group's defaults) each with
    ``[[group.case]]`` tables (``name`` and case keys). Case keys: the Case fields, the model
    options norm, activation, checkpoint, pre_act, drop_path_rate, an ``options`` table for any
    other model keyword, and reference_* figures.
    """
    source, text = find_suite(str(target))
    tomllib = _toml_reader()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"suite file {source!r} is not valid TOML: {error}") from None
    label = Path(str(target)).name
    _check_keys(data, _SUITE_KEYS, f"suite {label}")
    name = data.get("name", Path(str(target)).stem)
    defaults = _table(data.get("defaults", {}), f"[defaults] of suite {label}")
    _check_keys(defaults, _CASE_KEYS, f"[defaults] of suite {label}")
    groups = _tables(data.get("group", []), f"'group' of suite {label}", "[[group]]")
    if not groups:
        raise ValueError(f"suite {label} has no [[group]]")
    cases: list[Case] = []
    for group_index, group in enumerate(groups):
        group_name = str(group.get("name", f"group {group_index + 1}"))
        _check_keys(group, _GROUP_KEYS, f"group {group_name!r}")
        group_defaults = {k: v for k, v in group.items() if k in _CASE_KEYS}
        entries = _tables(group.get("case", []), f"'case' of group {group_name!r}",
                          "[[group.case]]")
        seen = set()
        for case_index, entry in enumerate(entries):
            case_name = entry.get("name", f"case {case_index + 1}")
            _check_keys(entry, _CASE_ENTRY_KEYS, f"case {case_name!r} of group {group_name!r}")
            if case_name in seen:
                raise ValueError(f"case name {case_name!r} appears twice in group {group_name!r}")
            seen.add(case_name)
            merged = {**defaults, **group_defaults, **entry, "name": case_name}
            merged["options"] = {
                **_table(defaults.get("options", {}), "'options' of [defaults]"),
                **_table(group_defaults.get("options", {}), f"'options' of group {group_name!r}"),
                **_table(entry.get("options", {}), f"'options' of case {case_name!r}"),
            }
            cases.append(_case_from_entry(name, group_name, merged, len(cases)))
    return Suite(
        name=name, cases=tuple(cases), rounds=data.get("rounds", 1),
        timeout=data.get("timeout"), description=str(data.get("description", "")),
        source=source,
    )
