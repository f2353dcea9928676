"""The Jailhouse backend: platform model, allocator, `.cell` writer/reader, driver.

``open_backend(ctx)`` is what :meth:`runphi.context.Context.backend` calls; it
imports the backend lazily so that importing a submodule (e.g. the `.cell`
reader) stays cheap.
"""


def open_backend(ctx):
    """The configured :class:`~runphi.backends.jailhouse.backend.JailhouseBackend`."""
    from runphi.backends.jailhouse.backend import open_backend as _open

    return _open(ctx)
