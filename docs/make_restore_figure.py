"""Makes docs/restore_before_after.png with the CLI: held-out digits, their lower half masked,
restored by `ddpm-fast restore` with the bundled model.

    python docs/make_restore_figure.py [--out docs/restore_before_after.png]

Each row: original | masked input | restored (RePaint, 50 steps, jumps of 5 steps, 3 passes,
reconstruction guidance 10). Takes a few minutes on a 2-core CPU."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ddpm_fast.cli import main as cli
from ddpm_fast.train import digits_data

RESTORE_ARGS = ["--steps", "50", "--jump-length", "5", "--jump-n-sample", "3",
                "--reconstruction-guidance", "10", "--no-progress"]


def to_png(x: np.ndarray, path: Path) -> None:
    Image.fromarray(((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("restore_before_after.png")))
    p.add_argument("--digits", type=int, default=6, help="held-out digits (rows)")
    args = p.parse_args(argv)

    data = digits_data(16)
    x, y = data["x_test"].numpy()[:, 0], data["y_test"].numpy()
    picks = [int(np.flatnonzero(y == d)[0]) for d in range(args.digits)]  # digits 0, 1, 2, ...
    keep = np.zeros((16, 16), dtype=np.uint8)
    keep[:8] = 255  # white = known pixel; the lower half is generated
    scale, pad, head = 6, 8, 18
    cell = 16 * scale
    sheet = Image.new("L", (3 * cell + 4 * pad, head + len(picks) * (cell + pad) + pad), 255)
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(("original", "masked input", "restored")):
        draw.text((pad + col * (cell + pad), 4), title, fill=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(keep).save(tmp / "mask.png")
        for row, i in enumerate(picks):
            masked = x[i].copy()
            masked[8:] = -1.0
            to_png(x[i], tmp / "digit.png")
            to_png(masked, tmp / "masked.png")
            cli(["restore", "--image", str(tmp / "digit.png"), "--mask", str(tmp / "mask.png"),
                 "--seed", str(row), "--out", str(tmp / "restored.png"), *RESTORE_ARGS])
            for col, name in enumerate(("digit.png", "masked.png", "restored.png")):
                im = Image.open(tmp / name).convert("L").resize((cell, cell), Image.NEAREST)
                sheet.paste(im, (pad + col * (cell + pad), head + row * (cell + pad)))
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
