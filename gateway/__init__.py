"""The WebSocket gateway: the browser protocol, HTTP (web/, /health, /metrics)."""
