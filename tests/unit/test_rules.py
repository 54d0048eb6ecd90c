"""trisocks.policy.rules: the destination rules language, its errors, and the compiled
first-match lookup (checked against a naive linear reference)."""

from __future__ import annotations

import fnmatch
import ipaddress
from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trisocks.policy import rules as rules_module
from trisocks.policy.rules import (
    NAMED_SETS,
    Rule,
    RuleError,
    RuleSet,
    builtin_token_defaults,
    builtin_user_defaults,
    parse_rule,
)

A = ip_address


def decide(texts, ip, port=80, proto="tcp", name=None, own=None):
    """The canonical text of the deciding rule, or None."""
    rule = RuleSet.parse(texts).decide(None if ip is None else A(ip), port, proto, name, own)
    return None if rule is None else rule.text


# --- parsing and the canonical form ---------------------------------------------------------

@pytest.mark.parametrize("text, canonical, kind, target", [
    ("deny *", "deny *", "any", "*"),
    ("DENY TCP *:*", "deny tcp *", "any", "*"),
    ("allow 127.0.0.1", "allow 127.0.0.1", "address", A("127.0.0.1")),
    ("allow udp 127.0.0.1:53", "allow udp 127.0.0.1:53", "address", A("127.0.0.1")),
    ("deny ::1", "deny ::1", "address", A("::1")),
    ("deny [::1]:80", "deny [::1]:80", "address", A("::1")),
    ("deny [0:0::1]", "deny ::1", "address", A("::1")),
    ("deny [fe80::1:22]", "deny [fe80::1:22]", "address", A("fe80::1:22")),  # ::1:22 alone is ambiguous
    ("deny 10.0.0.0/8", "deny 10.0.0.0/8", "network", ip_network("10.0.0.0/8")),
    ("deny 10.0.0.0/255.0.0.0", "deny 10.0.0.0/8", "network", ip_network("10.0.0.0/8")),
    ("deny fc00::/7", "deny fc00::/7", "network", ip_network("fc00::/7")),
    ("deny tcp [FC00::/7]:443", "deny tcp [fc00::/7]:443", "network", ip_network("fc00::/7")),
    ("deny 10.0.0.5-10.0.0.9:22", "deny 10.0.0.5-10.0.0.9:22", "range", (A("10.0.0.5"), A("10.0.0.9"))),
    ("deny 10.0.0.5-10.0.0.5", "deny 10.0.0.5", "address", A("10.0.0.5")),
    ("deny ::1-::5", "deny ::1-::5", "range", (A("::1"), A("::5"))),
    ("deny [::1-::5]:1-9", "deny [::1-::5]:1-9", "range", (A("::1"), A("::5"))),
    ("deny Example.COM.", "deny example.com", "name", "example.com"),
    ("deny .example.com", "deny .example.com", "domain", "example.com"),
    ("deny *.example.com:443", "deny *.example.com:443", "subdomains", "example.com"),
    ("deny api-*.Example.com", "deny api-*.example.com", "glob", "api-*.example.com"),
    ("deny *example.com", "deny *example.com", "glob", "*example.com"),
    ("deny host?.lan", "deny host?.lan", "glob", "host?.lan"),
    ("deny **", "deny **", "glob", "**"),
    ("deny _sip._udp.example.com", "deny _sip._udp.example.com", "name", "_sip._udp.example.com"),
    ("deny bücher.de", "deny xn--bcher-kva.de", "name", "xn--bcher-kva.de"),
    ("deny .BÜCHER.de", "deny .xn--bcher-kva.de", "domain", "xn--bcher-kva.de"),
    ("deny *.例え.jp", "deny *.xn--r8jz45g.jp", "subdomains", "xn--r8jz45g.jp"),
    ("deny Loopback:22", "deny loopback:22", "set", "loopback"),
    ("deny own", "deny own", "set", "own"),
    ("deny own.", "deny own.", "name", "own"),  # the host called own
    ("deny localhost", "deny localhost", "name", "localhost"),
    # IPv4-mapped targets are the IPv4 they map
    ("deny ::ffff:127.0.0.1", "deny 127.0.0.1", "address", A("127.0.0.1")),
    ("deny [::ffff:10.0.0.0/104]:22", "deny 10.0.0.0/8:22", "network", ip_network("10.0.0.0/8")),
    ("deny ::ffff:10.0.0.1-::ffff:10.0.0.9", "deny 10.0.0.1-10.0.0.9", "range",
     (A("10.0.0.1"), A("10.0.0.9"))),
    ("deny 2001:db8::/32", "deny 2001:db8::/32", "network", ip_network("2001:db8::/32")),
    ("  allow\ttcp   example.com:80  ", "allow tcp example.com:80", "name", "example.com"),
])
def test_targets_parse_to_their_canonical_form(text, canonical, kind, target):
    rule = parse_rule(text)
    assert (rule.text, rule.kind, rule.target) == (canonical, kind, target)
    assert str(rule) == canonical
    assert parse_rule(canonical) == rule  # the canonical form reads back as the same rule


