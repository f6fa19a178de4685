"""Splits a training set's indices among learners, IID or non-IID, and records the split as JSON, a plot and log lines.

Schemes (SCHEMES), all seeded and returning sorted, disjoint int64 index tensors, one per learner:
- iid: equal shards of a seeded shuffle, the remainder left out (utils.shard_indices).
- dirichlet: label skew. For each class, proportions over learners are drawn from Dirichlet(alpha) and the
  class's samples are split accordingly: alpha 100 is close to IID, alpha 0.01 gives each class to about
  one learner. Shard sizes differ.
- dirichlet-equal: label skew with equal shard sizes, drawn the other way round (Hsu et al. 2019): each
  learner's class proportions from Dirichlet(alpha per class, scaled by the class's share), its equal share of
  samples dealt from them. Works for any number of learners the data covers (1,000 learners of 10,000 images),
  where dirichlet's whole-split redraws find no split with every shard big enough.
- classes: pathological label skew (McMahan et al. 2017): each learner holds classes_per_learner classes.
- quantity: quantity skew. IID labels, shard sizes drawn from Dirichlet(alpha) over learners.
Every learner gets at least min_samples samples (default 1; a leader passes its batch size), or the call
raises ValueError saying what to change.
"""

import json
from pathlib import Path

import numpy as np
import torch

import utils

SCHEMES = ("iid", "dirichlet", "dirichlet-equal", "classes", "quantity")
FLAGS = {
    "iid": (),
    "dirichlet": ("alpha",),
    "dirichlet-equal": ("alpha",),
    "classes": ("classes_per_learner",),
    "quantity": ("alpha",),
}  # they read
# A whole Dirichlet split is redrawn while some learner gets fewer than min_samples, as common implementations
# do (they loop without bound). A draw costs classes x learners numbers, so 1000 draws take well under a second;
# a request that fails them all is unrealistic for its alpha, not unlucky.
MAX_DIRICHLET_DRAWS = 1000
SUMMARY_CLASSES = 6  # a log line names at most this many classes, so it stays short for CIFAR-100 and the like
SUMMARY_LEARNERS = 20  # the log describes at most this many learners' shards, so 1,000 learners take 21 lines
LEGEND_CLASSES = 20  # more classes than this get a colour bar instead of a legend
SEPARATE_BARS = 100  # the most learners whose bars the plot keeps apart (as wide as a screen)


