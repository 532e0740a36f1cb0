"""SNMP: GET many OIDs per request from v1/v2c agents (lean codec) and v3 agents (puresnmp).

URLs
----
``snmp://<community>@<host>[:<port>]/<oid>[?<options>]``
    SNMP v2c, UDP port 161 by default (the reference form).
``snmpv1://<community>@<host>[:<port>]/<oid>[?<options>]``
    SNMP v1.
``snmpv3://<user>[:<authkey>[:<privkey>]]@<host>[:<port>]/<oid>[?auth=SHA|MD5][&priv=AES|DES][&<options>]``
    SNMP v3 (USM): noAuthNoPriv with no key, authNoPriv with an auth key, authPriv with both.
    ``auth`` defaults to SHA (SHA-1) and ``priv`` to AES (AES-128); keys are at least 8
    characters. AES/DES need the puresnmp-crypto package.

A community or key containing ``:``, ``@``, ``/``, ``?``, ``#`` or ``%`` is percent-encoded.
Error messages show ``snmp://***@host:port`` and ``snmpv3://user@host:port``, never a secret.

``<oid>`` is dotted decimal, with or without a leading dot, or a template
``<prefix>.{{ <walk_oid> == <value> }}[.<suffix>]``: <walk_oid> is walked and the index of the
first entry (in OID order) whose value equals <value> takes the template's place, e.g.
``1.3.6.1.2.1.2.2.1.10.{{ 1.3.6.1.2.1.2.2.1.2 == eth0 }}`` is ifInOctets of eth0. <value> is
taken literally up to ``}}`` (it may hold spaces, ``/`` or ``?``) and compared with each
entry's text, both stripped; numbers compare by their decimal text. Templates are resolved
at the first poll, every ``resolve_every`` seconds, and at the next poll after a templated
OID reads as missing (at most once per period, so a permanently missing one costs no walk
per poll). A template that matches nothing is logged and its metric skipped.

Options (target-wide: metrics of one agent that differ in them are polled separately):
``max_varbinds`` OIDs per GET (default 50); ``max_inflight`` GETs in flight at once
(default 4; v3 always 1); ``resolve_every`` seconds between template resolutions (default 300).

Values: INTEGER, Counter32/64, Gauge32 and TimeTicks are numbers; strings go through
`make_reading` (NaN with ``labels.value_str`` unless the text is a number). An OID the agent
does not have (noSuchObject, noSuchInstance, endOfMibView, v1 noSuchName) gives no reading
and is logged once until it has a value again. tooBig splits the GET in two.

Each reading is stamped with the midpoint of its own GET exchange. An agent that answers
none of a poll's GETs within the timeout makes `collect` raise `SnmpTimeout`; a closed port
raises `SnmpUnreachable` (both name the target, never its secrets).

The package, by concern: `url` (parsing and validating metric URLs into target keys), `codec`
(the lean BER codec of v1/v2c), `session` (one agent's GET and walk exchanges, v1/v2c and v3)
and `collector` (batching a poll's OIDs into GETs, templates, missing OIDs).
"""

from kwollect.protocols.snmp.collector import SnmpCollector, open_collector, target_key
from kwollect.protocols.snmp.session import SnmpError, SnmpTimeout, SnmpUnreachable
from kwollect.protocols.snmp.url import SCHEMES, OidSpec, SnmpTarget, parse_url, safe_url

__all__ = ["SCHEMES", "OidSpec", "SnmpCollector", "SnmpError", "SnmpTarget", "SnmpTimeout",
           "SnmpUnreachable", "open_collector", "parse_url", "safe_url", "target_key"]
