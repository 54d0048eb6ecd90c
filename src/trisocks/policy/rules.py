"""Destination rules: a small language, parsed once, compiled for a first-match lookup.

A rule is one string, ``ACTION [PROTO] TARGET[:PORTS]``, words separated by whitespace.
ACTION is ``allow`` or ``deny``; PROTO ``tcp`` or ``udp`` (absent: both). TARGET is

* ``*``, any destination; an address (``::1``); a CIDR (``10.0.0.0/8``, no host bits set);
  a range (``10.0.0.5-10.0.0.9``, one family, first <= last);
* a set of :data:`NAMED_SETS` (``loopback``, ``private``...; ``own``, the server's own
  listeners, is asked of a callback); ``own.`` is the host called ``own``, not the set;
* a host name: ``example.com`` exactly, ``.example.com`` that name and every name below it,
  ``*.example.com`` only the names below it; any other ``*`` or ``?`` makes a glob, matched
  with fnmatch on the whole name (so ``*`` crosses dots).

PORTS, after the last colon: ``80``, ``8000-8100``, ``80,443,8000-8100`` or ``*`` (any, as
when absent); 0 to 65535, as a UDP header may carry port 0. An IPv6 target with ports is
bracketed, ``[fc00::/7]:443``; unbracketed, ``::1:80`` is refused as ambiguous.

Names compare case-insensitively, without the root's dot, in ASCII: a non-ASCII rule name
goes through the standard library's IDNA 2003 codec. The resolver spells names by IDNA
2008, which differs on ß, ς, ZWJ and ZWNJ: a rule name holding one is refused (write the
``xn--`` form meant), and a requested name holding one is matched under both spellings.

An IPv4-mapped address (``::ffff:127.0.0.1``) is the IPv4 address it maps, in requests and
rules, so it cannot slip past ``deny loopback``. Other IPv6 forms embedding IPv4 (``::a.b.c.d``,
6to4 ``2002::/16``, Teredo, NAT64 ``64:ff9b::/96``) stay IPv6, as a socket reaches them over
IPv6; a NAT64 prefix that leads into private IPv4 space needs a rule of its own.

Lookup: instead of trying rule after rule, a set is compiled per protocol. Address rules
become, per family, the sorted boundaries of elementary intervals (found by bisect), each
mapped to the ascending indices of the rules covering it; exact names and name suffixes are
dict keys (one lookup per suffix of the name: O(labels)); globs, ``*`` and ``own`` are short
lists scanned in order. The first match is the smallest index among candidates whose ports
fit, and every scan stops at the best index so far. Candidates end at the first rule for
any port (nothing after it can win), so an interval holds one or two rules. Globs cost a
test each, as do port-restricted rules piled on the same addresses. Sans-IO, stdlib only.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

__all__ = ["NAMED_SETS", "Rule", "RuleError", "RuleSet", "builtin_token_defaults",
           "builtin_user_defaults", "parse_rule"]

IPAddress = IPv4Address | IPv6Address
Ports = tuple[tuple[int, int], ...]

# Set name -> members. ``own`` has none here: the server's listeners are known at run time
# only, through the ``own`` callback of RuleSet.decide.
NAMED_SETS: dict[str, tuple[str, ...]] = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
    "unspecified": ("0.0.0.0/8", "::/128"),
    "own": (),
}
_SET_NETS = {k: tuple(ip_network(n) for n in v) for k, v in NAMED_SETS.items()}

# Rule.kind
ANY, ADDRESS, NETWORK, RANGE, SET = "any", "address", "network", "range", "set"
NAME, DOMAIN, SUBDOMAINS, GLOB = "name", "domain", "subdomains", "glob"

MAX_RULE = 1000
_GRAMMAR = "ACTION [tcp|udp] TARGET[:PORTS], e.g. 'deny tcp 10.0.0.0/8:22'"
_PORT_ITEM = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_PORTISH = re.compile(r"[0-9*,-]+")
_LABEL = {False: re.compile(r"[a-z0-9_-]{1,63}"), True: re.compile(r"[a-z0-9_*?-]{1,63}")}
_MAPPED = ip_network("::ffff:0:0/96")
_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")  # IDNA 2003 maps them away, 2008 keeps them
_DOTS = re.compile("[.\u3002\uff0e\uff61]")  # what IDNA takes for a dot


class RuleError(ValueError):
    """A rule that cannot be parsed: the message quotes it and says what is expected.
    ``index``: its 1-based position in the list it came in, if any."""

    def __init__(self, text: str, problem: str, index: int | None = None) -> None:
        where = "" if index is None else f"rule {index}: "
        shown = text if len(text) <= 120 else text[:120] + "..."
        super().__init__(f"{where}{shown!r}: {problem}")
        self.text, self.problem, self.index = text, problem, index


class _Problem(Exception):
    """What is wrong with a part of a rule; parse_rule adds the rule."""


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed rule (see :func:`parse_rule`). ``target`` by ``kind``: ANY "*", ADDRESS an
    address, NETWORK a network, RANGE a (first, last) pair, SET the set's name; NAME, DOMAIN
    and SUBDOMAINS the ASCII name (no leading ``.`` or ``*.``), GLOB the lower-case pattern.
    ``ports``: sorted, merged (lo, hi) ranges; None for any port."""

    action: str  # "allow" | "deny"
    proto: str | None  # "tcp" | "udp" | None: both
    kind: str
    target: object
    ports: Ports | None
    text: str  # canonical: parse_rule(text) gives this rule back

    def __str__(self) -> str:
        return self.text


