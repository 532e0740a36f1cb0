"""The contract every protocol shares: target keys, URL parsing and redaction, secrets,
shared connections."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from kwollect.errors import KwollectError, TargetTimeout, TargetUnreachable
from kwollect.model import MetricDescription
from kwollect.protocols import PROTOCOL_MODULES, protocol_for, target_key
from kwollect.protocols import url as urls
from kwollect.protocols.http_common import FetchError
from kwollect.protocols.ipmi import IpmiError
from kwollect.protocols.sharing import SharedRegistry
from kwollect.protocols.snmp import SnmpError, SnmpTimeout, SnmpUnreachable

# one URL per protocol, with a password (or community) to hide and an option that exists
EXAMPLES = {
    "snmp": "snmp://s3cret@pdu-1:1161/1.3.6.1.2.1.1.3.0?max_varbinds=10",
    "prometheus": "prometheus://u:s3cret@exporter-1:9100/node_load1?path=/metrics",
    "ipmi": "ipmisensor://admin:s3cret@bmc-1/Pwr%20Consumption?privilege-level=user",
    "modbus": "modbus://meter-1/1/0x10?kind=input",
    "httpjson": "json+https://u:s3cret@bmc-1/redfish/v1/Power?jsonpath=$.x&insecure=1",
}
OPTION = {"snmp": "max_varbinds", "prometheus": "path", "ipmi": "privilege-level",
          "modbus": "kind", "httpjson": "jsonpath"}


def metric(url: str) -> MetricDescription:
    return MetricDescription(name="m", device_id="d", url=url, update_every_ms=1000)


def test_every_protocol_module_fulfils_the_contract():
    assert set(EXAMPLES) == set(PROTOCOL_MODULES)
    for name in PROTOCOL_MODULES:
        module = importlib.import_module(f"kwollect.protocols.{name}")
        assert module.SCHEMES and all(s == s.lower() for s in module.SCHEMES)
        assert callable(module.target_key) and callable(module.open_collector)
        assert protocol_for(metric(EXAMPLES[name]))[0] == name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_target_keys_are_immutable_hashable_and_show_no_secret(name: str):
    protocol, key = target_key(metric(EXAMPLES[name]))
    assert protocol == name
    assert hash(key) == hash(target_key(metric(EXAMPLES[name]))[1])
    if dataclasses.is_dataclass(key):
        assert type(key).__dataclass_params__.frozen  # type: ignore[attr-defined]
    else:
        assert isinstance(key, tuple)  # Modbus: a NamedTuple (host, port)
    for text in (repr(key), str(key), key.label):
        assert "s3cret" not in text
    assert key.label.split("://")[0] in ("snmp", "ipmisensor", "modbus", "http", "https")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_repeated_option_is_one_error_wording_everywhere(name: str):
    url = EXAMPLES[name]
    value = url.split(f"{OPTION[name]}=")[1].split("&")[0]
    with pytest.raises(ValueError, match=f"option '{OPTION[name]}' given twice") as raised:
        target_key(metric(f"{url}&{OPTION[name]}={value}"))
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("name", ["snmp", "ipmi", "modbus"])
def test_an_unknown_option_is_one_error_wording_everywhere(name: str):
    with pytest.raises(ValueError, match=r"unknown option 'colour' \(known: ") as raised:
        target_key(metric(EXAMPLES[name] + "&colour=red"))
    shown = urls.redact_url(EXAMPLES[name], secret_user=name == "snmp")
    assert str(raised.value).startswith(shown)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("name", ["prometheus", "httpjson"])
def test_http_protocols_pass_unknown_query_parameters_to_the_server(name: str):
    _, key = target_key(metric(EXAMPLES[name] + "&module=if_mib"))
    assert key.url.endswith("?module=if_mib")


@pytest.mark.parametrize(("url", "complaint"), [
    ("snmp://s3cret@h:0/1.3", "invalid port"),
    ("modbus://h:65536/1/0", "invalid port"),
    ("prometheus://u:s3cret@:80/", "no host"),
    ("ipmisensor://u:s3cret@[::1/1", "malformed URL"),
    ("json+https://u:s3cret@h/p?insecure=maybe#a", "bad value 'maybe': insecure must be"),
    ("modbus://h/1/0?max_span=12x", "bad value '12x': max_span must be an integer"),
    ("snmpv3://ops:authkey123@h/1.3?auth=sha256", "bad value 'sha256': auth must be one of"),
    ("modbus://h/1/0", None),
])
def test_url_mistakes_are_worded_alike(url: str, complaint: str | None):
    if complaint is None:
        target_key(metric(url))
        return
    with pytest.raises(ValueError, match=complaint) as raised:
        target_key(metric(url))
    assert "s3cret" not in str(raised.value)


def test_redaction_hides_the_password_or_the_whole_community():
    shown = urls.redact_url("x://u:p%40ss@Host:99999/a?b=c@d#e")
    assert shown == "x://u:***@Host:99999/a?b=c@d#e"
    assert urls.redact_url("x://:pw@h/") == "x://***@h/"
    assert urls.redact_url("x://user@h/p") == "x://user@h/p"
    shown = urls.redact_url("snmp://public@[::1]:161/1.3", secret_user=True)
    assert shown == "snmp://***@[::1]:161/1.3"
    assert urls.redact_url("x://h/path@with-at") == "x://h/path@with-at"
    assert urls.redact_url("not a url") == "not a url"


def test_split_url_decodes_credentials_and_applies_the_default_port():
    parts = urls.split_url("Prom+HTTPS://us%40er:p%3Ass@[FE80::1]/a", ("prom", "prom+https"),
                      "Prometheus", {"prom": 80, "prom+https": 443})
    assert (parts.scheme, parts.username, parts.password, parts.host, parts.port) == (
        "prom+https", "us@er", "p:ss", "fe80::1", 443)
    assert isinstance(parts.password, urls.Secret)
    assert urls.split_url("x://u@h:8/", ("x",), "X", 1).password is None
    assert urls.split_url("x://h/", ("x",), "X", 1).username is None


def test_typed_options_read_their_values():
    parts = urls.split_url("x://h/?n=0x1F&f=2.5&c=aes&raw=a+b%20c", ("x",), "X", 1)
    options = (urls.Option("n", urls.integer(0, 255, hexadecimal=True)),
               urls.Option("f", urls.number(0)),
               urls.Option("c", urls.choice(("AES", "DES"), upper=True)))
    values, forwarded = urls.read_options(parts, options, forward_unknown=True)
    assert values == {"n": 31, "f": 2.5, "c": "AES"}
    assert forwarded == ["raw=a+b%20c"]
    for text in ("-1", "+1", "1_0", " 1", "256", "", "9" * 5000):
        with pytest.raises(ValueError, match="must be an integer in 0..255"):
            urls.integer(0, 255)(text)
    for text in ("inf", "nan", "-1", "x"):
        with pytest.raises(ValueError, match="finite number"):
            urls.number(0)(text)


def test_a_secret_shows_stars_but_compares_and_encodes_as_its_value():
    secret = urls.Secret("hunter2")
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!s}", f"{secret:>9}",
                  "%s" % (secret,), repr([secret]), repr({"k": secret})):  # noqa: UP031
        assert "hunter2" not in shown
    assert secret == "hunter2" and hash(secret) == hash("hunter2")
    assert secret.encode() == b"hunter2" and secret.reveal() == "hunter2"
    assert type(secret.reveal()) is str and len(secret) == 7


def test_shared_registry_makes_once_and_hands_back_on_last_release():
    made: list[str] = []
    registry: SharedRegistry[str, list[str]] = SharedRegistry()

    def make() -> list[str]:
        made.append("x")
        return ["conn"]

    first = registry.acquire("gw", make)
    assert registry.acquire("gw", make) is first and made == ["x"]
    assert registry.users("gw") == 2
    assert registry.release("gw") is None and registry == {"gw": first}
    assert registry.release("gw") is first and registry == {}
    assert registry.acquire("gw", make) is not first and made == ["x", "x"]


def test_protocol_errors_share_the_kwollect_roots():
    assert issubclass(SnmpTimeout, TargetTimeout) and issubclass(SnmpTimeout, TimeoutError)
    assert issubclass(SnmpUnreachable, TargetUnreachable)
    assert issubclass(SnmpUnreachable, ConnectionError)
    for error in (SnmpError, IpmiError, FetchError):
        assert issubclass(error, KwollectError)
