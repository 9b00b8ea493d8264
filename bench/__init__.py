"""Load benchmark of the gateway: ``python -m bench`` (see README "Performance").

It starts everything it measures on 127.0.0.1 (redis-server, an nginx upstream, the test OpenID
Provider, the gateway), drives load with ``wrk``, and prints one Markdown table. Nothing here is
imported by the gateway; it reuses the test helpers in ``tests/support`` to start the provider
and Redis and to log in like a browser, so the benchmark and the integration tests exercise the
gateway the same way.
"""
