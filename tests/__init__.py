"""boxoffice's tests, against real servers.

- ``test_*.py`` hold tests, and no other module imports them.
- ``conftest.py`` holds every fixture more than one test file uses.
- ``harness.py``: the servers' credentials, the services as real processes, their metrics, and
  ``eventually``, the one way a test waits for something.
- ``<family>_support.py``: the helpers of one family of test files (``webhooks_support`` for
  ``test_webhooks_*.py`` and so on).
- The stand-ins, named by what they stand in for: ``stripe_keys_proxy`` and
  ``stripe_lists_proxy`` (Stripe's behaviour in front of localstripe), ``compose_images`` (the
  images of docker-compose.yml), and the fault run's parts (``fault_*.py``); ``db_grants`` is
  the grants the database roles should hold.
"""
