"""Playing the kubelet: a CRI client and a private node (containerd with the CRI plugin,
a runphi runtime handler, a simulated Jailhouse board) for runphi's CRI tests.

* :mod:`tests.cri.client` compiles ``runtime_v1_subset.proto`` with grpcio-tools
  into a temporary directory and wraps the RuntimeService/ImageService stubs.
* :mod:`tests.cri.node` starts and tears down the node, builds the local pause
  and busybox image and the ZIC images, and reports leftovers.
"""
