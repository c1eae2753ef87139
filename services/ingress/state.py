"""Typed keys of the ingress app's state."""

from aiohttp import web

from boxoffice.bus import Bus

BUS = web.AppKey("bus", Bus)
