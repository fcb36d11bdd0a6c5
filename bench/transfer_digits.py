r"""What fine-tuning buys: the default job's network from scratch vs ImageNet-pretrained, and how it is tuned.

  python bench/transfer_digits.py [--variants default,head_only,full,layer_decay,scratch] [--seeds 0]

Runs ``configs/default.py:variant=<v>,seed=<s>`` for each variant (100 labelled MNIST
digits, 10 per class; 1,000 held-out test digits) through the real trainer, and prints
a markdown table of test top-1 (mean over seeds) with the wall time of each run.
The README's table is this script's output.
"""

import argparse
import importlib.util
import io
import contextlib
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LABELS = {
    "scratch": "same network from scratch (full training)",
    "head_only": "ImageNet-pretrained, head only (frozen backbone and BatchNorm)",
    "full": "ImageNet-pretrained, full fine-tune",
    "full_bn": "ImageNet-pretrained, full fine-tune, BatchNorm statistics updated",
    "layer_decay": "ImageNet-pretrained, full fine-tune + layer-wise lr decay 0.9",
    "default": "ImageNet-pretrained, default recipe (gradual unfreezing + layer decay)",
}


def load_config(arg: str):
  spec = importlib.util.spec_from_file_location("default_config", REPO / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default="scratch,head_only,full_bn,full,layer_decay,default")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--extra", default="", help="more :arg settings, e.g. every=20,k=4")
  args = parser.parse_args()
  from ftjax import train

  rows = []
  for variant in args.variants.split(","):
    accs, secs = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
      extra = f",{args.extra}" if args.extra else ""
      config = load_config(f"variant={variant},seed={seed},steps={args.steps}{extra}")
      config.train.plots = False
      with tempfile.TemporaryDirectory() as wd:
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
          summaries = train.train_and_evaluate(config, wd)
        secs.append(time.time() - start)
      accs.append(100 * summaries["test"]["top1"])
      print(f"{variant} seed {seed}: {accs[-1]:.1f}% in {secs[-1]:.0f} s", flush=True)
    rows.append((variant, sum(accs) / len(accs), accs, sum(secs) / len(secs)))
  print()
  print("| variant | test top-1 | per seed | wall time |")
  print("|---|---|---|---|")
  for variant, mean, accs, sec in rows:
    print(f"| {LABELS[variant]} (`:variant={variant}`) | {mean:.1f}% | "
          f"{', '.join(f'{a:.1f}' for a in accs)} | {sec:.0f} s |")


if __name__ == "__main__":
  main()
