"""boxoffice: the reliability backbone of a ticket-selling platform.

The shared library: configuration, the NATS bus, the PostgreSQL pool, wire types,
structured logs, error reporting and the runtime every service runs in.
"""

SERVICES = ("ingress", "payment", "webhook", "error_sink", "reaper")

__version__ = "0.1.0"
