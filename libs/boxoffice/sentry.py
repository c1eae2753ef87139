"""sentry-sdk for boxoffice's own services: production only, traces at 10%, scrubbed events.

Every service reports to the bus whatever happens; when ``SENTRY_DSN`` is set and
``BOXOFFICE_ENV=production`` it also reports to that Sentry (or to any Sentry-protocol server,
ingress's own envelope endpoint included). Events pass through ``boxoffice.scrub`` first.
"""

from __future__ import annotations

from typing import Any

from boxoffice import scrub

_KEEP = ("event_id", "timestamp", "start_timestamp", "platform", "sdk", "contexts")


def scrub_event(event: dict[str, Any], hint: Any = None) -> dict[str, Any]:
    """``before_send`` for sentry-sdk: the same scrubbing as the error-sink's."""
    kept = {k: event[k] for k in _KEEP if k in event}
    out = scrub.value(event)
    out.update(kept)
    if "contexts" in event:  # trace ids stay; everything else in contexts is scrubbed
        contexts = scrub.value({k: v for k, v in event["contexts"].items() if k != "trace"})
        if "trace" in event["contexts"]:
            contexts["trace"] = event["contexts"]["trace"]
        out["contexts"] = contexts
    return out


def init(cfg: Any, *, transport: Any = None) -> bool:
    """Report through sentry-sdk as well, in production only, when ``SENTRY_DSN`` is set."""
    if not cfg.sentry_dsn or cfg.env != "production":
        return False
    import sentry_sdk

    sentry_sdk.init(dsn=cfg.sentry_dsn, environment=cfg.env, release=cfg.release,
                    traces_sample_rate=0.1, send_default_pii=False,
                    before_send=scrub_event,  # type: ignore[arg-type]  # (an Event is a dict)
                    before_send_transaction=scrub_event,  # type: ignore[arg-type]
                    server_name=cfg.service,
                    transport=transport)
    sentry_sdk.set_tag("service", cfg.service)
    return True
