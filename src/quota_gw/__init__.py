"""quota-gw: a Redis-backed quota gateway for AI features."""

__version__ = "0.1.0"
