"""Sysgram: a syscall anomaly-detection agent for Linux hosts.

Public API: the exception tree (:mod:`agent.errors`) and the event types (:mod:`agent.events`).
Each room (capture, proc, model, falco, seccomp, verdict, respond) has a small public surface in its
package ``__init__``; everything in a module whose name starts with ``_`` is private.
"""

__version__ = "0.1.0"