@pytest.mark.parametrize("text, ports, shown", [
    ("deny *:80", ((80, 80),), "80"),
    ("deny *:8000-8100", ((8000, 8100),), "8000-8100"),
    ("deny *:443,80,8000-8100", ((80, 80), (443, 443), (8000, 8100)), "80,443,8000-8100"),
    ("deny *:80,81,82-90,85", ((80, 90),), "80-90"),  # sorted and merged
    ("deny *:0", ((0, 0),), "0"),
    ("deny *:0-65535", None, None),  # every port is any port
    ("deny *:0-100,101-65535", None, None),
    ("deny *:*", None, None),
    ("deny *", None, None),
])
def test_ports(text, ports, shown):
    rule = parse_rule(text)
    assert rule.ports == ports
    assert rule.text == ("deny *" if shown is None else f"deny *:{shown}")


def test_rule_is_frozen_and_keeps_action_and_proto():
    rule = parse_rule("Allow UDP 10.0.0.0/8:53")
    assert (rule.action, rule.proto) == ("allow", "udp")
    assert parse_rule("deny 10.0.0.0/8").proto is None
    with pytest.raises(AttributeError):
        rule.action = "deny"


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, says", [
    ("", ["empty rule", "ACTION [tcp|udp] TARGET[:PORTS]"]),
    ("   ", ["empty rule"]),
    ("permit 10.0.0.0/8", ["'permit' is not an action", "allow or deny"]),
    ("deny", ["no target after 'deny'"]),
    ("deny tcp", ["no target after 'tcp'"]),
    ("deny 10.0.0.0/8 22", ["unexpected '22'", "after a colon: 10.0.0.0/8:22"]),
    ("deny icmp 10.0.0.1", ["unexpected '10.0.0.1' after the target 'icmp'", "ACTION [tcp|udp]"]),
    ("deny 10.0.0.0/8 tcp", ["unexpected 'tcp'", "ACTION [tcp|udp] TARGET"]),
    ("deny 10.0.0.1/8", ["10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"]),
    ("deny fc00::1/7", ["has host bits set; did you mean fc00::/7?"]),
    ("deny 10.0.0.0/33", ["prefix length is 0 to 32 for IPv4"]),
    ("deny ::/129", ["prefix length is 0 to 128 for IPv6"]),
    ("deny 10.0.0.0/x", ["prefix length"]),
    ("deny 10.0.0.300/8", ["'10.0.0.300' is not an IP address"]),
    ("deny 10.0.0.9-10.0.0.5", ["starts after it ends; did you mean 10.0.0.5-10.0.0.9?"]),
    ("deny 10.0.0.1-::1", ["mixes IPv4 and IPv6"]),
    ("deny 10.0.0.1-foo", ["'foo' is not an IP address"]),
    ("deny 10.0.0.256", ["looks like an IPv4 address but is not one"]),
    ("deny 1.2.3", ["looks like an IPv4 address"]),
    ("deny 80", ["'80' is not a target", "write *:80"]),
    ("deny ::1:80", ["ambiguous", "[::1]:80 for port 80 of ::1", "[::1:80] for the address"]),
    ("deny fe80::1:22", ["ambiguous", "[fe80::1]:22"]),
    ("deny fe80::1-fe80::1:22", ["ambiguous", "[fe80::1-fe80::1]:22"]),
    ("deny fc00::/7:443", ["bracketed: [fc00::/7]:443"]),
    ("deny ::1:*", ["bracketed: [::1]:*"]),
    ("deny [::1", ["never closes", "[IPV6]:PORTS"]),
    ("deny [::1]80", ["expected ':PORTS' after ']'"]),
    ("deny [10.0.0.1]:80", ["brackets are for IPv6 only; write 10.0.0.1:80"]),
    ("deny [loopback]", ["brackets are for IPv6 only"]),
    ("deny fe80::1%eth0", ["zone ids"]),
    ("deny [::1]:", ["nothing after ':'", "80, 8000-8100 or 80,443"]),
    ("deny 10.0.0.1:", ["nothing after ':'"]),
    ("deny :80", ["no target before ':80'"]),
    ("deny *:70000", ["70000 is out of range; ports are 0 to 65535"]),
    ("deny *:1-65536", ["out of range"]),
    ("deny *:8100-8000", ["port range 8100-8000 is backwards; did you mean 8000-8100?"]),
    ("deny *:80,,443", ["an empty item in ports '80,,443'"]),
    ("deny *:80,", ["an empty item"]),
    ("deny *:http", ["'http' is not a port or range"]),
    ("deny *:+80", ["'+80' is not a port"]),
    ("deny *:80,*", ["'*' is not a port"]),
    ("deny *:١٢", ["is not a port"]),  # Arabic-Indic digits: int() would take them
    ("deny a..b", ["is not an address, CIDR, range, set or host name", "1 to 63"]),
    ("deny " + "a" * 64 + ".com", ["1 to 63"]),
    ("deny " + "a." * 127 + "com", ["at most 253 characters"]),
    ("deny exa$mple.com", ["is not an address, CIDR, range, set or host name"]),
    ("deny .", ["is not an address"]),
    ("deny *.", ["write * for any destination"]),
    ("deny .api-*.example.com", ["leading dot does not mix with wildcards",
                                 "*.api-*.example.com or api-*.example.com"]),
    ("deny bü*.de", ["xn-- form to use wildcards"]),
    ("deny straße.de", ["IDNA 2003 and IDNA 2008 spell ß differently", "xn-- form"]),
    ("deny \udcff.com", ["not a valid internationalised host name"]),
    ("deny [::g]:80", ["'::g' is not an IP address"]),
])
def test_errors_say_what_is_wrong(text, says):
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    message = str(info.value)
    quoted = repr(text if len(text) <= 120 else text[:120] + "...")
    assert message.startswith(quoted), message  # the rule is quoted
    for part in says:
        assert part in message, message
    assert isinstance(info.value, ValueError)
    assert info.value.text == text and info.value.index is None


