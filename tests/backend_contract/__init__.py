"""The backend contract: what every partitioning backend of runphi must do, one suite for all.

``contract.py`` is the vocabulary (guest behaviours, resources in use, the setup a
backend provides, the CLI driver), ``conftest.py`` the registry of backend setups,
``jailhouse_sim.py`` the Jailhouse-on-simulator setups and ``test_backend_contract.py``
the contract itself.
"""
