"""runphi: an OCI runtime that runs partitioned containers as Jailhouse cells."""

__version__ = "0.1.0"
OCI_SPEC_VERSION = "1.0.2"
