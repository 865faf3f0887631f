"""The command that writes a world: `python -m bclip.data.synthetic --out DIR [--image_size ...]`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bclip.data.synthetic.shapes import NUM_CLASSES
from bclip.data.synthetic.writer import write_world


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic world to a directory.")
    parser.add_argument("--out", required=True, help="directory to write the world to")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--num_train", type=int, default=20000)
    parser.add_argument("--num_test", type=int, default=2400)
    parser.add_argument("--num_selection", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpeg_quality", type=int, default=90)
    parser.add_argument("--num_classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--num_workers", type=int, default=1, help="rendering processes")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    args = vars(parser.parse_args(argv))
    out_dir = write_world(args.pop("out"), **args)
    print(f"world ready at {out_dir}")


if __name__ == "__main__":
    main()
