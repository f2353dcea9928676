"""Our own aarch64 test guests (freestanding C, built with gcc-aarch64-linux-gnu).

See README.md; :func:`tools.inmates.build.ensure_built` builds them on demand."""
