"""Code that several processes need: wire formats, error codes, config, logging.

Nothing here opens a socket, runs an event loop or reads a clock (sans-I/O), and nothing
here imports ``broker``, ``gateway`` or ``workers``.
"""
