"""Label recovery from the gradient of one image (Zhao et al. 2020, iDLG): the output layer's weight gradient is
(p - onehot(y)) h^T, and h >= 0 (it follows a ReLU and an average pool), so the row of the true label is the only
one whose entries are not positive."""

import torch

OUTPUT_WEIGHT = "fc.weight"  # the project's ResNets' output layer


def recover_label(output_weight_gradient: torch.Tensor) -> int:
    """The label of the one image whose gradient this output layer weight gradient ([classes, features]) is: the
    row with the most negative sum."""
    return int(output_weight_gradient.to(torch.float64).sum(dim=1).argmin())


def labels_present(output_weight_gradient: torch.Tensor) -> set[int]:
    """The labels present in a batch (or a sum of updates) whose gradient this is: the rows with a negative sum.
    This says which labels were there, not how many images had each, nor (for a sum) which learner had which."""
    return {int(row) for row in torch.nonzero(output_weight_gradient.to(torch.float64).sum(dim=1) < 0)}
