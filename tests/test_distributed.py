"""Two processes joined by jax.distributed over loopback train like one process."""

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import os, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import jax
    from ftjax import distributed
    if os.environ.get("JAX_NUM_PROCESSES"):
      distributed.initialize()
    from jax.sharding import Mesh
    from conftest import tiny_config
    from ftjax import models, optim, train
    cfg = tiny_config({npz!r}, **{{"optim.name": "sgd", "optim.kwargs": {{"momentum": 0.9}},
                                   "optim.lr": 0.1}})
    model, variables, _ = models.from_pretrained(cfg.model.source, num_classes=10, image_size=32)
    params = variables["params"]
    tx = optim.make_optimizer(params, cfg.optim, family="vit", total_steps=6)
    mask = optim.trainable_mask(params, cfg.optim)
    fn = lambda state, batch, opts: train.train_step(state, batch, model=model, tx=tx,
                                                       trainable=train.trainable_paths(mask), opts=opts)
    rng = np.random.default_rng(0)
    batches = [{{"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                 "label": rng.integers(0, 10, 16).astype(np.int32)}} for _ in range(2)]
    n, i = jax.process_count(), jax.process_index()
    runner = train.JitRunner(Mesh(np.asarray(jax.devices()), ("data",)))
    state = runner.put_state(train.initial_state(params, None, tx, 0, ema=False))
    step = runner.compile(fn, train.StepOptions(num_classes=10))
    for b in batches:  # each process feeds its own half of every global batch
      local = {{k: v[i * 16 // n:(i + 1) * 16 // n] for k, v in b.items()}}
      state, metrics = step(state, runner.put_batch(local))
    out = distributed.host_tree(runner.view(state).params)
    from ftjax.tree import flatten
    np.savez(sys.argv[1], devices=jax.device_count(), loss=distributed.host_value(metrics["loss"]),
             **flatten(out))
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one(tiny_vit_npz, tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER.format(tests=str(REPO / "tests"), npz=tiny_vit_npz))
  single = subprocess.run([sys.executable, str(script), str(tmp_path / "one.npz")],
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {**__import__("os").environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
    procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"p{pid}.npz")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "p0.npz") as p0, \
       np.load(tmp_path / "p1.npz") as p1:
    assert int(one["devices"]) == 1 and int(p0["devices"]) == 2
    moved = False
    for k in one.files:
      if k == "devices":
        continue
      np.testing.assert_allclose(p0[k], one[k], atol=1e-5, err_msg=k)
      np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)  # both hosts hold the same state
    with np.load(tiny_vit_npz) as init:
      moved = any(not np.allclose(one[f"{k}"], init[k]) for k in init.files)
    assert moved
