"""The containerd shim front end (``containerd-shim-runphi-v2``, DESIGN §13).

So far this package holds only the wire layer: :mod:`runphi.shim.ttrpc` (ttrpc framing,
server and client on trio) and :mod:`runphi.shim.proto` (the protobuf messages).
Nothing in the runc-compatible CLI or the verbs imports it, so verb processes stay lean.
"""
