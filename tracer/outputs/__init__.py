"""Where events go: sinks (base.py), the non-blocking fd writer (writer.py), stdout (stdout.py)."""
