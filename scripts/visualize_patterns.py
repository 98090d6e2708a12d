"""Draw the attention patterns as PNG: masks side by side and receptive fields on the image grid.

    python scripts/visualize_patterns.py --out pictures/            # masks.png, receptive_field.png
    python scripts/visualize_patterns.py --height 8 --width 8 --channels 3
"""

import argparse
import os

from imagegen.pictures import masks_picture, receptive_field_picture


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pictures")
    p.add_argument("--height", type=int, default=6, help="grid of the mask picture")
    p.add_argument("--width", type=int, default=6)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--field-size", type=int, default=12, help="grid of the receptive-field picture")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    masks = masks_picture(["dense", "local", "column", "strided", "row", "fixed"], args.height, args.width,
                          args.channels, block=args.width * args.channels, summary=2)
    masks.save(os.path.join(args.out, "masks.png"))
    field = receptive_field_picture({"sparse": ["local", "column"], "axial": ["row", "column"]},
                                    args.field_size, args.field_size, args.channels)
    field.save(os.path.join(args.out, "receptive_field.png"))
    print(f"wrote {args.out}/masks.png and {args.out}/receptive_field.png")


if __name__ == "__main__":
    main()