def test_error_quotes_a_long_rule_shortened_and_refuses_non_strings():
    with pytest.raises(RuleError) as info:
        parse_rule("deny " + "x" * 5000 + " y")
    assert len(str(info.value)) < 200 and "at most 1000 characters" in str(info.value)
    with pytest.raises(RuleError) as info:
        parse_rule("deny " + "x" * 900 + " y")
    assert len(str(info.value)) < 1200
    with pytest.raises(RuleError, match="a rule is a string, not int"):
        parse_rule(22)


def test_ruleset_errors_name_the_rule_by_position():
    with pytest.raises(RuleError) as info:
        RuleSet.parse(["allow 10.0.0.1", "deny private", "deny 10.0.0.1/8", "deny x y"])
    assert str(info.value).startswith("rule 3: 'deny 10.0.0.1/8': 10.0.0.1/8 has host bits set")
    assert info.value.index == 3
    with pytest.raises(RuleError, match="a list of rules, not one string"):
        RuleSet.parse("deny *")


# --- first match ------------------------------------------------------------------------------

def test_first_match_wins_in_list_order():
    assert decide(["allow 10.0.0.5", "deny 10.0.0.0/8"], "10.0.0.5") == "allow 10.0.0.5"
    assert decide(["deny 10.0.0.0/8", "allow 10.0.0.5"], "10.0.0.5") == "deny 10.0.0.0/8"
    assert decide(["allow 10.0.0.5", "deny 10.0.0.0/8"], "10.0.0.6") == "deny 10.0.0.0/8"
    assert decide(["allow 10.0.0.5", "deny 10.0.0.0/8"], "11.0.0.1") is None
    # across kinds: a name rule before an address rule and the reverse
    both = dict(ip="10.0.0.5", name="db.internal")
    assert decide(["allow db.internal", "deny private"], **both) == "allow db.internal"
    assert decide(["deny private", "allow db.internal"], **both) == "deny private"
    assert decide(["allow *", "deny loopback"], "127.0.0.1") == "allow *"
    assert decide(["deny loopback", "allow *"], "127.0.0.1") == "deny loopback"
    assert decide(["allow api-*.example.com", "deny .example.com"], None,
                  name="api-1.example.com") == "allow api-*.example.com"
    assert decide(["deny .example.com", "allow api-*.example.com"], None,
                  name="api-1.example.com") == "deny .example.com"