def partition(
    labels: torch.Tensor,
    num_learners: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_learner: int = 2,
    num_classes: int | None = None,
    min_samples: int = 1,
) -> list[torch.Tensor]:
    """The indices of labels that each of num_learners learners gets under scheme (see SCHEMES and the module
    docstring), a pure function of its arguments. alpha is used by dirichlet and quantity, classes_per_learner
    by classes; num_classes defaults to the largest label + 1; every learner gets at least min_samples.
    Raises ValueError, saying what to change, when the request cannot be met."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    num_classes = _check_request(labels, num_learners, num_classes, min_samples)
    # numpy seeds must be non-negative; the modulus keeps distinct seeds (as torch takes them) distinct
    rng = np.random.default_rng(seed % 2**64)
    if scheme == "iid":
        shards = utils.shard_indices(len(labels), num_learners, seed)
    elif scheme == "dirichlet":
        shards = _dirichlet(labels, num_learners, num_classes, _checked_alpha(alpha), min_samples, rng)
    elif scheme == "dirichlet-equal":
        shards = _dirichlet_equal(labels, num_learners, num_classes, _checked_alpha(alpha), rng)
    elif scheme == "classes":
        shards = _classes(labels, num_learners, num_classes, classes_per_learner, rng)
    else:
        shards = _quantity(len(labels), num_learners, _checked_alpha(alpha), min_samples, rng)
    small = [learner for learner, shard in enumerate(shards) if len(shard) < min_samples]
    if small:
        raise ValueError(
            f"{scheme} partition: learners {small[:10]} would get fewer than {min_samples} samples "
            f"of {len(labels)}; use fewer learners"
        )
    return shards


def _check_request(labels: torch.Tensor, num_learners: int, num_classes: int | None, min_samples: int) -> int:
    """The number of classes, after checking that every learner can get min_samples labels in range."""
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, not {labels.dtype} of shape {tuple(labels.shape)}")
    if num_learners < 1 or min_samples < 1:
        raise ValueError(f"need at least 1 learner and 1 sample each, not {num_learners} and {min_samples}")
    if num_learners * min_samples > len(labels):
        raise ValueError(
            f"cannot give {num_learners} learners {min_samples} of {len(labels)} samples each: "
            f"use at most {len(labels) // min_samples} learners"
        )
    top = int(labels.max()) + 1
    if labels.min() < 0 or (num_classes is not None and top > num_classes):
        raise ValueError(f"labels must lie in 0..{(num_classes or top) - 1}; found {int(labels.min())}..{top - 1}")
    return num_classes or top


def _checked_alpha(alpha: float) -> float:
    if not 0 < alpha < float("inf"):
        raise ValueError(f"alpha must be a positive number (0.1: strong skew, 100: nearly IID), not {alpha}")
    return alpha


def _dirichlet(
    labels: torch.Tensor, num_learners: int, num_classes: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Label skew by a Dirichlet(alpha) over learners per class, as Yurochkin et al. 2019 and the NIID-Bench
    of Li et al. 2022 implement it. Hsu et al. 2019 draw the other way round, a class distribution per
    learner from Dirichlet(alpha * prior); both tend to IID as alpha grows and to one class per learner as
    alpha shrinks. The whole split is redrawn, up to MAX_DIRICHLET_DRAWS times, until every learner holds at
    least min_samples samples; then ValueError."""
    groups = _shuffled_classes(labels, num_classes, rng)
    totals = np.array([len(group) for group in groups])
    for _ in range(MAX_DIRICHLET_DRAWS):
        counts = _split_counts(totals, rng.dirichlet(np.full(num_learners, alpha), size=num_classes))
        if counts.sum(0).min() >= min_samples:
            return _deal(groups, counts)
    raise ValueError(
        f"dirichlet partition: in {MAX_DIRICHLET_DRAWS} draws with alpha {alpha}, some of the "
        f"{num_learners} learners always got fewer than {min_samples} of {len(labels)} samples; "
        f"use a larger alpha or fewer learners"
    )


def _dirichlet_equal(
    labels: torch.Tensor, num_learners: int, num_classes: int, alpha: float, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Label skew with equal shards: each learner's class proportions drawn from Dirichlet(alpha x K x the class
    shares), K classes (so that, with balanced classes, every class's concentration is alpha, as each learner's
    mix is under dirichlet; Hsu et al.'s alpha, the concentrations' sum, is this alpha x K), then
    len(labels) // num_learners samples dealt to it by those proportions, learners in a seeded order. A class that
    runs out is left out of later draws (their proportions renormalised over the classes left), so the last
    learners dealt (about 5 % of 1,000 at alpha 0.1) take what the others left rather than their draw. Dealt in
    passes of one sample a learner instead, the shortage spread over every learner and the shards came out less
    skewed than dirichlet's at the same alpha (a largest class of 0.45 of a shard against 0.55, 10 learners at
    alpha 0.1; dealt a learner at a time, 0.56). The remainder is left out, as iid leaves it."""
    groups = _shuffled_classes(labels, num_classes, rng)
    left = np.array([len(group) for group in groups])
    present = left > 0
    mixes = np.zeros((num_learners, num_classes))
    mixes[:, present] = rng.dirichlet(alpha * present.sum() * left[present] / left.sum(), size=num_learners)
    counts = np.zeros((num_classes, num_learners), dtype=np.int64)
    for learner in rng.permutation(num_learners):
        counts[:, learner] = _draw_counts(len(labels) // num_learners, mixes[learner], left, rng)
        left -= counts[:, learner]
    return _deal(groups, np.column_stack([counts, left]))[:-1]  # (the last column: what is left out)


def _draw_counts(size: int, mix: np.ndarray, left: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """size samples' classes drawn by mix among the classes with samples left (at most what each has left): what
    a class cannot give is drawn again among those that still can (by mix, or evenly where mix gives them none)."""
    counts = np.zeros_like(left)
    while (short := size - counts.sum()) > 0:
        open_ = left - counts > 0
        weights = np.where(open_, mix, 0.0)
        weights = weights if weights.sum() > 0 else open_.astype(float)
        counts += np.minimum(rng.multinomial(short, weights / weights.sum()), left - counts)
    return counts


def _classes(
    labels: torch.Tensor, num_learners: int, num_classes: int, per_learner: int, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Pathological label skew: each learner holds exactly per_learner classes, and a class's samples are
    split evenly among the learners holding it.

    McMahan et al. 2017 sort by label and give each learner per_learner random pieces of equal size. That
    matches the request only when class sizes are multiples of the piece size: on the synthetic set (class
    sizes 967..1026) half the pieces straddle two classes and 10 learners with 2 pieces each hold 1 to 4
    classes. So the classes are assigned explicitly, which makes every learner's histogram show exactly
    per_learner classes (fewer only where a class has fewer samples than learners holding it)."""
    present = labels.bincount(minlength=num_classes).nonzero().flatten()
    if not 1 <= per_learner <= len(present):
        raise ValueError(
            f"use classes_per_learner between 1 and {len(present)} (the classes present in the "
            f"labels), not {per_learner}"
        )
    if num_learners * per_learner < len(present):
        raise ValueError(
            f"{num_learners} learners with {per_learner} classes each cannot hold all {len(present)} "
            f"classes; use at least {-(-len(present) // num_learners)} classes per learner "
            f"or at least {-(-len(present) // per_learner)} learners"
        )
    groups = [group for group in _shuffled_classes(labels, num_classes, rng) if len(group)]
    holds = _class_holders(len(present), num_learners, per_learner, rng)
    totals = np.array([len(group) for group in groups])
    return _deal(groups, _split_counts(totals, holds / holds.sum(1, keepdims=True)))


