r"""ResNet-50 (torchvision ImageNet weights) on Oxford-IIIT Pets: AdamW with layer-wise LR decay.

Command (needs the prepared tfds oxford_iiit_pet and the torchvision file)::

  python launch.py --config configs/resnet50_pets.py --workdir runs/resnet50_pets

Recipe (timm-style transfer): 224 px, batch 64, AdamW lr 1e-3 (head; stage s gets
0.7^(5-s), the stem 0.7^5), weight decay 0.05 on kernels only, 2 warm-up epochs,
cosine, label smoothing 0.1, 30 epochs (~1,720 steps).

Expected: not yet measured here (no published anchor for this recipe; it needs the
dataset and a GPU).
"""

from ftjax.config import default_config, parse_arg

RESNET50_PTH = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


def get_config(arg: str = ""):
  args = parse_arg(arg, steps=1720)
  c = default_config()
  c.model.source = f"torchvision:resnet50@{RESNET50_PTH}"
  c.model.dtype = "bfloat16"
  c.data.source = "tfds"
  c.data.name = "oxford_iiit_pet"
  c.data.eval_splits = ["test"]
  c.data.image_size = 224
  c.train.total_steps = args["steps"]
  c.train.batch_size = 64
  c.train.eval_batch_size = 128
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.label_smoothing = 0.1
  c.optim.name = "adamw"
  c.optim.kwargs = {}
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.layer_decay = 0.7
  c.optim.schedule.name = "warmup_cosine"
  c.optim.schedule.warmup_epochs = 2.0
  return c
