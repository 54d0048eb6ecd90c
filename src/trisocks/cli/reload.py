"""Live reload of the configuration file (SIGHUP, or ``POST /api/reload``).

The file is read and checked whole first: a broken file changes nothing and says why (the
log, an event, the API's answer). Then what can change under live traffic does:

* tokens of the file (``[server] token``/``token_file`` and ``[[tokens]]``): a token that is
  gone is removed and its sessions end; a new one is added; a changed policy applies;
* the server's destination rules (``rules``): to the next connection;
* token policies: speed limits at the next read, rules and limits at the next connection;
* webhooks;
* the log level (``debug``).

Tunnels the change does not concern go on untouched. Settings that cannot change in a
running process (listen addresses and ports, TLS files, the database...) are reported as
needing a restart; settings the command line or the environment gives keep their value.
"""

from __future__ import annotations

import argparse
import logging

from ..policy import spec
from ..policy.rules import RuleError, RuleSet
from . import config

log = logging.getLogger("trisocks")

LIVE = {"rules", "debug", "max_sessions_per_token"}  # (tokens: see _tokens)


def file_tokens(cfg: config.ConfigFile, reverse: bool) -> dict[str, config.TokenEntry]:
    """token -> entry, for every token the file gives (a [server] token takes the server's
    mode: reverse with ``reverse = true``)."""
    out: dict[str, config.TokenEntry] = {}
    kind = "reverse" if reverse else "forward"
    plain = list(cfg.server.get("token") or [])
    if cfg.server.get("token_file"):
        with open(cfg.server["token_file"], encoding="utf-8") as f:
            plain += [line.strip() for line in f if line.strip()]
    for token in plain:
        out[token] = config.TokenEntry(token=token, type=kind)
    for entry in cfg.tokens:
        out[entry.token] = entry
    return out


class Reloader:
    """Applies a new version of the file to a running server with its management plane."""

    def __init__(self, path: str, parser: argparse.ArgumentParser, argv: list[str],
                 args: argparse.Namespace, plane, cfg: config.ConfigFile) -> None:
        self.path = path
        self.parser = parser
        self.argv = argv
        self.args = args  # what is in force: the command line, the environment, the file
        self.plane = plane
        self.options = config.file_options(parser)
        self.in_force = {dest: getattr(args, dest) for dest in self.options}
        self.tokens = file_tokens(cfg, args.reverse)  # the file's tokens in force

    async def __call__(self) -> dict:
        try:
            cfg = config.load(self.path, self.parser)
            wanted = self._settings(cfg)
            rules = RuleSet.parse(wanted["rules"]) if wanted.get("rules") else None
            tokens = file_tokens(cfg, wanted.get("reverse", self.args.reverse))
            for entry in tokens.values():
                if entry.policy is not None:
                    spec.compile_rules(entry.policy)
        except (config.ConfigError, RuleError, OSError, ValueError) as exc:
            log.error("reload of %s refused, nothing changed: %s", self.path, exc)
            self.plane.events.add("config_rejected", detail=str(exc))
            return {"success": False, "error": str(exc), "applied": [], "restart_needed": []}
        applied, restart = [], []
        for dest, value in wanted.items():
            if value == self.in_force.get(dest) or dest in ("token", "token_file"):
                continue
            if dest not in LIVE:
                restart.append(dest)
                continue
            if dest == "rules":
                self.plane.server.destination_rules = rules
            elif dest == "debug":
                level = {0: logging.INFO, 1: logging.DEBUG}.get(value, 5)  # 5: TRACE (-dd)
                logging.getLogger("trisocks").setLevel(level)
            else:
                self.plane.server.config.max_sessions_per_token = value
            self.in_force[dest] = value
            applied.append(dest)
        applied += await self._tokens(tokens)
        await self.plane.webhooks.replace_from_config(cfg.webhooks)
        applied.append("webhooks")
        if restart:
            log.warning("reload: %s changed in %s but need a restart", ", ".join(restart), self.path)
        log.info("reloaded %s: %s", self.path, ", ".join(applied) or "no change")
        self.plane.events.add("config_reloaded", detail=", ".join(applied) or "no change")
        return {"success": True, "applied": applied, "restart_needed": restart}

    def _settings(self, cfg: config.ConfigFile) -> dict:
        """Every file option's value as it would be at a start with this file: the command
        line and the environment first, then the file, then the defaults."""
        out = {}
        for dest, action in self.options.items():
            if config.given_elsewhere(action, self.argv):
                out[dest] = self.in_force[dest]
            elif dest in cfg.server:
                out[dest] = cfg.server[dest]
            else:
                out[dest] = self.parser.get_default(dest)
        return out

    async def _tokens(self, wanted: dict[str, config.TokenEntry]) -> list[str]:
        server, tokens = self.plane.server, self.plane.tokens
        changes = []
        for token, entry in list(self.tokens.items()):
            if token not in wanted:
                server.remove_token(token)
                del self.tokens[token]
                changes.append(f"token removed ({entry.type})")
        for token, entry in wanted.items():
            old = self.tokens.get(token)
            if old is not None and (old.type, old.port, old.reverse_token) != (
                    entry.type, entry.port, entry.reverse_token):
                server.remove_token(token)  # changed kind or port: a new token
                old = None
            if old is None:
                await add_token(self.plane, entry)
                changes.append(f"token added ({entry.type})")
            elif old.policy != entry.policy:
                info = tokens.get(token)
                if info is not None:
                    spec.put_in_force(info.account, entry.policy or spec.Policy())
                changes.append(f"token policy ({entry.type})")
            self.tokens[token] = entry
        return changes


async def add_token(plane, entry: config.TokenEntry) -> None:
    """A token of the file, new at a reload: in the table (a reverse token with its SOCKS5
    port), with its policy, and a row in the store so that its counters are kept."""
    from ..management.records import token_record
    from ..tunnel.tokens import TokenInfo

    server = plane.server
    if entry.type == "reverse":
        info = await server.add_reverse_token(entry.token, port=entry.port, username=entry.username,
                                              password=entry.password,
                                              allow_manage_connector=entry.allow_manage_connector)
    elif entry.type == "connector":
        info = server.add_connector_token(entry.token, entry.reverse_token)
    else:
        info = plane.tokens.add(TokenInfo(entry.token, "forward"))
    meter = info.account
    meter.origin = "cli"  # like a -t token: counted, and its row waits if it goes
    if entry.policy is not None:
        spec.put_in_force(meter, entry.policy)
    await plane.store.put_token(token_record(info))
