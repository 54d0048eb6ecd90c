"""``trisocks server --config FILE``: the server's settings in one TOML file.

Three parts, each validated by a msgspec Struct like the API's bodies, so that a wrong type
or an unknown key is an error that names the key and its line:

* ``[server]``: every ``trisocks server`` option, by its long name with ``_`` for ``-``
  (``ws_port = 8765``, ``rules = ["allow 127.0.0.1:18080", "deny private"]``). The Struct is
  made from the command's own parser, so the file cannot fall behind the flags.
* ``[[tokens]]``: tokens of each kind, with what the command line cannot say (a policy).
* ``[[webhooks]]``: signed event notifications (docs/operations.md).

Precedence: the command line, then the environment (``TRISOCKS_*``), then the file, then the
defaults. A setting given on the command line or in the environment wins over the file,
also at a reload.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec

from ..policy.spec import Policy

# options that make no sense in the file
NOT_IN_FILE = {"help", "config", "version"}
_ENV = re.compile(r"\[env (TRISOCKS_[A-Z0-9_]+)")


class ConfigError(ValueError):
    """What is wrong with a configuration file, with its line when known."""


class TokenEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One ``[[tokens]]`` table."""

    token: str = ""
    token_file: str = ""  # the token in a file of its own (not in the configuration)
    type: Literal["forward", "reverse", "connector"] = "forward"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None  # reverse: SOCKS5 port
    username: str = ""  # reverse: the SOCKS5 port's credentials
    password: str = ""
    reverse_token: str = ""  # connector: whose providers it reaches
    allow_manage_connector: bool = False  # reverse: autonomy mode
    policy: Policy | None = None  # destination rules and limits (docs/policy.md)


@dataclass
class ConfigFile:
    path: str
    server: dict  # dest -> value, only the keys the file sets
    tokens: list[TokenEntry] = field(default_factory=list)
    webhooks: list = field(default_factory=list)


def _option_type(action: argparse.Action):
    if isinstance(action, argparse._StoreTrueAction):
        return bool
    if isinstance(action, argparse._CountAction):
        return int
    if isinstance(action, argparse._AppendAction) or action.dest == "rules":
        return list[str]
    return action.type if action.type in (int, float) else str


def file_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of every option the file may set."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in NOT_IN_FILE and not a.dest.startswith("_")}


def _server_struct(parser: argparse.ArgumentParser) -> type:
    fields = [(dest, _option_type(a) | msgspec.UnsetType, msgspec.UNSET)
              for dest, a in file_options(parser).items()]
    return msgspec.defstruct("ServerSection", fields, kw_only=True, forbid_unknown_fields=True)


def _document_type(parser: argparse.ArgumentParser) -> type:
    try:  # the webhook Struct lives with the service that sends them
        from ..management.webhooks import Webhook
    except ImportError:  # pragma: no cover - before webhooks exist
        Webhook = dict
    server = _server_struct(parser)
    return msgspec.defstruct("ConfigDocument", [
        ("server", server, msgspec.field(default_factory=server)),
        ("tokens", list[TokenEntry], msgspec.field(default_factory=list)),
        ("webhooks", list[Webhook], msgspec.field(default_factory=list)),
    ], kw_only=True, forbid_unknown_fields=True)


def load(path: str, parser: argparse.ArgumentParser) -> ConfigFile:
    """Read and check the file; ConfigError says what is wrong, and where."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    text = raw.decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None  # tomllib names the line itself
    try:
        doc = msgspec.convert(data, _document_type(parser))
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(path, text, str(exc))) from None
    server = {k: v for k, v in msgspec.structs.asdict(doc.server).items() if v is not msgspec.UNSET}
    for i, entry in enumerate(doc.tokens, 1):
        _token_of(entry, f"{path}: tokens #{i}")
    return ConfigFile(path, server, list(doc.tokens), list(doc.webhooks))


def _token_of(entry: TokenEntry, what: str) -> str:
    if bool(entry.token) == bool(entry.token_file):
        raise ConfigError(f"{what}: give exactly one of token and token_file")
    if entry.token_file:
        try:
            with open(entry.token_file, encoding="utf-8") as f:
                entry.token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{what}: token_file {entry.token_file}: {exc.strerror or exc}") from None
        if not entry.token:
            raise ConfigError(f"{what}: token_file {entry.token_file} is empty")
    if entry.type == "connector" and not entry.reverse_token:
        raise ConfigError(f"{what}: a connector token needs reverse_token")
    return entry.token


# -- errors with a line -------------------------------------------------------------------------

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _explain(path: str, text: str, message: str) -> str:
    m = _AT.match(message)
    what, at = m.group("what"), m.group("path") or ""
    keys: list = [int(index) if index else name
                  for name, index in re.findall(r"\.([A-Za-z_0-9]+)|\[(\d+)\]", at)]
    unknown = _UNKNOWN.search(what)
    if unknown:
        keys.append(unknown.group(1))
    named = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
    if unknown:
        what = f"unknown key {named!r}"
        if keys[:1] == ["server"]:
            what += " (the [server] keys are the `trisocks server` options, with _ for -)"
    else:
        what = f"{named}: {what}"
    line = locate(text, keys)
    return f"{path}{f' line {line}' if line else ''}: {what}"


def locate(text: str, keys: list) -> int | None:
    """The line of a key path (["server", "ws_port"], ["tokens", 1, "port"]) in TOML text:
    the key's own line, else its table's header; None if neither is found."""
    if len(keys) > 1 and isinstance(keys[1], int):  # an array of tables: [[tokens]] number i
        want, rest = tuple(keys[:2]), keys[2:]
    elif len(keys) > 1:
        want, rest = tuple(keys[:1]), keys[1:]
    else:
        want, rest = (), keys
    key = rest[0] if rest else None
    table: tuple = ()
    counts: dict[str, int] = {}
    header = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0].strip()
        if stripped.startswith("[["):
            name = stripped.strip("[] ")
            counts[name] = counts.get(name, -1) + 1
            table = (name, counts[name])
        elif stripped.startswith("["):
            table = (stripped.strip("[] "),)
            if not want and key == table[0]:
                return n
        elif table == want and key is not None and stripped.split("=", 1)[0].strip() == key:
            return n
        else:
            continue
        if table == want:
            header = n
    return header


# -- precedence ---------------------------------------------------------------------------------


def given_elsewhere(action: argparse.Action, argv: list[str]) -> bool:
    """Was this option given on the command line or in its TRISOCKS_ variable? Then it wins
    over the file."""
    for opt in action.option_strings:
        for arg in argv:
            if arg == opt or (opt.startswith("--") and arg.startswith(opt + "=")) or (
                    not opt.startswith("--") and arg.startswith(opt) and not arg.startswith("--")):
                return True
    env = _ENV.search(action.help or "")
    return bool(env and os.environ.get(env.group(1)) is not None)


def apply(cfg: ConfigFile, args: argparse.Namespace, parser: argparse.ArgumentParser,
          argv: list[str]) -> dict[str, object]:
    """Set on ``args`` what the file says and nothing else did; returns those settings."""
    options = file_options(parser)
    taken = {}
    for dest, value in cfg.server.items():
        if not given_elsewhere(options[dest], argv):
            setattr(args, dest, value)
            taken[dest] = value
    return taken
