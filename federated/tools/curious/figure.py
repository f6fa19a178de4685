"""The curious leader's picture: the images learners trained on, above what the leader reconstructed from each
one's plain update and from its masked input under secure aggregation."""

from pathlib import Path

import torch


def displayable(image: torch.Tensor, gray: bool) -> torch.Tensor:
    """A normalised [1, C, H, W] image as [H, W, C] in 0..1 (gray: the mean of its channels, three times),
    stretched to its own range: a reconstruction is found only up to the brightness and contrast the model's
    normalisation layers remove."""
    pixels = image[0].permute(1, 2, 0)
    if gray:
        pixels = pixels.mean(dim=2, keepdim=True).expand(-1, -1, 3)
    return (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-12)


def draw(rows: dict[str, list[torch.Tensor]], path: str | Path, gray: bool = False) -> None:
    """One row of images per entry (its key the row's title), written as a PNG; gray: every image shown as the
    mean of its channels (for a grayscale data set, whose reconstructions still have three channels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for images in rows.values())
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 1.8 * len(rows)), squeeze=False)
    for row, (title, images) in zip(axes, rows.items()):
        row[0].set_title(title, loc="left", fontsize=9)
        for axis, image in zip(row, images):
            axis.imshow(displayable(image, gray).numpy(), interpolation="nearest")
        for axis in row:
            axis.axis("off")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
