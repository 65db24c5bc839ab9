"""Prompt templates: the strings that turn a class name into a caption, checked and read from files.

One checker serves the dataset specs (``saft.data.adapters.spec``), ``prepare`` and the
template files users pass, so a template accepted in one place is accepted everywhere.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Sequence

import yaml

from saft.io import read_text


class TemplateError(ValueError):
    """Prompt templates are missing, malformed or lack the ``{}`` class-name placeholder."""


DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
"""The single CLIP prompt (``load_templates(None)``); ``prepare_dataset`` defaults to the
dataset's own templates instead, which for ``imagefolder`` are exactly these."""



def check_template(template: object, where: str, error: type[ValueError] = TemplateError) -> str:
    """Return ``template`` if ``template.format(class_name)`` fills exactly one ``{}``, else raise ``error``.

    Checking the format fields (not just searching for ``"{}"``) also refuses templates
    that would break at training time, like ``"a {name}"`` or an unmatched ``"{"``, and
    templates whose only braces are escaped (``"{{}}"``), which would ignore the class.
    """
    if not isinstance(template, str) or not template.strip():
        raise error(f"{where}: a template must be a non-empty string, got {template!r}")
    try:
        fields = [
            (name, conversion, spec)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as err:
        raise error(f"{where}: template {template!r} is not a valid format string ({err})") from None
    if fields != [("", None, "")]:
        raise error(
            f"{where}: template {template!r} must contain exactly one '{{}}' where the class name goes "
            "(and no other braces; write a literal brace as '{{' or '}}'), e.g. 'a photo of a {}.'"
        )
    return template


def _templates_from_file(path: Path) -> tuple[list[object], list[str]]:
    """Raw templates of a file and where each came from (for messages)."""
    text = read_text(path, "templates file", TemplateError)
    suffix = path.suffix.lower()
    if suffix in {".json", ".yaml", ".yml"}:
        try:
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            kind = "JSON" if suffix == ".json" else "YAML"
            raise TemplateError(f"templates file {path} is not valid {kind}: {err}") from None
        if isinstance(data, dict) and set(data) == {"templates"}:
            data = data["templates"]
        if not isinstance(data, list):
            raise TemplateError(
                f"templates file {path} must hold a list of templates (or {{\"templates\": [...]}}), "
                f"got {type(data).__name__}"
            )
        return data, [f"templates file {path}, item {i}" for i in range(1, len(data) + 1)]
    # Plain text: one template per line; blank lines and '#' comment lines are skipped.
    items: list[object] = []
    wheres: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            items.append(stripped)
            wheres.append(f"templates file {path}, line {number}")
    return items, wheres


def load_templates(templates: Sequence[str] | str | os.PathLike | None = None) -> tuple[str, ...]:
    """Prompt templates from a list, a file, or the default ``("a photo of a {}.",)``.

    A file is read by its extension: ``.json`` / ``.yaml`` / ``.yml`` hold a list of
    strings (or a mapping with one key ``templates``); anything else is text with one
    template per line, blank lines and lines starting with ``#`` ignored. Every template
    must contain one ``{}`` for the class name; duplicates are refused because they would
    silently double one prompt's weight in the class-embedding average.
    """
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, (str, os.PathLike)):
        path = Path(templates).expanduser()
        items, wheres = _templates_from_file(path)
        source = f"templates file {path}"
    elif isinstance(templates, Sequence):
        items = list(templates)
        wheres = [f"template {i}" for i in range(1, len(items) + 1)]
        source = "the template list"
    else:
        raise TemplateError(f"templates must be a list of strings or a file path, got {type(templates).__name__}")
    if not items:
        raise TemplateError(f"{source} holds no templates; give at least one, e.g. 'a photo of a {{}}.'")
    checked = [check_template(item, where) for item, where in zip(items, wheres)]
    seen: dict[str, str] = {}
    for template, where in zip(checked, wheres):
        if template in seen:
            raise TemplateError(f"{where}: template {template!r} repeats {seen[template]}; list each template once")
        seen[template] = where
    return tuple(checked)