def parse_rule(text: str) -> Rule:
    """The rule ``text`` says, or :class:`RuleError` saying what is wrong with it."""
    if not isinstance(text, str):
        raise RuleError(repr(text), f"a rule is a string, not {type(text).__name__}")
    if len(text) > MAX_RULE:  # what a message echoes stays bounded
        raise RuleError(text, f"a rule is at most {MAX_RULE} characters")
    words = text.split()
    if not words:
        raise RuleError(text, f"empty rule; expected {_GRAMMAR}")
    action = words[0].lower()
    if action not in ("allow", "deny"):
        raise RuleError(text, f"{words[0]!r} is not an action; a rule starts with allow or deny")
    rest = words[1:]
    proto = rest.pop(0).lower() if rest and rest[0].lower() in ("tcp", "udp") else None
    if not rest:
        raise RuleError(text, f"no target after {words[-1]!r}; expected {_GRAMMAR}")
    if len(rest) > 1:
        hint = (f"ports follow the target after a colon: {rest[0]}:{rest[1]}"
                if _PORTISH.fullmatch(rest[1]) else f"expected {_GRAMMAR}")
        raise RuleError(text, f"unexpected {rest[1]!r} after the target {rest[0]!r}; {hint}")
    try:
        kind, target, ports = _target_and_ports(rest[0])
    except _Problem as exc:
        raise RuleError(text, str(exc)) from None
    if kind == RANGE:
        shown = f"{target[0]}-{target[1]}"
    elif kind == NAME and target in NAMED_SETS:
        shown = f"{target}."  # the host, not the set
    else:
        shown = {DOMAIN: ".", SUBDOMAINS: "*."}.get(kind, "") + str(target)
    if ":" in shown and (ports is not None or _ambiguous(shown)):  # only IPv6 has a ":"
        shown = f"[{shown}]"
    if ports is not None:
        shown += ":" + ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
    return Rule(action, proto, kind, target, ports, " ".join(filter(None, (action, proto, shown))))


def _target_and_ports(word: str) -> tuple[str, object, Ports | None]:
    if word.startswith("["):  # [IPv6] or [IPv6]:PORTS
        host, bracket, tail = word[1:].partition("]")
        if not bracket:
            raise _Problem(f"{word!r} opens a bracket it never closes; expected [IPV6]:PORTS")
        if tail and not tail.startswith(":"):
            raise _Problem(f"expected ':PORTS' after ']', got {tail!r}")
        if ":" not in host:
            raise _Problem(f"brackets are for IPv6 only; write {host}{tail}")
        return (*_ip_target(host), _ports(tail[1:]) if tail else None)
    if word.count(":") >= 2:  # IPv6 without brackets, so without ports
        head, _, tail = word.rpartition(":")
        if _ambiguous(word):
            if not _is_ip(word):
                raise _Problem(f"an IPv6 target with ports is bracketed: [{head}]:{tail}")
            raise _Problem(f"{word} is ambiguous: write [{head}]:{tail} for port {tail} of "
                           f"{head}, or [{word}] for the address {word}")
        return (*_ip_target(word), None)
    host, colon, tail = word.rpartition(":")
    if not colon:
        host, tail = word, "*"
    if not host:
        raise _Problem(f"no target before ':{tail}'; expected {_GRAMMAR}")
    if host == "*":
        return ANY, "*", _ports(tail)
    if host.lower() in NAMED_SETS:
        return SET, host.lower(), _ports(tail)
    if "/" in host or _is_ip(host.partition("-")[0]):
        return (*_ip_target(host), _ports(tail))
    return (*_name_target(host), _ports(tail))