def test_ports_and_proto_filter():
    rules = ["deny tcp 10.0.0.0/8:22", "allow udp 10.0.0.0/8:53,5353", "deny 10.0.0.0/8:1000-2000",
             "allow 10.0.0.0/8"]
    assert decide(rules, "10.1.2.3", 22, "tcp") == "deny tcp 10.0.0.0/8:22"
    assert decide(rules, "10.1.2.3", 22, "udp") == "allow 10.0.0.0/8"
    assert decide(rules, "10.1.2.3", 53, "udp") == "allow udp 10.0.0.0/8:53,5353"
    assert decide(rules, "10.1.2.3", 5353, "udp") == "allow udp 10.0.0.0/8:53,5353"
    assert decide(rules, "10.1.2.3", 53, "tcp") == "allow 10.0.0.0/8"
    assert decide(rules, "10.1.2.3", 1000, "tcp") == "deny 10.0.0.0/8:1000-2000"
    assert decide(rules, "10.1.2.3", 2000, "udp") == "deny 10.0.0.0/8:1000-2000"
    assert decide(rules, "10.1.2.3", 2001, "udp") == "allow 10.0.0.0/8"
    assert decide(["deny *:0"], "1.1.1.1", 0) == "deny *:0"
    assert decide(["deny tcp example.com:443"], None, 443, "udp", name="example.com") is None
    with pytest.raises(ValueError, match="'tcp' or 'udp'"):
        decide(["deny *"], "1.1.1.1", 80, "icmp")


def test_ipv6_targets():
    rules = ["deny tcp [::1]:80", "deny [fc00::/7]:443", "deny [2001:db8::1-2001:db8::ff]:1-1024",
             "allow ::/0"]
    assert decide(rules, "::1", 80) == "deny tcp [::1]:80"
    assert decide(rules, "::1", 81) == "allow ::/0"
    assert decide(rules, "fd12::1", 443, "udp") == "deny [fc00::/7]:443"
    assert decide(rules, "2001:db8::ff", 1024) == "deny [2001:db8::1-2001:db8::ff]:1-1024"
    assert decide(rules, "2001:db8::100", 1024) == "allow ::/0"
    assert decide(rules, "127.0.0.1", 80) is None  # families stay apart
    assert decide(["deny 0.0.0.0/0"], "::1") is None
    scoped = ipaddress.IPv6Address("fe80::1%eth0")
    assert RuleSet.parse(["deny link-local"]).decide(scoped, 80, "tcp").text == "deny link-local"


@pytest.mark.parametrize("ip", ["::ffff:127.0.0.1", "::ffff:7f00:1", "0:0:0:0:0:ffff:127.1.2.3"])
def test_ipv4_mapped_addresses_are_their_ipv4_address(ip):
    assert decide(["deny loopback"], ip) == "deny loopback"
    assert decide(["deny 127.0.0.0/8"], ip) == "deny 127.0.0.0/8"
    assert decide(["deny ::ffff:127.0.0.0/104"], ip) == "deny 127.0.0.0/8"
    assert decide(builtin_user_defaults().texts(), ip) == "deny loopback"
    assert decide(["deny ::/0"], ip) is None  # it is an IPv4 destination


