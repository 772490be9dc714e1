"""Reading a sweep file: YAML -> the typed schema (`orchestrator/config.py`), or one line.

``load_sweep(path)`` returns a validated ``SweepConfig`` or raises ``ConfigError`` with one
line naming the key and what was expected: pydantic's errors are turned into that line
here, and the checks that need the whole file (searched paths and values, dataset identity,
selection data) run here too. The README's sweep file reference is generated from the
schema (``python -m orchestrator.config --reference``) and a test checks that it matches.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config import (AuditConfig, BetaVAEConfig, ClusterConfig, DataConfig, DPConfig, EvalConfig, FAMILY_CONFIGS,
                                 LDMConfig, ParamSpec, PrivacyConfig, RandomCount, SearchConfig, SelectDPConfig,
                                 StageConfig, SweepConfig, SynthesizeConfig, TrackingConfig, TrainConfig,
                                 VQVAEConfig, _did_you_mean, flatten, get_path, search_combinations)
from orchestrator.errors import ConfigError


def _model_at(loc: tuple, root: type[BaseModel]) -> Optional[type[BaseModel]]:
    """The pydantic class that owns the field at `loc` (to suggest valid keys)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return model
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
            for sub in getattr(cand, "__args__", ()):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    nxt = sub
        model = nxt
    return model


def _loc_to_str(loc: tuple, raw: Any) -> str:
    parts = []
    node = raw
    for part in loc:
        if isinstance(part, int):
            name = None
            if isinstance(node, list) and part < len(node) and isinstance(node[part], dict):
                name = node[part].get("name")
            parts[-1:] = [f"{parts[-1] if parts else ''}[{name if name else part}]"]
        else:
            parts.append(str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts)


def _union_member(part) -> Optional[type]:
    """pydantic names union members in error locations: `constrained-int`, or
    `function-after[_check(), RandomCount]` for a model with a validator."""
    if not isinstance(part, str):
        return None
    if part in ("int", "constrained-int"):
        return int
    if part == "RandomCount" or part.endswith(", RandomCount]"):
        return dict
    return None


def _pick_error(errors: list[dict]) -> dict:
    """In a union (`num_samples: 3` or `{distribution: ...}`), report the error of the member
    the user evidently meant (a mapping -> the mapping's keys), not pydantic's first one."""
    first = errors[0]
    if not any(_union_member(p) for p in first["loc"]):
        return first
    wants = dict if isinstance(first.get("input"), dict) else int
    for e in errors:
        if any(_union_member(p) is wants for p in e["loc"]):
            return e
    return first


def format_validation_error(err: ValidationError, raw: Any, root: type[BaseModel]) -> str:
    e = _pick_error(err.errors())
    if e["type"] == "missing":
        # `stagse:` without `stages:` is one typo, not a missing key: report the typo and its fix
        for other in err.errors():
            if (other["type"] == "extra_forbidden" and other["loc"][:-1] == e["loc"][:-1]
                    and difflib.get_close_matches(str(other["loc"][-1]), [str(e["loc"][-1])], n=1, cutoff=0.6)):
                e = other
                break
    loc, family = [], None
    for part in e["loc"]:
        if _union_member(part):
            continue
        # pydantic puts the union tag (`beta_vae`, ...) into the location; users never wrote it
        if loc and loc[-1] == "model" and part in FAMILY_CONFIGS:
            family = FAMILY_CONFIGS[part]
            continue
        if part != "function-after":
            loc.append(part)
    loc = tuple(loc)
    where = _loc_to_str(loc, raw)
    if e["type"] == "union_tag_invalid":
        tag = str(e.get("ctx", {}).get("tag", ""))
        return (f"{where}.kind: unknown model kind {tag!r}{_did_you_mean(tag, FAMILY_CONFIGS)}; "
                f"expected one of {', '.join(FAMILY_CONFIGS)}")
    if e["type"] == "union_tag_not_found":
        return f"{where}.kind: required key is missing; expected one of {', '.join(FAMILY_CONFIGS)}"
    if e["type"] == "extra_forbidden":
        owner = family if (family is not None and loc[-2:-1] == ("model",)) else _model_at(loc[:-1], root)
        hint = _did_you_mean(str(loc[-1]), owner.model_fields) if owner is not None else ""
        return f"{where}: unknown key{hint}"
    if e["type"] == "missing":
        return f"{where}: required key is missing"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error" and where == "":
        return msg
    key = re.match(r"([A-Za-z_][\w.]*(?:/\w+)?): ", msg) if e["type"] == "value_error" else None
    if key:  # a validator naming its key: `stages[ae].train.physical_batch_size: ...`, not `...train: physical_batch_size: ...`
        where, msg = f"{where}.{key.group(1)}", msg[key.end():]
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or e["type"] == "value_error" else f", got {got!r}"
    return f"{where}: {msg}{shown}" if where else f"{msg}{shown}"


# --- loading ------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML
    silently keeps the last one, so a second `dp:` block would erase the first unseen."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overrides is fine
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: sweep file not found")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read sweep file ({exc.strerror})")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}")


def parse_sweep(raw: Any, source: str = "sweep file", base_dir: Path = Path(".")) -> SweepConfig:
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise ConfigError(f"{source}: expected a mapping with keys `name` and `stages`, got {got}")
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err, raw, SweepConfig)}")
    cfg.base_dir = base_dir
    for stage in cfg.stages:
        _check_stage(cfg, stage, raw, source)
    _check_data_identity(cfg, source)
    return cfg