def _ambiguous(word: str) -> bool:
    """Whether ``word`` reads as IPv6 target and ports: "::1:80" is an address, but was
    port 80 of ::1 meant? The writer must say, with brackets."""
    head, _, tail = word.rpartition(":")
    return _PORTISH.fullmatch(tail) is not None and _is_ip(head)


def _is_ip(text: str) -> bool:
    try:
        _ip_target(text)
        return True
    except _Problem:
        return False


def _address(text: str) -> IPAddress:
    if "%" in text:
        raise _Problem(f"{text}: zone ids (%...) are not supported in rules")
    try:
        ip = ip_address(text)
    except ValueError:
        raise _Problem(f"{text!r} is not an IP address") from None
    return (ip.ipv4_mapped or ip) if isinstance(ip, IPv6Address) else ip


def _ip_target(text: str) -> tuple[str, object]:
    """An address, CIDR or range; IPv4-mapped ones as the IPv4 they map."""
    if "/" in text:
        addr = _address(text.partition("/")[0])
        try:
            net = ip_network(text)
        except ValueError:
            try:
                loose = ip_network(text, strict=False)
            except ValueError:
                raise _Problem(f"{text!r}: the prefix length is 0 to {addr.max_prefixlen} "
                               f"for IPv{addr.version}") from None
            raise _Problem(f"{text} has host bits set; did you mean {loose}?") from None
        if isinstance(net, IPv6Network) and net.subnet_of(_MAPPED):
            net = IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        return NETWORK, net
    if "-" in text:
        first, _, last = text.partition("-")
        a, b = _address(first), _address(last)
        if a.version != b.version:
            raise _Problem(f"{text} mixes IPv4 and IPv6; a range is within one family")
        if a > b:
            raise _Problem(f"{text} starts after it ends; did you mean {b}-{a}?")
        return (ADDRESS, a) if a == b else (RANGE, (a, b))
    return ADDRESS, _address(text)


def _name_target(host: str) -> tuple[str, str]:
    name = host[:-1] if host.endswith(".") else host
    wild = "*" in name or "?" in name
    if name.startswith("*.") and "*" not in name[2:] and "?" not in name:
        kind, name = SUBDOMAINS, name[2:]
    elif name.startswith("."):
        kind, name = DOMAIN, name[1:]
        if wild:
            raise _Problem(f"{host}: a leading dot does not mix with wildcards; "
                           f"write *.{name} or {name}")
    elif name == "*":
        raise _Problem("write * for any destination, or *.NAME for the names below NAME")
    else:
        kind = GLOB if wild else NAME
    if not name.isascii():
        if kind == GLOB:
            raise _Problem(f"{host}: write non-ASCII labels in their xn-- form to use wildcards")
        if not _DEVIATIONS.isdisjoint(name):
            raise _Problem(f"{host}: IDNA 2003 and IDNA 2008 spell {''.join(_DEVIATIONS & set(name))} "
                           f"differently; write the xn-- form of the name meant")
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Problem(f"{host!r} is not a valid internationalised host name") from None
    name = name.lower()
    if len(name) > 253:
        raise _Problem(f"{host[:40]}...: a host name is at most 253 characters")
    for label in name.split("."):
        if not _LABEL[kind == GLOB].fullmatch(label):
            raise _Problem(
                f"{host!r} is not an address, CIDR, range, set or host name: a name's labels "
                f"are 1 to 63 letters, digits, '-' or '_'" + (", '*' or '?'" if kind == GLOB else ""))
    if name.isdigit():
        raise _Problem(f"{host!r} is not a target; for port {host} of any host write *:{host}")
    if name.rpartition(".")[2].isdigit():
        raise _Problem(f"{host!r} looks like an IPv4 address but is not one")
    return kind, name