def _class_holders(num_classes: int, num_learners: int, per_learner: int, rng: np.random.Generator) -> np.ndarray:
    """holds[k, j]: whether learner j holds class k. Each learner in turn takes per_learner distinct classes
    among those the fewest learners hold so far, ties broken at random: every class is held, and the numbers
    of holders differ by at most one, so shard sizes stay close."""
    holds = np.zeros((num_classes, num_learners), dtype=bool)
    for learner in range(num_learners):
        order = rng.permutation(num_classes)
        least_held = order[np.argsort(holds.sum(1)[order], kind="stable")]
        holds[least_held[:per_learner], learner] = True
    return holds


def _quantity(
    num_samples: int, num_learners: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Quantity skew: a seeded shuffle cut into shards of min_samples plus a Dirichlet(alpha) share of the rest
    each. The floor is built in rather than redrawn for, so any alpha works; labels are IID by the shuffle."""
    spare = np.array([num_samples - num_learners * min_samples])
    sizes = min_samples + _split_counts(spare, rng.dirichlet(np.full(num_learners, alpha))[None])
    return _deal([torch.from_numpy(rng.permutation(num_samples))], sizes)


def _shuffled_classes(labels: torch.Tensor, num_classes: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """The indices of each class 0..num_classes-1 in a seeded random order (empty for absent classes)."""
    by_label = labels.argsort(stable=True).split(labels.bincount(minlength=num_classes).tolist())
    return [group[torch.from_numpy(rng.permutation(len(group)))] for group in by_label]


def _split_counts(totals: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """counts[k, j]: learner j's share of totals[k] by proportions[k, j], rounded so each row sums exactly."""
    cuts = np.rint(np.cumsum(proportions, axis=1) * totals[:, None]).astype(np.int64)
    cuts[:, -1] = totals  # the cumulative sum may fall short of 1 by rounding
    return np.diff(cuts, axis=1, prepend=0)


def _deal(groups: list[torch.Tensor], counts: np.ndarray) -> list[torch.Tensor]:
    """Learner j's shard: the next counts[k, j] indices of each group k, sorted."""
    pieces = [group.split(row.tolist()) for group, row in zip(groups, counts)]
    return [torch.cat([piece[learner] for piece in pieces]).sort().values for learner in range(counts.shape[1])]


def label_counts(labels: torch.Tensor, shards: list[torch.Tensor], num_classes: int) -> list[list[int]]:
    """counts[i][k]: how many samples of class k learner i holds."""
    return [labels[shard].bincount(minlength=num_classes).tolist() for shard in shards]


def describe(
    counts: list[list[int]], max_classes: int = SUMMARY_CLASSES, max_lines: int = SUMMARY_LEARNERS
) -> list[str]:
    """One log line per learner, e.g. "learner 3: 812 samples, classes 0:400 4:412"; with more than
    max_classes classes, the largest ones and how many samples the rest hold. Beyond max_lines learners, the
    first ones and a line that says how many more (partition.json holds them all)."""
    lines = [_describe_learner(learner, row, max_classes) for learner, row in enumerate(counts[:max_lines])]
    if len(counts) > max_lines:
        sizes = [sum(row) for row in counts]
        lines.append(
            f"... and {len(counts) - max_lines} more learners ({min(sizes)} to {max(sizes)} samples each; "
            "partition.json lists them all)"
        )
    return lines


def _describe_learner(learner: int, row: list[int], max_classes: int) -> str:
    held = [(label, count) for label, count in enumerate(row) if count]
    head = f"learner {learner}: {sum(row)} samples, "
    if len(held) <= max_classes:
        return head + "classes " + " ".join(f"{label}:{count}" for label, count in held)
    largest = sorted(held, key=lambda item: -item[1])[:max_classes]
    rest = sum(row) - sum(count for _, count in largest)
    return (
        head
        + f"{len(held)} classes, largest "
        + " ".join(f"{label}:{count}" for label, count in largest)
        + f", {len(held) - max_classes} more with {rest}"
    )


def records(counts: list[list[int]]) -> list[dict]:
    """partition.json's content: per learner, its id, its number of samples and its label counts."""
    return [{"learner_id": learner, "samples": sum(row), "label_counts": row} for learner, row in enumerate(counts)]


def write_partition(
    out_dir: Path, labels: torch.Tensor, shards: list[torch.Tensor], num_classes: int
) -> list[list[int]]:
    """Writes out_dir/partition.json (a list of records(), one learner a line) and out_dir/partition.png;
    returns the label counts (for describe)."""
    counts = label_counts(labels, shards, num_classes)
    lines = ",\n".join(json.dumps(record) for record in records(counts))
    (Path(out_dir) / "partition.json").write_text(f"[\n{lines}\n]\n", encoding="utf-8")
    plot_partition(counts, Path(out_dir) / "partition.png")
    return counts


def plot_partition(counts: list[list[int]], path: Path) -> None:
    """One bar per learner, its height the learner's samples, stacked by class, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    table = np.array(counts)
    num_learners, num_classes = table.shape
    colours = _class_colours(num_classes)
    # wide enough that 100 bars stay apart, and no wider than a screen
    figure, axis = plt.subplots(figsize=(min(5 + 0.15 * num_learners, 20), 4.5))
    bottom = np.zeros(num_learners)
    for label in range(num_classes):
        if num_learners <= SEPARATE_BARS:
            axis.bar(
                range(num_learners),
                table[:, label],
                bottom=bottom,
                width=0.85,
                color=colours[label],
                linewidth=0,
                label=str(label),
            )
        else:  # one shape per class, not a bar per learner and class: 1,000 learners' bars took 5 s to draw
            edges = np.arange(num_learners + 1) - 0.5
            top = bottom + table[:, label]
            axis.stairs(top, edges, baseline=bottom, fill=True, color=colours[label], label=str(label))
        bottom += table[:, label]
    axis.xaxis.set_major_locator(MaxNLocator(nbins=min(num_learners, 25), integer=True))
    axis.set(
        xlabel="learner",
        ylabel="samples",
        xlim=(-0.6, num_learners - 0.4),
        title=f"{int(table.sum())} samples among {num_learners} learners, by class",
    )
    if num_classes <= LEGEND_CLASSES:
        axis.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 + (num_classes > 10))
    else:
        mappable = plt.cm.ScalarMappable(plt.Normalize(0, num_classes - 1), plt.get_cmap("turbo"))
        figure.colorbar(mappable, ax=axis, label="class", fraction=0.02, pad=0.01)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _class_colours(num_classes: int) -> list:
    """Distinct colours for up to 20 classes (tab10, tab20); beyond, a continuous map (with a colour bar)."""
    import matplotlib.pyplot as plt

    if num_classes <= LEGEND_CLASSES:
        palette = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
        return [palette(label) for label in range(num_classes)]
    return list(plt.get_cmap("turbo")(np.linspace(0, 1, num_classes)))