def test_other_ipv4_embeddings_stay_ipv6():
    # documented: compatible, 6to4 and NAT64 forms are routed as the IPv6 addresses they are
    for ip in ("::127.0.0.1", "2002:7f00:1::", "64:ff9b::7f00:1"):
        assert decide(["deny loopback"], ip) is None
    assert decide(["deny 64:ff9b::/96"], "64:ff9b::a00:1") == "deny 64:ff9b::/96"


def test_name_rules_exact_domain_subdomains_and_globs():
    rules = RuleSet.parse(["deny exact.com", "deny .domain.com", "deny *.sub.com",
                           "deny api-*.glob.com", "deny h?st.q.com"])

    def hit(name):
        rule = rules.decide(None, 443, "tcp", name=name)
        return None if rule is None else rule.text

    assert hit("exact.com") == "deny exact.com"
    assert hit("EXACT.COM.") == "deny exact.com"
    assert hit("www.exact.com") is None
    assert hit("domain.com") == "deny .domain.com"
    assert hit("a.b.domain.com") == "deny .domain.com"
    assert hit("xdomain.com") is None
    assert hit("sub.com") is None  # *. is only what is below
    assert hit("a.sub.com") == "deny *.sub.com"
    assert hit("a.b.sub.com") == "deny *.sub.com"
    assert hit("api-1.glob.com") == "deny api-*.glob.com"
    assert hit("api-x.y.glob.com") == "deny api-*.glob.com"  # fnmatch: * crosses dots
    assert hit("API-1.GLOB.COM.") == "deny api-*.glob.com"
    assert hit("api.glob.com") is None
    assert hit("host.q.com") == "deny h?st.q.com"
    assert hit("hoost.q.com") is None
    assert hit("com") is None
    # name rules need the name: an IP literal target (name None) never meets them
    assert rules.decide(A("1.2.3.4"), 443, "tcp") is None


def test_idna_names():
    rules = RuleSet.parse(["deny bücher.de", "deny .xn--r8jz45g.jp", "deny xn--strae-oqa.de"])
    assert rules.decide(None, 80, "tcp", name="xn--bcher-kva.de").text == "deny xn--bcher-kva.de"
    assert rules.decide(None, 80, "tcp", name="BÜCHER.de").text == "deny xn--bcher-kva.de"
    assert rules.decide(None, 80, "tcp", name="bücher.de。").text == "deny xn--bcher-kva.de"
    assert rules.decide(None, 80, "tcp", name="www.例え.jp").text == "deny .xn--r8jz45g.jp"
    # straße.de is xn--strae-oqa.de to the resolver (IDNA 2008), strasse.de to IDNA 2003
    assert rules.decide(None, 80, "tcp", name="straße.de").text == "deny xn--strae-oqa.de"
    assert RuleSet.parse(["deny strasse.de"]).decide(None, 80, "tcp", name="straße.de")
    assert rules.decide(None, 80, "tcp", name="\udcff.de") is None  # no ASCII form at all


def test_own_callback():
    calls = []

    def own(ip, port):
        calls.append((ip, port))
        return ip == A("192.0.2.1") and port == 1080

    rules = RuleSet.parse(["deny own", "allow *"])
    assert rules.decide(A("192.0.2.1"), 1080, "tcp", own=own).text == "deny own"
    assert rules.decide(A("::ffff:192.0.2.1"), 1080, "tcp", own=own).text == "deny own"
    assert calls[-1] == (A("192.0.2.1"), 1080)  # asked with the address normalised
    assert rules.decide(A("192.0.2.1"), 1081, "tcp", own=own).text == "allow *"
    assert rules.decide(A("192.0.2.1"), 1080, "tcp").text == "allow *"  # no callback: never
    calls.clear()
    assert rules.decide(None, 1080, "tcp", name="me", own=own).text == "allow *"
    assert calls == []  # nothing to ask about without an address
    # a rule before it decides first: the callback is not asked
    assert RuleSet.parse(["deny loopback", "deny own"]).decide(
        A("127.0.0.1"), 1080, "tcp", own=own).text == "deny loopback"
    assert calls == []
    # the set's ports filter before the callback is asked
    assert RuleSet.parse(["deny own:22"]).decide(A("192.0.2.1"), 1080, "tcp", own=own) is None
    assert calls == []


