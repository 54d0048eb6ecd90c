"""Which destination rules a connection meets, in what order, and the verdict.

Three levels, first match wins across them:

1. the rules of the account the channel is metered to (a user's or a token's, set through
   the API), the most specific;
2. the server's rules (``--allow`` / ``--deny``, in the order given);
3. the built-in defaults: for users (the customers of a deployment) everything that is
   not the public internet is denied (own listeners, loopback, link-local with the cloud
   metadata address, unspecified, multicast, private ranges); for tokens only the
   server's own listeners, as LinkSocks tokens reach whatever the server reaches.

No rule matching means allowed. So ``--allow 127.0.0.1:18080`` comes before the defaults
and opens exactly that address to everyone, users included.

A rule is checked on the address actually dialed, after name resolution, together with the
name the client asked for (for domain rules): a name that resolves to a denied address is
denied, whatever the name.
"""

from __future__ import annotations

from .rules import Rule, RuleSet, builtin_token_defaults, builtin_user_defaults

USER_DEFAULTS = builtin_user_defaults()
TOKEN_DEFAULTS = builtin_token_defaults()
DENIED = "not allowed by ruleset"  # socks5.reply_for_error_text: reply 0x02


def levels_for(account, server_rules: RuleSet | None) -> tuple[RuleSet, ...]:
    own = getattr(account, "rules", None)
    defaults = USER_DEFAULTS if getattr(account, "safe_defaults", False) else TOKEN_DEFAULTS
    if own and server_rules:
        return (own, server_rules, defaults)
    if own:
        return (own, defaults)
    if server_rules:
        return (server_rules, defaults)
    return (defaults,)


def denial(levels: tuple[RuleSet, ...], ip, port: int, proto: str, name: str | None = None,
           own=None) -> Rule | None:
    """The deny rule that decides this destination, or None when it is allowed."""
    for rules in levels:
        rule = rules.decide(ip, port, proto, name=name, own=own)
        if rule is not None:
            return rule if rule.action == "deny" else None
    return None
