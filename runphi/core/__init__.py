"""The ZIC core: what every front end (the runc-compatible CLI, the containerd shim) does
with a partitioned container, over any backend (DESIGN §1).

Front ends parse their protocol and call in here; the core talks to hypervisors only
through :class:`runphi.backends.base.Backend`, which it gets from the one registry,
:mod:`runphi.backends.registry`. The ZIC's long-lived process (:mod:`runphi.monitor`)
belongs to this layer too: the core spawns it and undoes it, never a backend.
"""
