"""The servers the benchmark compares, each run as its own process.

Every Python peer is a module here with a ``main()``; it serves ``GET /events`` (one stream of the
channel ``bench``) on ``--port`` and takes the benchmark's publish commands on ``--control-port``
(see `tornado_sse.bench.peers.common`), so that events are published *inside* the server process
by the same driver for every peer and the publisher is never the bottleneck. Nchan is the
exception: nginx cannot run our driver, so its events are POSTed by the load generator.
"""
