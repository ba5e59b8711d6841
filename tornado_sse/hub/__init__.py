"""The standalone hub, ``tornado-sse serve`` (being moved here from ``tornado_sse.server``).

``access.py``: who may follow, publish and scrape.
"""
