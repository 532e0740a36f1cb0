"""IPMI sensors of BMCs, read with FreeIPMI's ``ipmi-sensors`` over RMCP+ (IPMI 2.0).

URL: ``ipmisensor://<user>:<password>@<host>[:<port>]/<sensor>[?<option>=<value>&...]``

* ``<sensor>`` is a FreeIPMI Record ID (the ``ID`` column of ``ipmi-sensors``) when it is all
  digits, else a sensor name (the ``Name`` column, percent-decoded, compared exactly).  A look-up
  by id is exact.  When several sensors share a name, the first one in SDR order (lowest record
  id) is read and a warning naming all their ids is logged once: use the id to pick another.
* ``<port>`` defaults to 623.  User and password are percent-decoded; either may be empty.
* Options, for BMCs that need them, are passed to ``ipmi-sensors``: ``workaround-flags``
  (e.g. ``opensesspriv``, which OpenIPMI's ipmi_sim needs), ``cipher-suite-id`` and
  ``privilege-level``.  They are part of the target key.  The system-wide
  /etc/freeipmi/freeipmi.conf is not read (our own config replaces it).

Readings: a numeric reading is stored through `make_reading` (so ``scale_factor`` applies).
A reading of ``N/A`` is skipped.  A discrete sensor (no reading, no unit, but an event state)
is stored as its event bitmask (bit n = state offset n of the IPMI sensor type, e.g. 1 =
"Presence detected" for a power supply); the event text is not stored because FreeIPMI prints
either the bitmask or the text, not both, and the bitmask is lossless and can be graphed.
No unit label is added: it would be wrong after a ``scale_factor`` and would grow every row.
FreeIPMI prints readings with two decimals, which is what is stored.  Each reading is stamped
with the midpoint between starting ``ipmi-sensors`` and receiving that BMC's last line.

How a BMC is read, and why: measured with benchmarks/ipmi_cost.py (50 ipmi_sim BMCs on
loopback, 3 sensors read per BMC and poll, 2 cores; client CPU per BMC poll, the BMCs' own CPU
not counted; wall = one round over the 50 BMCs):

=========================================================  ================  ================
approach                                                   8-sensor SDR      48-sensor SDR
=========================================================  ================  ================
one ``ipmi-sensors`` process per BMC                       6.2 ms,  242 ms   7.1 ms,  268 ms
one ``ipmi-sensors -h bmc1,...`` for all 50 (chosen)       1.9 ms,  104 ms   2.1 ms,  112 ms
pyghmi 1.6.19: sessions kept open, 16 threads              3.8 ms, 1490 ms   3.1 ms, 1287 ms
=========================================================  ================  ================

pyghmi saves the session set-up but reads sensor by sensor in Python threads: it costs more
CPU than the shared process, is over ten times slower per round, and a thread stuck in it cannot be
killed.  So every poll goes through ``ipmi-sensors``, and the polls of BMCs that share
credentials, options, timeout and wanted record ids, and arrive within `BATCH_WINDOW_S` of each
other, share one process (up to `MAX_HOSTS_PER_PROCESS` hosts, which FreeIPMI reads in
parallel threads).  Each BMC's readings are handed back as soon as its lines are in, so a dead
BMC delays no other.

What a poll costs and leaves behind:

* Only the wanted record ids are read (``-r``).  Names are resolved, and ids checked, from one
  full listing of the BMC, made on the first poll and again after a failure, after the SDR
  changed under us, or every `RELIST_INTERVAL_S` while some wanted sensor is unknown.
* The SDR cache is kept in a private directory (mode 0700) between polls;
  ``--sdr-cache-recreate`` lets FreeIPMI rebuild it only when the BMC reports a newer SDR or
  the file is invalid, and a failed poll deletes that BMC's cache file so the next one
  rebuilds it.  The directory is removed when the last collector using it is closed.
* Credentials are written to the child's stdin, read as its config file
  (``--config-file=/dev/stdin``): never in argv, the environment, a file or a log.
* Hard timeout: FreeIPMI's own session timeout is set below the collector timeout, and at the
  deadline (or when every waiting poll is cancelled) the process group of ``ipmi-sensors``
  is killed with SIGKILL and reaped.

The package, by concern: `url` (metric URLs into target keys), `output` (ipmi-sensors' CSV
lines), `sdr_cache` (the private SDR cache directory), `pool` (the shared ``ipmi-sensors``
processes) and `collector` (one BMC's sensors: names resolved to record ids).
"""

from kwollect.protocols.ipmi.collector import IpmiCollector, open_collector, target_key
from kwollect.protocols.ipmi.output import Row, parse_row
from kwollect.protocols.ipmi.pool import (
    BATCH_WINDOW_S,
    MAX_HOSTS_PER_PROCESS,
    IpmiError,
    _conf_quote,
    _pools,
)
from kwollect.protocols.ipmi.url import SCHEMES, SensorRef, Target, parse_url

# _conf_quote and _pools are for the tests (config quoting; no pool left behind)
__all__ = ["BATCH_WINDOW_S", "MAX_HOSTS_PER_PROCESS", "SCHEMES", "IpmiCollector", "IpmiError",
           "Row", "SensorRef", "Target", "_conf_quote", "_pools", "open_collector", "parse_row",
           "parse_url", "target_key"]