def _ports(spec: str) -> Ports | None:
    if spec == "*":
        return None
    expected = "expected ports 0-65535 as 80, 8000-8100 or 80,443"
    if not spec:
        raise _Problem(f"nothing after ':'; {expected}")
    ranges = []
    for item in spec.split(","):
        m = _PORT_ITEM.fullmatch(item)
        if m is None:
            what = f"{item!r} is not a port or range" if item else "an empty item"
            raise _Problem(f"{what} in ports {spec!r}; {expected}")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if max(lo, hi) > 65535:
            raise _Problem(f"{item} is out of range; ports are 0 to 65535")
        if lo > hi:
            raise _Problem(f"port range {item} is backwards; did you mean {hi}-{lo}?")
        ranges.append((lo, hi))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return None if merged == [(0, 65535)] else tuple(merged)


def _spellings(name: str) -> tuple[str, ...]:
    """The ASCII forms a requested name is matched under."""
    if name.isascii():
        name = name.lower()
        return (name[:-1] if name.endswith(".") else name,)
    labels = _DOTS.split(name)
    labels = labels[:-1] if len(labels) > 1 and not labels[-1] else labels
    found = []
    try:
        found.append(".".join(labels).encode("idna").decode("ascii").lower())
    except UnicodeError:
        pass
    if not _DEVIATIONS.isdisjoint(name):  # as IDNA 2008, the resolver's, spells it
        found.append(".".join(label.lower() if label.isascii() else "xn--" + unicodedata.normalize(
            "NFC", label.lower()).encode("punycode").decode("ascii") for label in labels))
    return tuple(found)


class _Table:
    """The rules for one protocol, compiled: candidate tuples hold ascending rule indices."""

    __slots__ = ("below", "exact", "scan", "v4", "v6")

    def __init__(self, rules: Sequence[Rule], proto: str) -> None:
        spans: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        exact: dict[str, list[int]] = {}
        below: dict[str, list[int]] = {}
        self.scan: list[tuple[int, str, Callable | None]] = []
        for i, rule in enumerate(rules):
            kind, t = rule.kind, rule.target
            if rule.proto not in (None, proto):
                continue
            if kind in (ADDRESS, NETWORK, RANGE) or (kind == SET and t != "own"):
                nets = _SET_NETS[t] if kind == SET else (t,)
                for n in nets:
                    lo, hi = ((n, n) if kind == ADDRESS else t if kind == RANGE
                              else (n.network_address, n.broadcast_address))
                    spans[lo.version].append((int(lo), int(hi), i))
            if kind in (NAME, DOMAIN):  # .example.com is the name itself, and below it
                exact.setdefault(t, []).append(i)
            if kind in (DOMAIN, SUBDOMAINS):
                below.setdefault(t, []).append(i)
            if kind == GLOB:
                self.scan.append((i, kind, re.compile(fnmatch.translate(t)).match))
            elif kind == ANY or (kind == SET and t == "own"):  # no index can find these: one test each
                self.scan.append((i, kind, None))
        self.v4 = _intervals(spans[4], rules)
        self.v6 = _intervals(spans[6], rules)
        self.exact = {k: _useful(v, rules) for k, v in exact.items()}
        self.below = {k: _useful(v, rules) for k, v in below.items()}


def _useful(indices: Iterable[int], rules: Sequence[Rule]) -> tuple[int, ...]:
    """The indices in order, up to the first rule for any port: none after it can win."""
    out = []
    for i in sorted(indices):
        out.append(i)
        if rules[i].ports is None:
            break
    return tuple(out)


