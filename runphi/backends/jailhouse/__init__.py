"""The Jailhouse backend: platform model, allocator, `.cell` writer/reader, driver.

``open_backend(config, warn)`` is what :mod:`runphi.backends.registry` calls; it
imports the backend lazily so that importing a submodule (e.g. the `.cell`
reader) stays cheap.
"""


def open_backend(config, warn):
    """The configured :class:`~runphi.backends.jailhouse.backend.JailhouseBackend`."""
    from runphi.backends.jailhouse.backend import JailhouseBackend

    return JailhouseBackend(config, warn=warn)
