"""Loading configs: presets, `section.field=value` overrides, and the dict form saved as a run's
config.json. Every error is one line naming the key at fault (a close match is suggested)."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path

from configs.base import REPO_ROOT, Config, ConfigError, _fail, _type_name

SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name != "name"}


# --- Overrides and (de)serialization -------------------------------------------------------------


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid: {', '.join(sorted(options))}"


def _section_hints(section: str) -> dict:
    if section not in SECTIONS:
        _fail(f"unknown config section {section!r}{_closest(section, SECTIONS)}")
    return typing.get_type_hints(typing.get_type_hints(Config)[section])


def _parse_value(text: str, hint, key: str):
    """Parse an override's text to the field's annotated type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if hint is int:
            number = float(text.replace("_", ""))
            if not number.is_integer():
                raise ValueError
            return int(number)
        if hint is float:
            return float(text)
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            return tuple(_parse_value(t.strip(), item, key) for t in text.split(",") if t.strip())
    except ValueError:
        _fail(f"override {key}={text!r}: expected {_type_name(hint)}")
    return text


def apply_overrides(config: Config, overrides) -> Config:
    """Apply `section.field=value` strings, each parsed to the field's type."""
    changes: dict[str, dict] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            _fail(f"override {item!r} is not of the form section.field=value (e.g. model.n_layers=4)")
        hints = _section_hints(section)
        if name not in hints:
            _fail(f"unknown key {key!r}{_closest(name, hints)}")
        changes.setdefault(section, {})[name] = _parse_value(text.strip(), hints[name], key)
    return dataclasses.replace(config, **{
        section: dataclasses.replace(getattr(config, section), **fields)
        for section, fields in changes.items()})


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


# Fields that were booleans once: a run's config.json from before keeps its meaning.
_WERE_BOOLS = {("model", "remat"): {False: "none", True: "full"}}


def _upgrade(section: str, name: str, value):
    if isinstance(value, bool) and (section, name) in _WERE_BOOLS:
        return _WERE_BOOLS[section, name][value]
    return tuple(value) if isinstance(value, list) else value


def config_from_dict(d: dict) -> Config:
    """Inverse of config_to_dict (e.g. a run's config.json); unknown keys fail with a suggestion."""
    sections = {}
    for section, values in d.items():
        if section == "name":
            continue
        hints = _section_hints(section)
        for name in values:
            if name not in hints:
                _fail(f"unknown key '{section}.{name}'{_closest(name, hints)}")
        cls = typing.get_type_hints(Config)[section]
        sections[section] = cls(**{k: _upgrade(section, k, v) for k, v in values.items()})
    return Config(name=d.get("name", ""), **sections)


def preset_names() -> tuple[str, ...]:
    """The presets shipped in configs/ (every file but base.py and load.py), by name."""
    return tuple(sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py") if p.stem not in ("base", "load", "__init__")))


def preset_path(name: str) -> Path:
    return REPO_ROOT / "configs" / f"{name}.py"


def load_config(path, overrides=()) -> Config:
    """Execute the preset file at `path`, take its `config`, and apply the overrides."""
    path = Path(path)
    if not path.is_file():
        _fail(f"config file {str(path)!r} does not exist; presets live in {REPO_ROOT / 'configs'}")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    if path.suffix != ".py":
        _fail(f"config file {str(path)!r} is not a Python preset (.py); presets live in {REPO_ROOT / 'configs'}")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:   # a preset is user code: any error in it is theirs to see in one line
        _fail(f"config file {str(path)!r} failed to run: {type(err).__name__}: {err}".splitlines()[0])
    config = getattr(module, "config", None)
    if not isinstance(config, Config):
        _fail(f"config file {str(path)!r} must define a module-level `config = Config(...)`")
    if not config.name:
        config = dataclasses.replace(config, name=path.stem)
    return apply_overrides(config, overrides)


def run_config(run, flag: str = "--run") -> Config:
    """The config a train.py run directory was written with (its config.json); errors name the
    directory, after `flag`, the command-line flag that gave it ("" for a positional argument)."""
    path, where = Path(run) / "config.json", f"{flag} {run}".strip()
    if not path.is_file():
        raise ConfigError(f"{where}: no train.py run there ({path} is missing)")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{where}: {path} is not readable JSON ({err})") from None
    except (ConfigError, TypeError, AttributeError) as err:    # valid JSON, but not a config's sections
        raise ConfigError(f"{where}: {path} is not a config this code can read ({err})") from None
