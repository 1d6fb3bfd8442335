import ipaddress

import pytest
from hypothesis import given, strategies as st

from tcpipstat.errors import UsageError
from tcpipstat.filters import AF_INET, AF_INET6, MAX_FILTERS, parse_filter, parse_filters


def v4(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def v6(a: str) -> int:
    return int(ipaddress.IPv6Address(a))


@pytest.mark.parametrize("text,tuple_,expected", [
    ("*.*.*.*:80-*:*", (AF_INET, v4("10.1.2.3"), 80, v4("1.2.3.4"), 5555), True),
    ("*.*.*.*:80-*:*", (AF_INET, v4("10.1.2.3"), 81, v4("1.2.3.4"), 5555), False),
    ("*.*.*.*:80-*:*", (AF_INET6, v6("::1"), 80, v6("::1"), 5555), False),  # dotted = IPv4
    ("*:80-*:*", (AF_INET6, v6("::1"), 80, v6("::1"), 5555), True),          # bare * = any family
    ("*.*.*.*:*-9.*.*.*:*", (AF_INET, v4("127.0.0.1"), 1, v4("9.8.7.6"), 2), True),
    ("*.*.*.*:*-9.*.*.*:*", (AF_INET, v4("127.0.0.1"), 1, v4("8.8.7.6"), 2), False),
    ("*.1.*.*:*-*:*", (AF_INET, v4("5.1.9.9"), 1, 0, 2), True),
    ("*.1.*.*:*-*:*", (AF_INET, v4("5.2.9.9"), 1, 0, 2), False),
    ("10.0.0.0/8:*-*:*", (AF_INET, v4("10.200.0.1"), 1, 0, 2), True),
    ("10.0.0.0/8:*-*:*", (AF_INET, v4("11.0.0.1"), 1, 0, 2), False),
    ("*:8000..8080-*:*", (AF_INET, 0, 8080, 0, 2), True),
    ("*:8000..8080-*:*", (AF_INET, 0, 8081, 0, 2), False),
    ("[::1]:*-*:*", (AF_INET6, v6("::1"), 1, 0, 2), True),
    ("[::1]:*-*:*", (AF_INET, v4("0.0.0.1"), 1, 0, 2), False),
    ("[2001:db8::/32]:*-*:443", (AF_INET6, v6("2001:db8:5::1"), 1, 0, 443), True),
    ("[2001:db8::/32]:*-*:443", (AF_INET6, v6("2001:db9::1"), 1, 0, 443), False),
])
def test_matches(text, tuple_, expected):
    assert parse_filter(text).matches(*tuple_) is expected


@pytest.mark.parametrize("text,token", [
    ("1.2.3:80-*:*", "1.2.3"),
    ("1.2.3.256:80-*:*", "256"),
    ("1.2.3.4:99999-*:*", "99999"),
    ("1.2.3.4:http-*:*", "http"),
    ("*:80", "*:80"),
    ("*:80-*:*-*:*", "*:80-*:*-*:*"),
    ("*:9..1-*:*", "9..1"),
    ("[::1:80-*:*", "[::1:80"),
    ("[zz::1]:80-*:*", "[zz::1]"),
    ("1.2.3.4/33:*-*:*", "1.2.3.4/33"),
    ("[::1]:*-1.2.3.4:*", "different families"),
    ("*:80-*:*;", "*:*;"),
    ("*:8\u0660-*:*", "only printable ASCII"),
    ("a b:1-*:*", "only printable ASCII"),
])
def test_rejects_naming_the_token(text, token):
    with pytest.raises(UsageError) as e:
        parse_filter(text)
    assert token in e.value.message


def test_too_many_filters_named():
    texts = [f"*:{p}-*:*" for p in range(MAX_FILTERS + 1)]
    with pytest.raises(UsageError) as e:
        parse_filters(texts)
    assert texts[-1] in e.value.message


def test_slots_are_signed_64bit_numbers():
    f = parse_filter("[ffff::/1]:1..2-*:*")
    slots = f.slots()
    assert len(slots) == 13
    assert all(-(1 << 63) <= s < (1 << 63) for s in slots)
    assert slots[0] == AF_INET6 and slots[5:7] == (1, 2)
    assert slots[2] < 0  # mask hi word 0x8000... is negative as a stap long


@given(st.text(max_size=60))
def test_any_text_is_a_filter_or_a_usage_error(text):
    try:
        f = parse_filter(text)
    except UsageError as e:
        assert e.message.startswith("bad filter")
        return
    assert all(isinstance(s, int) and -(1 << 63) <= s < (1 << 63) for s in f.slots())
