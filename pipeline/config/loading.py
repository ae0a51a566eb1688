"""Loading a job file: YAML -> typed, frozen pydantic models (:class:`pipeline.config.JobConfig`).

- Unknown keys are errors (with a "did you mean" hint), never ignored.
- ``${VAR}`` and ``${VAR:-default}`` in any string are taken from the environment; ``$$`` is a
  literal ``$``. An unset variable without a default is an error naming the key.
- Relative paths resolve against the folder of the YAML file, not the working directory.
- The API key is a ``SecretStr``: it prints as ``**********`` everywhere.

:func:`load_job` is the only entry point; every failure becomes one :class:`ConfigError` whose
text names the file, the key path and the problem.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from pipeline.config.job import JobConfig
from pipeline.errors import ConfigError

log = logging.getLogger("embedpipe.config")

# --- loading ----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# Keys whose unset ${VAR} is not an error at load: commands that never call the API (plan,
# status) run without the key; those that do check it (JobConfig.require_api_key).
_DEFERRED = {("embed", "api_key")}


def _expand(value: Any, path: tuple[str | int, ...], env: dict[str, str],
            unset: list[str] | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, (*path, str(k)), env, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), env, unset) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        if path in _DEFERRED and unset is not None:
            unset.append(name)
            return ""
        raise _UnsetVariable(path, name)

    return _VAR.sub(sub, value)


class _UnsetVariable(Exception):
    def __init__(self, path: tuple[str | int, ...], name: str) -> None:
        self.path = path
        self.name = name


def _loc(parts: tuple[str | int, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


_TAGGED = {"source": "kind", "embed": "provider", "sink": "kind"}


def _clean_loc(loc: tuple[str | int, ...], raw: Any) -> tuple[str | int, ...]:
    """Drop the union tag pydantic puts into locations (``source.local.root`` -> ``source.root``)."""
    if len(loc) >= 2 and loc[0] in _TAGGED and isinstance(raw, dict):
        section = raw.get(str(loc[0]))
        if isinstance(section, dict) and section.get(_TAGGED[str(loc[0])]) == loc[1]:
            return (loc[0], *loc[2:])
    if loc and loc[0] == "validate_":
        return ("validate", *loc[1:])
    return loc


def _model_at(loc: tuple[str | int, ...], raw: Any) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (for "did you mean" hints)."""
    model: type[BaseModel] = JobConfig
    node = raw
    for key in loc[:-1]:
        field = next(
            (f for n, f in model.model_fields.items() if key in (n, f.alias)), None
        )
        if field is None or not isinstance(node, dict):
            return None
        node = node.get(str(key))
        candidates = _model_members(field.annotation)
        if len(candidates) > 1 and isinstance(node, dict):
            tag = _TAGGED.get(str(key), "kind")
            candidates = [
                c for c in candidates
                if node.get(tag) in getattr(c.model_fields[tag].annotation, "__args__", ())
            ] or candidates
        if not candidates:
            return None
        model = candidates[0]
    return model


def _model_members(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    members: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()):
        members.extend(_model_members(arg))
    return members


def _describe(err: Any, raw: Any) -> str:
    loc = _clean_loc(tuple(err["loc"]), raw)
    if err["type"] == "extra_forbidden":
        model = _model_at(loc, raw)
        known = [f.alias or n for n, f in model.model_fields.items()] if model else []
        word = str(loc[-1])
        # Two letters swapped ("modle") is the commonest typo: an anagram wins over the
        # closest string ("mode").
        hint = ([k for k in known if sorted(k) == sorted(word)]
                or difflib.get_close_matches(word, known, n=1))
        extra = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
        return f"{_loc(loc)}: unknown key{extra if known else ''}"
    if err["type"] == "missing":
        return f"{_loc(loc)}: required key is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid":
        return f"{_loc(loc)}: {msg}"
    return f"{_loc(loc)}: {msg}"


def parse_overrides(items: list[str]) -> dict[tuple[str, ...], Any]:
    """``KEY.PATH=VALUE`` strings (``embed.concurrency=8``, ``run.engine=ray``) as key paths and
    values; each value is read as YAML (``8`` a number, ``[a, b]`` a list, ``null``)."""
    out: dict[tuple[str, ...], Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = tuple(p for p in key.strip().split("."))
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. "
                              "embed.concurrency=8")
        try:
            out[parts] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[parts] = value
    return out


def _apply(raw: dict[str, Any], overrides: dict[tuple[str, ...], Any], path: Path) -> None:
    for keys, value in overrides.items():
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"{path}: --set {'.'.join(keys)}: {where} is not a section")
            node = child
        node[keys[-1]] = value


# Keys of provider gemini that mean nothing to the emulator.
GEMINI_ONLY = ("base_url", "api_version", "auth", "api_key", "batch_api")


def _to_emulator(raw: dict[str, Any], path: Path) -> None:
    """``--set embed.provider=emulator`` (or ``--emulator``) on a job written for Google: the
    keys only a real endpoint uses are set aside, with a notice, so the job can be tried
    offline as it stands."""
    embed = raw.get("embed")
    if not isinstance(embed, dict):
        return
    dropped = [k for k in GEMINI_ONLY if embed.pop(k, None) is not None]
    if dropped:
        log.warning("%s: embed.provider is emulator for this invocation: %s ignored", path,
                    ", ".join(f"embed.{k}" for k in dropped))


def load_job(path: str | Path, env: dict[str, str] | None = None,
             overrides: dict[tuple[str, ...], Any] | None = None) -> JobConfig:
    """Load and validate a job file, with ``overrides`` (from ``--set``) applied before it is
    validated, so an override is checked exactly as the file's own keys are. Raises
    :class:`ConfigError` with a one-line-per-problem text."""
    path = Path(path)
    env = dict(os.environ) if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: job file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of keys, got {type(raw).__name__}")
    if overrides:
        _apply(raw, overrides, path)
        if overrides.get(("embed", "provider")) == "emulator":
            _to_emulator(raw, path)
    unset: list[str] = []
    try:
        data = _expand(raw, (), env, unset)
    except _UnsetVariable as exc:
        raise ConfigError(
            f"{path}: {_loc(exc.path)}: environment variable {exc.name} is not set "
            f"(set it, or write ${{{exc.name}:-default}})"
        ) from None
    try:
        job = JobConfig.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        problems = [_describe(e, raw) for e in exc.errors(include_input=False)]
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems)) from None
    job._unset_key_variable = unset[0] if unset else None
    job._path = str(path)
    return job

