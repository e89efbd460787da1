"""tracer: which packet was dropped, where in the kernel, by which rule, and why."""

__version__ = "0.1.0"
