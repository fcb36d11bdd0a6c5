r"""ViT-B/16 (ImageNet-21k) fine-tuned on CIFAR-10: the vit_jax recipe's settings, key by key.

Command (needs the prepared tfds cifar10 and the ViT-B_16.npz file, or network)::

  python launch.py --config configs/vit_b16_cifar10.py --workdir runs/vit_b16_cifar10
  python launch.py --config configs/vit_b16_cifar10.py:steps=500 --workdir runs/vit_b16_cifar10_500
  python launch.py --config configs/vit_b16_cifar10.py:dataset=cifar100 --workdir runs/vit_b16_cifar100

Expected (published, google-research/vision_transformer README): 99.02% top-1 on
CIFAR-10 after 10k steps (98.59% after 500), 92.06% on CIFAR-100 (89.17% after 500).
Recipe (vision_transformer configs common.py / vit.py): 384 px, batch 512, SGD
momentum 0.9, lr 0.01 (CIFAR-100: 0.03), cosine decay, 500 warm-up steps (a tenth of
a shorter run: 50 for 500 steps, 100 for 1,000, as the README's short runs), gradient
clipping at global norm 1.0, no weight decay,
dropout 0, zero-initialised head; input_pipeline.py: training takes a random crop of
5-100% of the area (aspect 3/4-4/3) resized to 384 px and a flip, evaluation resizes
the whole image to 384 px (no centre crop). Not yet run end to end by ftjax (it needs the
dataset and a GPU); if batch 512 at 384 px does not fit, optim.accum_steps splits it
into microbatches inside one compiled step.

Where ftjax differs from vit_jax (none measured): it trains on all 50,000 training
images (vit_jax: train[:98%]); its random crop samples as timm's RandomResizedCrop (area
uniform in 5-100%, aspect log-uniform; TF's sample_distorted_bounding_box draws the aspect
linearly and the height uniformly: smaller crops, a mean area of about 0.38 of a 32 px
CIFAR image against 0.48 here); the 14x14 position embeddings are resampled to 24x24
bicubic as timm does (vit_jax: linear, scipy.ndimage.zoom order 1); compute is bfloat16
(vit_jax: float32).
"""

from ftjax.config import default_config, parse_arg
from ftjax.errors import ConfigError

VIT_B16_NPZ = "gs://vit_models/imagenet21k/ViT-B_16.npz"


def get_config(arg: str = ""):
  args = parse_arg(arg, steps=10_000, dataset="cifar10")
  if args["dataset"] not in ("cifar10", "cifar100"):
    raise ConfigError("the recipe is published for cifar10 and cifar100 only", where=":dataset",
                      value=repr(args["dataset"]))
  c = default_config()
  c.model.source = f"npz:B/16@{VIT_B16_NPZ}"
  c.model.dtype = "bfloat16"
  c.model.dropout_rate = 0.0
  c.data.source = "tfds"
  c.data.name = args["dataset"]
  c.data.train_split = "train"
  c.data.eval_splits = ["test"]
  c.data.image_size = 384
  c.data.augment.random_resized_crop = True
  c.data.augment.scale = (0.05, 1.0)  # vit_jax's area_range
  c.data.augment.flip = True
  c.data.resize = "squash"  # eval: the whole image resized to 384 px
  c.data.crop_fraction = 1.0
  c.train.total_steps = args["steps"]
  c.train.batch_size = 512
  c.train.eval_batch_size = 512
  c.train.eval_every = 1000 if args["steps"] > 1000 else 100
  c.train.checkpoint_every = 1000 if args["steps"] > 1000 else 100
  c.optim.name = "sgd"
  c.optim.kwargs = {"momentum": 0.9}
  c.optim.lr = 0.01 if args["dataset"] == "cifar10" else 0.03
  c.optim.schedule.name = "warmup_cosine"
  c.optim.schedule.warmup_steps = min(500, args["steps"] // 10)
  c.optim.grad_clip_norm = 1.0
  c.optim.weight_decay = 0.0
  c.train.best_metric = "test/top1"
  return c