def _intervals(spans: list[tuple[int, int, int]], rules: Sequence[Rule]):
    """(bounds, slots): slots[k] are the candidates for bounds[k] <= x < bounds[k + 1]."""
    edges: dict[int, list[tuple[int, int]]] = {}  # point -> (rule, +1 at a start / -1 past an end)
    for lo, hi, i in spans:
        edges.setdefault(lo, []).append((i, 1))
        edges.setdefault(hi + 1, []).append((i, -1))
    active: dict[int, int] = {}  # rule -> how many of its spans cover this point
    bounds, slots = [0], [()]
    for point in sorted(edges):
        for i, step in edges[point]:
            active[i] = active.get(i, 0) + step
            if not active[i]:
                del active[i]
        slot = _useful(active, rules)
        if slot == slots[-1]:
            continue  # the interval before goes on
        if point == bounds[-1]:  # only 0
            slots[-1] = slot
        else:
            bounds.append(point)
            slots.append(slot)
    return bounds, slots


class RuleSet:
    """An ordered list of rules compiled for :meth:`decide`; immutable."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._ports = [r.ports for r in self.rules]
        self._tables = {p: _Table(self.rules, p) for p in ("tcp", "udp")}

    @classmethod
    def parse(cls, texts: Iterable[str]) -> RuleSet:
        """The rules ``texts`` say; a RuleError names the first bad one by position (from 1)."""
        if isinstance(texts, str):
            raise RuleError(texts, "expected a list of rules, not one string")
        rules = []
        for n, text in enumerate(texts, 1):
            try:
                rules.append(parse_rule(text))
            except RuleError as exc:
                raise RuleError(exc.text, exc.problem, n) from None
        return cls(rules)

    def texts(self) -> list[str]:
        return [r.text for r in self.rules]

    def __len__(self) -> int:
        return len(self.rules)

    def __eq__(self, other: object) -> bool:
        return self.texts() == other.texts() if isinstance(other, RuleSet) else NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self.texts()))

    def __repr__(self) -> str:
        return f"RuleSet({self.texts()!r})"

    def decide(self, ip: IPAddress | None, port: int, proto: str, name: str | None = None,
               own: Callable[[IPAddress, int], bool] | None = None) -> Rule | None:
        """The first rule that matches the destination, None when none does.

        ``ip``: the address to be dialed; None when only a name is known (then only name
        rules and ``*`` can match). ``name``: the host name asked for, None for an IP
        literal; name rules match on it alone. ``own(ip, port)``: whether that is one of
        the server's own listeners (the ``own`` set, which never matches without it).
        ``proto``: "tcp" or "udp"."""
        try:
            table = self._tables[proto]
        except KeyError:
            raise ValueError(f"proto is 'tcp' or 'udp', not {proto!r}") from None
        ports = self._ports
        best = len(ports)
        if ip is not None:
            if ip.version == 6 and (mapped := ip.ipv4_mapped) is not None:
                ip = mapped
            bounds, slots = table.v4 if ip.version == 4 else table.v6
            best = _first(slots[bisect_right(bounds, int(ip)) - 1], ports, port, best)
        names = () if name is None else _spellings(name)
        if table.exact or table.below:
            for n in names:
                best = _first(table.exact.get(n, ()), ports, port, best)
                while "." in n:
                    n = n.partition(".")[2]
                    best = _first(table.below.get(n, ()), ports, port, best)
        for i, kind, match in table.scan:
            if i >= best:
                break
            if _first((i,), ports, port, best) == i and (
                    kind == ANY or (kind == GLOB and any(match(n) for n in names))
                    or (kind == SET and own is not None and ip is not None and own(ip, port))):
                best = i
                break
        return self.rules[best] if best < len(ports) else None


def _first(candidates: tuple[int, ...], ports: list, port: int, best: int) -> int:
    """The first of ``candidates`` below ``best`` whose ports fit, else ``best``."""
    for i in candidates:
        if i >= best:
            break
        p = ports[i]
        if p is None:
            return i
        for lo, hi in p:
            if lo <= port <= hi:
                return i
    return best


@functools.cache
def builtin_user_defaults() -> RuleSet:
    """For users made through the API: nothing but the public internet."""
    return RuleSet.parse(["deny own", "deny loopback", "deny link-local", "deny unspecified",
                          "deny multicast", "deny private"])


@functools.cache
def builtin_token_defaults() -> RuleSet:
    """For tokens: anything but the server's own listeners."""
    return RuleSet.parse(["deny own"])
