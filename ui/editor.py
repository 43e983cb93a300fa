"""The template editor's work that is not HTTP: compiling edits, counting the groups a
grouping template would form, and turning edits into config.toml (a block to paste, or
the file itself, rewritten atomically with its comments kept)."""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomlkit

from grouping.kinds import Kind
from grouping.pipeline import TEMPLATE_NAMES, grouping_key_of
from grouping.templates import Budget, TemplateCompileError, compile_template, render


class EditError(Exception):
    """The edit cannot be written; str() says why, for the page."""


def normalize(text: str) -> str:
    """A textarea's text as a template: browsers send CRLF line ends."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def compile_errors(edited: Mapping[str, str]) -> dict[str, str]:
    """Template name -> compile error, for each edited template that does not compile."""
    errors = {}
    for name, text in edited.items():
        if text.strip():
            try:
                compile_template(text)
            except TemplateCompileError as exc:
                errors[name] = str(exc)
    return errors


def overrides_from(kind: Kind, edited: Mapping[str, str]) -> dict[str, str]:
    """What config.toml must say: every edited text that is not empty and not the kind's default.

    An empty text means "the kind's default", as an omitted key does in the config.
    """
    out = {}
    for name in TEMPLATE_NAMES:
        text = edited.get(name, "")
        if text.strip() and text != (kind.templates.get(name) or ""):
            out[name] = text
    return out


# -- grouping comparison ----------------------------------------------------------------


def count_groups(templates: Iterable[Any], payloads: list[Any], seconds: float) -> tuple[list[int], int]:
    """For each compiled grouping template (or None), how many distinct grouping keys
    `payloads` give, as ingestion computes them (an empty or failing id stands alone).

    Runs every render against one deadline, so a slow edit cannot hold a worker for long;
    returns the counts over the payloads evaluated in time, and how many that was.
    Meant for a worker thread.
    """
    templates = list(templates)
    deadline = time.monotonic() + seconds
    budget = Budget(deadline, False, seconds)
    keys: list[set[str]] = [set() for _ in templates]
    evaluated = 0
    for payload in payloads:
        if time.monotonic() >= deadline:
            break
        for template, seen in zip(templates, keys):
            gid = None
            if template is not None:
                outcome = render(template, {"payload": payload}, budget)
                gid = outcome.text if outcome.error is None else None
            seen.add(grouping_key_of(gid))
        evaluated += 1
    return [len(k) for k in keys], evaluated


# -- TOML -------------------------------------------------------------------------------


def _round_trips(item) -> bool:
    doc = tomlkit.document()
    doc.add("v", item)
    try:
        return tomllib.loads(tomlkit.dumps(doc))["v"] == item.value
    except (tomllib.TOMLDecodeError, KeyError):
        return False


def toml_string(text: str):
    """The most readable TOML string that holds `text` exactly: a literal string
    ('…' or '''…''', no escapes to read) when it can, else a basic one."""
    multiline = "\n" in text
    for options in ({"literal": True, "multiline": multiline}, {"multiline": multiline}, {}):
        try:
            item = tomlkit.string(text, **options)
        except (ValueError, tomlkit.exceptions.TOMLKitError):
            continue
        if _round_trips(item):
            return item
    return tomlkit.string(text)


def templates_table(overrides: Mapping[str, str]):
    table = tomlkit.table()
    for name in TEMPLATE_NAMES:
        if name in overrides:
            table.add(name, toml_string(overrides[name]))
    return table


def toml_block(integration_id: str, overrides: Mapping[str, str]) -> str:
    """The `[integrations.templates]` block to paste under the integration's entry."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f'under the [[integrations]] entry with id = "{integration_id}",'
                            " in place of its current [integrations.templates]"))
    outer = tomlkit.table(is_super_table=True)
    table = templates_table(overrides)
    if not overrides:
        table.add(tomlkit.comment("nothing: every template is the kind's default (the table may go)"))
    outer.add("templates", table)
    doc.add("integrations", outer)
    return tomlkit.dumps(doc)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: Path) -> str | None:
    try:
        return digest(path.read_text(encoding="utf-8"))
    except OSError:
        return None


def writable(path: Path) -> bool:
    """Whether the config can be replaced: the file and its folder (for the temp file)."""
    return path.is_file() and os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _entry(doc, integration_id: str):
    entries = doc.get("integrations")
    if not isinstance(entries, list):
        return None
    return next((e for e in entries if isinstance(e, dict) and e.get("id") == integration_id), None)


def rewrite(text: str, integration_id: str, overrides: Mapping[str, str]) -> str:
    """`text` (config.toml) with the integration's templates set to `overrides`, everything
    else, comments included, kept. Raises EditError when the result would not be right."""
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.TOMLKitError as exc:
        raise EditError(f"config.toml does not parse: {exc}") from None
    entry = _entry(doc, integration_id)
    if entry is None:
        raise EditError(f"config.toml has no [[integrations]] entry with id = \"{integration_id}\"")
    table = entry.get("templates")
    if table is None:
        if overrides:
            entry.append("templates", templates_table(overrides))
    else:
        for name in TEMPLATE_NAMES:
            if name in overrides:
                table[name] = toml_string(overrides[name])
            elif name in table:
                del table[name]
        if not overrides and not table:
            del entry["templates"]
    new = tomlkit.dumps(doc)
    check(new, integration_id, overrides)
    return new


def check(text: str, integration_id: str, overrides: Mapping[str, str]) -> None:
    """Re-read `text` as the daemon will: valid TOML, the integration's templates exactly
    `overrides`, each one compiling."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EditError(f"the new config.toml would not parse: {exc}") from None
    entry = _entry(raw, integration_id)
    templates = (entry or {}).get("templates", {})
    if not isinstance(templates, dict) or {n: templates[n] for n in TEMPLATE_NAMES if n in templates} != dict(overrides):
        raise EditError("the new config.toml would not hold these templates exactly; paste the block by hand")
    problems = compile_errors(dict(overrides))
    if problems:
        raise EditError("; ".join(f"{n}: {e}" for n, e in problems.items()))


def write_templates(path: Path, integration_id: str, overrides: Mapping[str, str], expected: str | None) -> str:
    """Set the integration's templates in config.toml, atomically; return the new file's digest.

    `expected` is the digest the editor was opened with: if someone changed the file
    since, nothing is written (their edit would be lost).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EditError(f"cannot read {path}: {exc}") from None
    if expected and digest(text) != expected:
        raise EditError(f"{path} changed since this editor was opened; reload the page and edit again")
    new = rewrite(text, integration_id, overrides)
    # Written beside the original and renamed over it: a reader (or a SIGHUP) never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise EditError(f"cannot write {path}: {exc}") from None
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # the rename is done; durability of the folder entry is best effort
    return digest(new)
