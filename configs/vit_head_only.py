r"""Train only the head of an ImageNet-21k ViT-B/16 (a linear probe trained with SGD).

Command::

  python launch.py --config configs/vit_head_only.py --workdir runs/vit_head_only
  python launch.py --config configs/vit_head_only.py:dataset=cifar100 --workdir runs/vit_head_only_c100

Every parameter but ``head/*`` is frozen: no gradient work, no optimizer state
(the printed plan shows the counts).

Expected: below the full fine-tune of configs/vit_b16_cifar10.py (99.02%); not yet
measured here (it needs the dataset and a GPU).
"""

from ftjax.config import default_config, parse_arg


def get_config(arg: str = ""):
  args = parse_arg(arg, steps=2000, dataset="cifar10")
  c = default_config()
  c.model.source = "npz:B/16@gs://vit_models/imagenet21k/ViT-B_16.npz"
  c.model.dtype = "bfloat16"
  c.data.source = "tfds"
  c.data.name = args["dataset"]
  c.data.image_size = 224
  c.train.total_steps = args["steps"]
  c.train.batch_size = 512
  c.train.eval_batch_size = 512
  c.train.eval_every = 500
  c.optim.name = "sgd"
  c.optim.kwargs = {"momentum": 0.9}
  c.optim.lr = 0.03
  c.optim.schedule.warmup_steps = 100
  c.optim.param_groups = [("head/.*", {}), (".*", None)]
  return c
