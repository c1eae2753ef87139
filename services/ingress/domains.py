"""Ingress's domains, each one module that registers its own routes (``setup(app)``) and declares
their lines of the OpenAPI document next to them (``routes``, a ``routing.Routes``).

The app factory (``main.create_app``) sets them up in this order and ``contract`` documents them.
Order matters where paths overlap: ``sentry_admin``'s ``/v1/admin/errors/dropped`` before
``error_groups``' ``/v1/admin/errors/{group_id}``; ``error_reports`` (the rate limiter) before
``sentry_ingest``.
"""

from __future__ import annotations

from boxoffice.ingress import (
                               action_log,
                               checkout,
                               console,
                               error_groups,
                               error_reports,
                               hold_expiry,
                               self_audit,
                               sentry_admin,
                               sentry_ingest,
                               ticketed_events,
                               webhooks,
)

ALL = (
    ticketed_events,   # operators: ticketed events and their inventory
    action_log,        # operators: the action log
    hold_expiry,       # operators: holds' expiry and the reaper's runs
    self_audit,        # operators: the invariants
    checkout,          # holds and PaymentIntents (client token); the PaymentIntent keys' log
    webhooks,          # Stripe's deliveries, and the operators' view of them
    error_reports,     # client error reports
    sentry_ingest,     # the Sentry protocol
    sentry_admin,      # operators: what Sentry SDKs send besides errors
    error_groups,      # operators: error groups
    console,           # the operators' console: page, session, live feed
)
