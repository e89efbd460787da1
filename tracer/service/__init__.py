"""The daemon: `tracer run` under systemd (config file, outputs, spool, metrics, notify)."""