def test_name_only_destinations():
    rules = ["deny loopback", "deny 10.0.0.0/8", "deny .corp", "deny own", "allow tcp *:443"]
    assert decide(rules, None, 443, name="x.corp") == "deny .corp"
    assert decide(rules, None, 443, name="localhost") == "allow tcp *:443"
    assert decide(rules, None, 80, name="localhost", own=lambda ip, port: True) is None
    assert decide(rules, None, 443) == "allow tcp *:443"  # neither address nor name
    assert decide(["deny *"], None) == "deny *"


def test_defaults():
    users = builtin_user_defaults()
    assert users.texts() == ["deny own", "deny loopback", "deny link-local", "deny unspecified",
                             "deny multicast", "deny private"]
    assert builtin_token_defaults().texts() == ["deny own"]
    expect = {"127.0.0.1": "deny loopback", "::1": "deny loopback",
              "169.254.169.254": "deny link-local", "fe80::1": "deny link-local",
              "0.0.0.0": "deny unspecified", "::": "deny unspecified",
              "224.0.0.251": "deny multicast", "ff02::1": "deny multicast",
              "10.1.1.1": "deny private", "172.31.0.1": "deny private",
              "192.168.0.1": "deny private", "100.64.0.1": "deny private", "fd00::1": "deny private",
              "8.8.8.8": None, "172.32.0.1": None, "2606:4700::1111": None}
    for ip, rule in expect.items():
        got = users.decide(A(ip), 443, "udp")
        assert (got and got.text) == rule, ip
    own = lambda ip, port: port == 1080  # noqa: E731
    assert users.decide(A("8.8.8.8"), 1080, "tcp", own=own).text == "deny own"
    assert builtin_token_defaults().decide(A("10.0.0.1"), 80, "tcp") is None
    assert builtin_token_defaults().decide(A("10.0.0.1"), 80, "tcp", own=own) is None


def test_named_sets_are_listed_and_used():
    assert set(NAMED_SETS) == {"loopback", "link-local", "private", "multicast", "unspecified", "own"}
    assert NAMED_SETS["own"] == ()
    for set_name, members in NAMED_SETS.items():
        rules = RuleSet.parse([f"deny {set_name}"])
        for member in members:
            net = ip_network(member)
            for ip in (net.network_address, net.broadcast_address):
                assert rules.decide(ip, 1, "tcp").text == f"deny {set_name}"


def test_ruleset_basics():
    a = RuleSet.parse(["deny  Loopback", "allow tcp *:443"])
    b = RuleSet([parse_rule("deny loopback"), parse_rule("allow tcp *:443")])
    assert a == b and hash(a) == hash(b) and a != RuleSet.parse(["deny loopback"])
    assert a.texts() == ["deny loopback", "allow tcp *:443"]
    assert len(a) == 2 and bool(a) and not RuleSet([]) and len(RuleSet.parse([])) == 0
    assert RuleSet([]).decide(A("1.1.1.1"), 80, "tcp", name="x") is None
    assert "deny loopback" in repr(a)
    assert a.rules[0] == parse_rule("deny loopback")


# --- the compiled lookup ----------------------------------------------------------------------

