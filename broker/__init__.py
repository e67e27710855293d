"""The ZeroMQ broker: load-balances requests from gateways across workers by credits."""
