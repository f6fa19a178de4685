"""A curious leader, shown: what it learns from learners' FedSGD updates of one image each, in the clear and under
secure aggregation: the labels (iDLG), the images (gradient inversion), and a picture of both (docs/privacy.md).

python -m federated.tools.curious_leader --out docs/images/curious-leader.png
"""

import argparse
import sys
from collections.abc import Sequence

import utils
from federated.common import runtime
from federated.tools.curious.figure import draw
from federated.tools.curious.inversion import Inversion
from federated.tools.curious.observed import Learners
from federated.tools.curious.trials import images_of, labels_of, masked_updates, plain_updates

CHANCE_TEXT = "chance: 1 in {classes}"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m federated.tools.curious_leader",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits", help="the learners' images")
    parser.add_argument("--image-size", type=int, default=8, help="images resized to this many pixels a side")
    parser.add_argument(
        "--norm",
        choices=("group", "batch"),
        default="group",
        help="ResNet-20's normalisation: BatchNorm on a batch of one image normalises it by itself, which "
        "gradient inversion struggles with; the labels are recovered with either",
    )
    parser.add_argument("--labels", type=int, default=50, help="learners (one image each) whose label is recovered")
    parser.add_argument("--images", type=int, default=4, help="learners whose image is reconstructed")
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps of each reconstruction")
    parser.add_argument("--tv-weight", type=float, default=0.01, help="the weight of the total-variation prior")
    parser.add_argument("--per-round", type=int, default=3, help="learners in each secure-aggregation round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: one per available core)")
    parser.add_argument("--out", default="docs/images/curious-leader.png", help="where the picture goes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    runtime.set_threads(args.threads)
    data = utils.load_dataset(args.dataset, "", True, args.image_size)
    learners = Learners(data, args.norm)
    indices = list(range(max(args.labels, args.images)))
    plain = plain_updates(learners, indices)
    masked = masked_updates(plain, args.per_round)
    truth = data.labels[indices].tolist()
    for name, received in (("plain updates", plain), ("masked inputs", masked)):
        right = sum(guess == label for guess, label in zip(labels_of(learners, received), truth))
        print(f"labels from {name}: {right} of {len(truth)} ({CHANCE_TEXT.format(classes=data.num_classes)})")
    settings = Inversion(steps=args.steps, tv_weight=args.tv_weight)
    shown = indices[: args.images]
    rows = {
        "the learner's image": [learners.batch(index)[0] for index in shown],
        "from its plain update": list(images_of(learners, plain[: args.images], settings)),
        "from its masked input": list(images_of(learners, masked[: args.images], settings)),
    }
    draw(rows, args.out, gray=args.dataset == "digits")  # the digits are grayscale: shown as such
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
