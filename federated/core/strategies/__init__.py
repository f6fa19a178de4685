"""Federated algorithms, one class per family, registered by name: FedSGD (the original article's), FedAvg, FedAvgM
and FedProx, the adaptive server optimizers, SCAFFOLD. A new algorithm is a class in a module here (registered with
@registry.register) and its tests; see docs/architecture.md."""

# isort: off  (the registration order is the order --help lists the strategies in)
from federated.core.strategies import adaptive, fedavg, fedsgd, scaffold  # noqa: F401  (each registers its classes)

# isort: on
from federated.core.strategies.base import LocalTraining, Strategy, registry

named, names = registry.named, registry.names

__all__ = ["LocalTraining", "Strategy", "named", "names", "registry"]
