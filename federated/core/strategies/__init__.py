"""Federated algorithms, one class per family, registered by name: FedSGD (the original article's), FedAvg, FedAvgM
and FedProx, the adaptive server optimizers, SCAFFOLD. A new algorithm is a class in a module here (registered with
@registry.register) and its tests; see docs/architecture.md."""

# Each module registers its classes as it is imported, in this order: the order --help lists strategies in.
# isort: off
from federated.core.strategies import fedsgd, fedavg, adaptive, scaffold  # noqa: F401

# isort: on
from federated.core.strategies.base import LocalTraining, Strategy, registry

named, names = registry.named, registry.names

__all__ = ["LocalTraining", "Strategy", "named", "names", "registry"]