def test_500_rules_touch_few_candidates(monkeypatch):
    texts = [f"deny tcp 10.{i // 256}.{i % 256}.0/24:{1000 + i}" for i in range(200)]
    texts += [f"deny 172.16.{i}.1-172.16.{i}.200" for i in range(100)]
    texts += [f"allow host{i}.example.com" for i in range(100)]
    texts += [f"deny .zone{i}.example" for i in range(99)]
    texts += ["deny own"]
    assert len(texts) == 500
    rules = RuleSet.parse(texts)
    table = rules._tables["tcp"]
    bounds, slots = table.v4
    assert len(bounds) == len(slots) <= 2 * 300 + 1
    assert max(map(len, slots)) == 1  # each interval holds the one rule covering it
    assert bounds == sorted(bounds)
    assert rules._tables["udp"].v4[1].count(()) > 0 and len(rules._tables["udp"].v4[0]) <= 201
    assert [i for i, _, _ in table.scan] == [499]  # only 'own' is scanned

    touched = []
    real_first = rules_module._first

    def counting_first(candidates, ports, port, best):
        touched.append(len(candidates))
        return real_first(candidates, ports, port, best)

    monkeypatch.setattr(rules_module, "_first", counting_first)
    own_calls = []

    def own(ip, port):
        own_calls.append(ip)
        return False

    rule = rules.decide(A("10.0.150.7"), 1150, "tcp", own=own)
    assert rule.text == "deny tcp 10.0.150.0/24:1150"
    assert sum(touched) == 1 and own_calls == []
    touched.clear()
    assert rules.decide(A("10.0.150.7"), 1151, "tcp", own=own) is None  # port does not fit
    assert sum(touched) == 2 and len(own_calls) == 1  # the interval's rule, then 'own'
    touched.clear()
    rule = rules.decide(A("203.0.113.9"), 80, "tcp", name="a.b.zone42.example", own=own)
    assert rule.text == "deny .zone42.example"
    assert sum(touched) == 1 and len(own_calls) == 1  # one candidate, and 'own' comes later


def test_a_rule_for_any_port_ends_the_candidates():
    texts = ["deny 10.0.0.0/8"] + [f"allow 10.0.0.0/8:{p}" for p in range(1, 500)]
    rules = RuleSet.parse(texts)
    bounds, slots = rules._tables["tcp"].v4
    assert max(map(len, slots)) == 1
    texts = [f"allow 10.0.0.0/8:{p}" for p in range(1, 10)] + ["deny 10.0.0.0/8", "allow *:5"]
    rules = RuleSet.parse(texts)
    assert max(map(len, rules._tables["tcp"].v4[1])) == 10
    assert rules.decide(A("10.9.9.9"), 5, "tcp").text == "allow 10.0.0.0/8:5"
    assert rules.decide(A("10.9.9.9"), 50, "tcp").text == "deny 10.0.0.0/8"


# --- the compiled lookup against a naive linear reference ------------------------------------

def reference_decide(rules, ip, port, proto, name, own):
    """The first rule that matches, trying each in turn, straight from the rules' fields."""
    if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if name is not None:
        name = name.lower()
        name = name[:-1] if name.endswith(".") else name
    for rule in rules:
        if rule.proto not in (None, proto):
            continue
        if rule.ports is not None and not any(lo <= port <= hi for lo, hi in rule.ports):
            continue
        if matches(rule, ip, port, name, own):
            return rule
    return None


def matches(rule, ip, port, name, own):
    kind, target = rule.kind, rule.target
    if kind == "any":
        return True
    if kind in ("address", "network", "range", "set"):
        if ip is None:
            return False
        if kind == "address":
            return ip == target
        if kind == "network":
            return ip.version == target.version and ip in target
        if kind == "range":
            return ip.version == target[0].version and target[0] <= ip <= target[1]
        if target == "own":
            return own is not None and own(ip, port)
        return any(ip.version == n.version and ip in n for n in map(ip_network, NAMED_SETS[target]))
    if name is None:
        return False
    if kind == "name":
        return name == target
    if kind == "domain":
        return name == target or name.endswith("." + target)
    if kind == "subdomains":
        return name.endswith("." + target)
    return fnmatch.fnmatchcase(name, target)


# a small universe, so that rules and destinations meet often
SMALL_V4 = st.integers(0x0A000000, 0x0A000007)  # 10.0.0.0-7
SMALL_V6 = st.integers(0xFC00 << 112, (0xFC00 << 112) + 7)  # fc00::-fc00::7
V4 = st.one_of(SMALL_V4, SMALL_V4, SMALL_V4, st.integers(0, 2**32 - 1),
               st.sampled_from(["127.0.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1",
                                "192.168.1.1", "100.64.0.1", "8.8.8.8", "255.255.255.255"]).map(
                   lambda s: int(A(s)))).map(ipaddress.IPv4Address)