def _check_data_identity(cfg: SweepConfig, source: str) -> None:
    """A dataset is its real folder, and it is private or public for the whole study: a
    folder marked public in one stage would be spent without accounting in that stage."""
    seen: dict[Path, tuple[str, bool]] = {}
    for stage in cfg.stages:
        uses = [(f"stages[{stage.name}].data", cfg.stage_data(stage))]
        if stage.search.select_data is not None:
            uses.append((f"stages[{stage.name}].search.select_data", cfg.select_data(stage)))
        for where, data in uses:
            root = cfg.resolve(data.root)
            first = seen.setdefault(root, (where, data.private))
            if first[1] != data.private:
                flag = lambda p: "private" if p else "public"  # noqa: E731
                raise ConfigError(f"{source}: {where}.private: {root} is {flag(data.private)} here but "
                                  f"{flag(first[1])} in {first[0]}; expected one setting per dataset")


def _check_stage(cfg: SweepConfig, stage: StageConfig, raw: dict, source: str) -> None:
    where = f"stages[{stage.name}]"
    try:
        data = cfg.stage_data(stage)
    except ValidationError as err:
        raw_data = {**raw.get("data", {}), **(stage.data or {})}
        raise ConfigError(f"{source}: {where}.data.{format_validation_error(err, raw_data, DataConfig)}")
    if stage.search.select_data is not None:
        try:
            sel = cfg.select_data(stage)
        except ValidationError as err:
            raw_data = {**raw.get("data", {}), **(stage.data or {}), **stage.search.select_data}
            raise ConfigError(f"{source}: {where}.search.select_data.{format_validation_error(err, raw_data, DataConfig)}")
        if sel.private:
            raise ConfigError(f"{source}: {where}.search.select_data.private: select_on public ranks trials on "
                              "public data; expected `private: false`")
        for key in ("shape", "labels"):
            if getattr(sel, key) != getattr(data, key):
                raise ConfigError(f"{source}: {where}.search.select_data.{key}: {list(getattr(sel, key))} differs "
                                  f"from the stage's data ({list(getattr(data, key))}); expected the same")
    base = stage.model_dump(exclude={"search", "name", "needs", "select", "init_from", "data"})
    # Each searched path must exist in the stage config, and each candidate value must
    # give a valid stage: a typo in a path, or sigma = -1 in a grid, is caught here and
    # not hours later inside trial 17.
    for path, spec in stage.search.parameters.items():
        try:
            get_path(base, path)
        except (KeyError, TypeError):
            head = path.split(".")[0]
            choices = list(flatten(base)) if head in base else list(base)
            hint = _did_you_mean(path if head in base else head, choices)
            raise ConfigError(f"{source}: {where}.search.parameters.{path}: no such key in the stage config{hint}")
        current = get_path(base, path)
        if spec.distribution in ("uniform", "log_uniform") and isinstance(current, int) and not isinstance(current, bool):
            # the end points would validate, but Tune draws fractions such as 2.37 in between
            raise ConfigError(f"{source}: {where}.search.parameters.{path}: {spec.distribution} draws fractional "
                              f"numbers, but {path} takes whole numbers; expected distribution: int_uniform or `values`")
    for combo, trial in search_combinations(stage, limit=256):
        try:
            StageConfig.model_validate({**trial, "name": stage.name})
        except ValidationError as err:
            raise ConfigError(f"{source}: {where}.search.parameters: with {combo}: "
                              f"{format_validation_error(err, trial, StageConfig)}")


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    raw = load_yaml(path)
    # Relative paths in a sweep file mean what they mean on the command line: relative to
    # the directory the launch runs in (as `output: runs/demo` reads).
    return parse_sweep(raw, source=str(path), base_dir=Path.cwd())


# --- reference (README) -------------------------------------------------------------
def reference_markdown() -> str:
    """The sweep-file reference, generated from the schema (kept in the README)."""
    sections = [("(top level)", SweepConfig), ("data", DataConfig), ("data.synthesize", SynthesizeConfig),
                ("privacy", PrivacyConfig), ("cluster", ClusterConfig), ("tracking", TrackingConfig),
                ("stages[]", StageConfig), ("stages[].model (kind: beta_vae)", BetaVAEConfig),
                ("stages[].model (kind: vq_vae)", VQVAEConfig), ("stages[].model (kind: ldm)", LDMConfig),
                ("stages[].train", TrainConfig), ("stages[].dp", DPConfig), ("stages[].audit", AuditConfig),
                ("stages[].eval", EvalConfig),
                ("stages[].search", SearchConfig), ("stages[].search.select_dp", SelectDPConfig),
                ("stages[].search.num_samples (random)", RandomCount),
                ("stages[].search.parameters.<path>", ParamSpec)]
    lines = []
    for title, model in sections:
        lines.append(f"#### `{title}`")
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines.append(doc)
        lines.append("")
        lines.append("| key | default | meaning |")
        lines.append("|---|---|---|")
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                val = field.default_factory()
                default = f"`{val}`" if not isinstance(val, BaseModel) else "see below"
            else:
                default = f"`{field.default}`" if field.default is not None else "`null`"
            lines.append(f"| `{name}` | {default} | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    """`python -m orchestrator.config SWEEP.yaml ...` validates; `--reference` prints the reference."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--reference"]:
        print(reference_markdown(), end="")
        return 0
    for arg in argv:
        try:
            load_sweep(arg)
            print(f"{arg}: ok")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
