"""The offline default job (configs/default.py), shortened: real weights, real digits, the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_shortened_default_job_runs_offline(tmp_path):
  wd = tmp_path / "wd"  # given relative to the working directory, as a newcomer would
  r = subprocess.run([sys.executable, str(REPO / "launch.py"),
                      "--config", f"{REPO / 'configs' / 'default.py'}:steps=6,every=2",
                      "--workdir", "wd", "--config.train.log_every=2", "--config.train.eval_every=0"],
                     capture_output=True, text=True, timeout=600, cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "loaded efficientnet:lite0" in out and "245 tensors matched" in out  # the real ImageNet weights
  assert "fine-tuning plan" in out
  assert "unfreezing phase 1" in out and "unfreezing phase 2" in out
  final = [l for l in out.splitlines() if l.startswith("final test: top1")]
  assert final and "(1000 examples)" in final[0]
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6]
  ev = [r for r in rows if r["kind"] == "eval"]
  assert len(ev) == 1 and ev[0]["step"] == 6 and 0.0 <= ev[0]["test/top1"] <= 1.0
  assert (wd / "checkpoints" / "6").is_dir() and (wd / "config.json").exists()
  assert (wd / "learning_curves.png").exists() and (wd / "confusion_test.png").exists()
  stored = json.loads((wd / "config.json").read_text())
  assert stored["data"]["per_class"] == 10 and stored["model"]["source"] == "efficientnet:lite0"
