"""Socket filters: ``<laddr>:<lport>-<raddr>:<rport>``.

The classic tcpipstat.stp grammar, extended:

* address: ``*`` (any address, either family); dotted IPv4 whose octets may each
  be ``*`` (``10.*.*.*``; ``*.*.*.*`` is any IPv4 address); IPv4 CIDR
  (``10.0.0.0/8``); IPv6 in brackets, optionally CIDR (``[::1]``, ``[2001:db8::/32]``).
* port: ``*``, a number 0-65535, or a range ``LOW..HIGH``.

A filter compiles to value/mask pairs and port ranges (:meth:`Filter.slots`),
which reach the collector as one module parameter per filter, a string of hex
digits (16 for each of its FILTER_FIELDS; see render.module_args): the text a
user types never reaches the script.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import UsageError

MAX_FILTERS = 16
# Order matters: the script reads tis_F[i, n] by position (stp_templates/tcpipstat.stp.j2).
FILTER_FIELDS = ("fam", "lah", "lmh", "lal", "lml", "lplo", "lphi",
                 "rah", "rmh", "ral", "rml", "rplo", "rphi")

AF_ANY, AF_INET, AF_INET6 = 0, 2, 10
_U64 = (1 << 64) - 1


def _s64(v: int) -> int:
    """An unsigned 64-bit value as the signed long SystemTap stores."""
    v &= _U64
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class AddrMatch:
    family: int      # AF_ANY, AF_INET or AF_INET6
    value: int       # 128-bit for IPv6, 32-bit for IPv4 (host order)
    mask: int

    def matches(self, family: int, addr: int) -> bool:
        if self.family and self.family != family:
            return False
        return (addr & self.mask) == self.value

    def halves(self) -> tuple[int, int, int, int]:
        """(value_hi, mask_hi, value_lo, mask_lo) as the script compares them."""
        return (_s64(self.value >> 64), _s64(self.mask >> 64),
                _s64(self.value & _U64), _s64(self.mask & _U64))


@dataclass(frozen=True)
class PortMatch:
    low: int = 0
    high: int = 65535

    def matches(self, port: int) -> bool:
        return self.low <= port <= self.high


@dataclass(frozen=True)
class Filter:
    text: str
    local: AddrMatch
    lport: PortMatch
    remote: AddrMatch
    rport: PortMatch

    @property
    def family(self) -> int:
        return self.local.family or self.remote.family

    def matches(self, family: int, laddr: int, lport: int, raddr: int, rport: int) -> bool:
        """The same test the script makes (used by tests and by offline checks)."""
        fam = self.family
        if fam and fam != family:
            return False
        return (self.local.matches(family, laddr) and self.lport.matches(lport)
                and self.remote.matches(family, raddr) and self.rport.matches(rport))

    def slots(self) -> tuple[int, ...]:
        lah, lmh, lal, lml = self.local.halves()
        rah, rmh, ral, rml = self.remote.halves()
        return (self.family, lah, lmh, lal, lml, self.lport.low, self.lport.high,
                rah, rmh, ral, rml, self.rport.low, self.rport.high)


_PORT = re.compile(r"^[0-9]{1,5}$")


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"bad filter '{text}': {why}")


def parse_port(tok: str, text: str, side: str) -> PortMatch:
    if tok == "*":
        return PortMatch()
    parts = tok.split("..")
    if len(parts) > 2 or not all(_PORT.match(p) for p in parts):
        raise _bad(text, f"{side} port '{tok}' is not *, a number 0-65535 or LOW..HIGH")
    nums = [int(p) for p in parts]
    for n in nums:
        if n > 65535:
            raise _bad(text, f"{side} port '{tok}': {n} is over 65535")
    low, high = nums[0], nums[-1]
    if low > high:
        raise _bad(text, f"{side} port range '{tok}' is empty ({low} > {high})")
    return PortMatch(low, high)


def parse_addr(tok: str, text: str, side: str) -> AddrMatch:
    if tok == "*":
        return AddrMatch(AF_ANY, 0, 0)
    if tok.startswith("["):
        if not tok.endswith("]") or len(tok) < 3:
            raise _bad(text, f"{side} address '{tok}': an IPv6 address goes in [brackets]")
        inner = tok[1:-1]
        if "%" in inner:     # (ipaddress accepts a scope and the match would drop it)
            raise _bad(text, f"{side} address '{tok}': a scope (%{inner.partition('%')[2]}) "
                             "cannot be matched: give the address alone")
        try:
            net = ipaddress.IPv6Network(inner, strict=False)
        except ValueError:
            raise _bad(text, f"{side} address '{tok}' is not an IPv6 address or prefix") from None
        return AddrMatch(AF_INET6, int(net.network_address), int(net.netmask))
    if "/" in tok:
        try:
            net = ipaddress.IPv4Network(tok, strict=False)
        except ValueError:
            why = f"{side} address '{tok}' is not an IPv4 prefix like 10.0.0.0/8"
            raise _bad(text, why) from None
        return AddrMatch(AF_INET, int(net.network_address), int(net.netmask))
    octets = tok.split(".")
    if len(octets) != 4:
        raise _bad(text, f"{side} address '{tok}' needs 4 octets (or *, a.b.c.d/len, [ipv6])")
    value = mask = 0
    for o in octets:
        value <<= 8
        mask <<= 8
        if o == "*":
            continue
        if not o.isdigit() or not o.isascii() or len(o) > 3 or int(o) > 255:
            raise _bad(text, f"{side} address '{tok}': octet '{o}' is not * or 0-255")
        value |= int(o)
        mask |= 0xFF
    return AddrMatch(AF_INET, value, mask)


def _split_side(part: str, text: str, side: str) -> tuple[str, str]:
    if part.startswith("["):
        close = part.find("]")
        if close < 0 or close + 1 >= len(part) or part[close + 1] != ":":
            raise _bad(text, f"{side} side '{part}' must be [ipv6]:port")
        return part[:close + 1], part[close + 2:]
    if part.count(":") != 1:
        raise _bad(text, f"{side} side '{part}' must be address:port")
    addr, port = part.split(":")
    return addr, port


def parse_filter(text: str) -> Filter:
    if not text or len(text) > 200:
        raise _bad(text[:60], "empty or too long")
    if not text.isascii() or not text.isprintable() or " " in text:
        raise _bad(text, "only printable ASCII without spaces is allowed")
    halves = text.split("-")
    if len(halves) != 2 or not all(halves):
        raise _bad(text, "expected <laddr>:<lport>-<raddr>:<rport>")
    la, lp = _split_side(halves[0], text, "local")
    ra, rp = _split_side(halves[1], text, "remote")
    local, remote = parse_addr(la, text, "local"), parse_addr(ra, text, "remote")
    if local.family and remote.family and local.family != remote.family:
        raise _bad(text, "local and remote addresses are of different families")
    return Filter(text, local, parse_port(lp, text, "local"),
                  remote, parse_port(rp, text, "remote"))




def parse_filters(texts: list[str]) -> list[Filter]:
    if len(texts) > MAX_FILTERS:
        raise UsageError(f"too many filters ({len(texts)}): at most {MAX_FILTERS}; "
                         f"'{texts[MAX_FILTERS]}' is one too many")
    return [parse_filter(t) for t in texts]