V6 = st.one_of(SMALL_V6, SMALL_V6, st.integers(0, 0xF), st.integers(0, 2**128 - 1),
               st.sampled_from(["fe80::1", "ff02::1", "::", "fd00::1", "2001:db8::1"]).map(
                   lambda s: int(A(s)))).map(ipaddress.IPv6Address)
MAPPED = V4.map(lambda a: ipaddress.IPv6Address((0xFFFF << 32) | int(a)))
ADDR = st.one_of(V4, V6, MAPPED)
PORT = st.sampled_from([0, 1, 22, 53, 80, 443, 1080, 65535])
LABEL = st.sampled_from(["a", "b", "api-1", "example", "com"])
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


def bracketed(target, ports):
    """IPv6 always in brackets: unbracketed, '::ffff:a00:1' would be ambiguous."""
    target = f"[{target}]" if ":" in target else target
    return target if ports is None else f"{target}:{ports}"


@st.composite
def rule_texts(draw):
    kind = draw(st.sampled_from(["address", "address", "network", "network", "network", "range",
                                 "range", "set", "name", "domain", "subdomains", "glob", "any"]))
    if kind == "address":
        target = str(draw(ADDR))
    elif kind == "network":
        ip = draw(ADDR)
        bits = ip.max_prefixlen
        prefix = draw(st.one_of(st.integers(0, bits), st.integers(bits - 4, bits)))
        target = str(ip_network((int(ip) >> (bits - prefix) << (bits - prefix), prefix)))
    elif kind == "range":
        family = draw(st.sampled_from([V4, V6, MAPPED]))
        a = draw(family)
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            top = (0xFFFF << 32) | 0xFFFFFFFF
            b = ipaddress.IPv6Address(min(int(a) + draw(st.integers(0, 12)), top))
        else:
            b = type(a)(min(int(a) + draw(st.integers(0, 12)), 2**a.max_prefixlen - 1))
            if isinstance(b, ipaddress.IPv6Address) and (b.ipv4_mapped is None) != (a.ipv4_mapped is None):
                b = a
        target = f"{a}-{b}"
    elif kind == "set":
        target = draw(st.sampled_from(sorted(NAMED_SETS)))
    elif kind == "any":
        target = "*"
    else:
        name = draw(NAME)
        if kind == "glob":
            labels = name.split(".")
            i = draw(st.integers(0, len(labels) - 1))
            labels[i] = draw(st.sampled_from(["*", "a*", "?", "api-?", "*-1"]))
            name = ".".join(labels)
        target = {"domain": ".", "subdomains": "*."}.get(kind, "") + name
        if draw(st.booleans()):
            target = target.upper()
    ports = draw(st.one_of(st.none(), st.just("*"), st.lists(
        st.tuples(PORT, st.sampled_from([0, 0, 1, 30, 500])).map(
            lambda t: f"{t[0]}" if not t[1] else f"{t[0]}-{min(t[0] + t[1], 65535)}"),
        min_size=1, max_size=3).map(",".join)))
    action = draw(st.sampled_from(["allow", "deny"]))
    proto = draw(st.sampled_from(["", "tcp ", "udp "]))
    return f"{action} {proto}{bracketed(target, ports)}"


OWN = st.one_of(st.none(), st.sets(ADDR, max_size=3).map(
    lambda owned: (lambda ip, port: ip in owned or port == 1080)))


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(rule_texts(), max_size=25),
       queries=st.lists(st.tuples(st.one_of(st.none(), ADDR), PORT, st.sampled_from(["tcp", "udp"]),
                                  st.one_of(st.none(), NAME, NAME.map(str.upper),
                                            NAME.map(lambda n: n + "."))), min_size=1, max_size=8),
       own=OWN)
def test_compiled_lookup_agrees_with_a_linear_scan(texts, queries, own):
    rules = RuleSet.parse(texts)
    for ip, port, proto, name in queries:
        expected = reference_decide(rules.rules, ip, port, proto, name, own)
        assert rules.decide(ip, port, proto, name, own) is expected, (texts, ip, port, proto, name)


@settings(max_examples=200, deadline=None)
@given(rule_texts())
def test_canonical_text_reads_back_as_the_same_rule(text):
    rule = parse_rule(text)
    assert parse_rule(rule.text) == rule
    assert isinstance(rule, Rule)
