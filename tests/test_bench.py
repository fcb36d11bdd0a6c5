"""bench/: the kernel-profile summary of a trace, and train_throughput.py's run plan and profiling.

* ``kernel_profile.summarize`` on a hand-made GPU-like trace and HLO text: exact
  milliseconds per step by category and phase, busy time against span, the top
  ops in order, categories taken from the HLO where the kernel name would
  mislead, derived lines and host events left out;
* a real trace of a tiny jitted function on this CPU (no device process: the
  host's XLA op events, said so);
* ``train_throughput.main``: the order and XLA flags of ``--runs`` variants and
  which runs get profiled (children faked), then one real smoke run profiled
  end to end (one tiny ViT child process, ~10 s).
"""

import doctest
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # bench/ holds scripts, not a package
import kernel_profile  # noqa: E402
import train_throughput  # noqa: E402

# Newer XLA text (no '%') and older (with it) mixed on purpose; shapes, kinds and targets as
# the GPU compiler writes them.
HLO = '''HloModule jit_train_step, is_scheduled=true

%fused_computation.1 (p0: bf16[256,768], p1: bf16[768,768]) -> bf16[256,768] {
  %p0 = bf16[256,768]{1,0} parameter(0)
  %p1 = bf16[768,768]{1,0} parameter(1)
  ROOT %dot.3 = bf16[256,768]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

add_computation (a: f32[], b: f32[]) -> f32[] {
  a = f32[] parameter(0)
  b = f32[] parameter(1)
  ROOT add.9 = f32[] add(a, b)
}

fused_reduce (p: f32[256,768]) -> f32[256] {
  p = f32[256,768]{1,0} parameter(0)
  c = f32[] constant(0)
  ROOT r = f32[256]{0} reduce(p, c), dimensions={1}, to_apply=add_computation
}

fused_add (x: f32[768], y: f32[768]) -> f32[768] {
  x = f32[768]{0} parameter(0)
  y = f32[768]{0} parameter(1)
  m = f32[768]{0} multiply(x, y)
  ROOT s = f32[768]{0} add(m, y)
}

fused_transpose (q: f32[768,256]) -> bf16[256,768] {
  q = f32[768,256]{1,0} parameter(0)
  t = f32[256,768]{1,0} transpose(q), dimensions={1,0}
  ROOT v = bf16[256,768]{1,0} convert(t)
}

ENTRY %main.1 (x: bf16[256,768], w: bf16[768,768]) -> bf16[256,768] {
  %x = bf16[256,768]{1,0} parameter(0)
  %w = bf16[768,768]{1,0} parameter(1)
  %gemm_fusion.1 = bf16[256,768]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(ViT)/Dense_0/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.2 = (bf16[256,768]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/transpose(jvp(ViT))/Dense_0/dot_general"}
  custom-call.3 = (bf16[256,12,197,64]{3,2,1,0}, u8[0]{0}) custom-call(x, x, x), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(train_step)/jvp(ViT)/attention"}
  loop_add_fusion.4 = f32[768]{0} fusion(a, b), kind=kLoop, calls=fused_add, metadata={op_name="jit(train_step)/add"}
  input_reduce_fusion = f32[256]{0} fusion(x), kind=kInput, calls=fused_reduce, metadata={op_name="jit(train_step)/jvp(ViT)/reduce_sum"}
  transpose_fusion = bf16[256,768]{1,0} fusion(w), kind=kLoop, calls=fused_transpose
  custom-call.6 = (bf16[256,14,14,768]{3,2,1,0}, u8[0]{0}) custom-call(x, w), custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(ViT)/embedding/conv_general_dilated"}
  copy.5 = f32[768]{0} copy(a)
  ROOT %tuple = (bf16[256,768]{1,0}) tuple(%gemm_fusion.1)
}
'''

# One step's device events: (thread, start us, duration us, kernel name, args).
STEP = [
    (10, 0, 100, "triton_kernel_abc", {"hlo_op": "gemm_fusion.1", "hlo_module": "jit_train_step"}),
    # hlo_op only inside an annotation string
    (10, 100, 50, "cudnn_generated_sdpa_fprop", {"kernel_annotation": "custom-call.3:#hlo_op=custom-call.3#"}),
    (10, 200, 200, "sm90_xmma_gemm_bf16", {"hlo_op": "custom-call.2", "hlo_module": "jit_train_step"}),
    (10, 400, 30, "loop_add_fusion_4", {}),  # no hlo_op: the kernel is named after the instruction
    (10, 430, 20, "input_reduce_fusion", {"hlo_op": "input_reduce_fusion"}),
    (10, 450, 10, "loop_convert_fusion_2", {"hlo_op": "transpose_fusion"}),  # name says elementwise
    (10, 460, 40, "sm90_xmma_fprop_implicit_gemm", {"hlo_op": "custom-call.6"}),
    (10, 500, 5, "mystery_kernel", {}),
    (10, 505, 15, "nvjet_tst_64x8", {}),
    (11, 140, 20, "MemcpyD2D", {}),  # overlaps custom-call.3 by 10 us
    (11, 600, 10, "Memset", {"hlo_op": "copy.5"}),  # a memset whatever its op
    (20, 0, 520, "gemm_fusion.1", {"hlo_op": "gemm_fusion.1"}),  # the derived "XLA Ops" line
]


def gpu_trace(steps: int = 2, thread_names: bool = True) -> dict:
  """A trace as jax writes it for one GPU: metadata, kernels on two streams, a derived line, host events."""
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}}]
  if thread_names:
    meta += [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}}
             for tid, name in ((10, "Stream #13(Compute)"), (11, "Stream #14(MemcpyD2D)"), (20, "XLA Ops"))]
  events = []
  for step in range(steps):
    for tid, ts, dur, name, args in STEP:
      if tid == 20 and not thread_names:
        continue
      events.append({"ph": "X", "pid": 1, "tid": tid, "ts": 1000.0 * step + ts, "dur": dur, "name": name,
                     "args": args})
    # host events, even with an hlo_op, are not kernels when a device process exists
    events.append({"ph": "X", "pid": 701, "tid": 5, "ts": 1000.0 * step, "dur": 900, "name": "gemm_fusion.1",
                   "args": {"hlo_op": "gemm_fusion.1"}})
  events += [{"ph": "C", "pid": 1, "name": "counter", "ts": 0, "args": {"x": 1}},
             {"ph": "X", "pid": 1, "tid": 10, "name": "no timing"}, {}]
  return {"displayTimeUnit": "ns", "traceEvents": meta + events}


def test_summarize_gpu_trace_with_hlo():
  s = kernel_profile.summarize(gpu_trace(), HLO, steps=2)
  assert s["source"] == "device"
  assert s["threads"] == ["Stream #13(Compute)", "Stream #14(MemcpyD2D)"]
  assert s["kernels"] == 11
  assert s["total_ms"] == pytest.approx(0.5)  # 500 us of kernels a step
  assert s["busy_ms"] == pytest.approx(0.49)  # the memcpy overlaps a kernel by 10 us
  assert s["span_ms"] == pytest.approx(0.805)  # 0 .. 1610 us over 2 steps
  assert s["idle_ms"] == pytest.approx(0.315)
  ms = {c: v["ms"] for c, v in s["categories"].items()}
  assert ms == pytest.approx({"gemm": 0.315, "attention": 0.05, "conv": 0.04, "elementwise": 0.03,
                              "reduction": 0.02, "copy": 0.01, "memcpy": 0.03, "other": 0.005})
  assert list(s["categories"]) == list(kernel_profile.CATEGORIES)
  assert s["categories"]["gemm"]["share"] == pytest.approx(0.63)
  assert s["categories"]["gemm"]["count"] == 3
  assert s["phases"] == pytest.approx({"forward": 0.21, "backward": 0.2, "rest": 0.03, "unknown": 0.06})
  assert s["modules"]["jit_train_step"] == pytest.approx(0.3)

  top = s["top_ops"]
  assert [o["op"] for o in top] == [
      "custom-call.2", "gemm_fusion.1", "custom-call.3", "custom-call.6", "loop_add_fusion.4",
      "MemcpyD2D", "input_reduce_fusion", "nvjet_tst_64x8", "copy.5", "transpose_fusion",
      "mystery_kernel"]
  by_op = {o["op"]: o for o in top}
  assert {op: o["category"] for op, o in by_op.items()} == {
      "custom-call.2": "gemm", "gemm_fusion.1": "gemm", "custom-call.3": "attention",
      "custom-call.6": "conv", "loop_add_fusion.4": "elementwise", "MemcpyD2D": "memcpy",
      "input_reduce_fusion": "reduction", "nvjet_tst_64x8": "gemm", "copy.5": "memcpy",
      "transpose_fusion": "copy", "mystery_kernel": "other"}
  assert by_op["custom-call.2"]["ms"] == pytest.approx(0.2)
  assert by_op["custom-call.2"]["count"] == 1
  assert by_op["custom-call.2"]["phase"] == "backward"
  assert by_op["custom-call.2"]["kernel"] == "sm90_xmma_gemm_bf16"
  assert by_op["custom-call.2"]["hlo"].startswith(
      "(bf16[256,768]{1,0}, s8[4194304]{0}) custom-call __cublas$lt$matmul op_name=")
  assert by_op["gemm_fusion.1"]["hlo"].startswith("bf16[256,768]{1,0} fusion kCustom [dot] op_name=")
  assert by_op["transpose_fusion"]["hlo"] == "bf16[256,768]{1,0} fusion kLoop [convert,transpose]"
  assert by_op["mystery_kernel"]["hlo"] is None
  assert all(len(o["hlo"] or "") <= kernel_profile.HLO_CHARS for o in top)

  text = kernel_profile.format_summary(s, "vit")
  assert text.splitlines()[0].startswith("vit (device, 2 steps, per step): 11.0 kernels, sum 0.5 ms")
  assert "  gemm             0.315   63.0       3" in text
  assert "custom-call.2" in text and "kernel: sm90_xmma_gemm_bf16" in text
  assert "kernel: loop_add_fusion_4" not in text  # named after its op: nothing to add


def test_summarize_reads_through_command_buffers():
  """Kernels a command buffer launches carry its name, which no HLO instruction has: each is
  keyed by the instruction its fusion name gives, else by its own name (as jax 0.11.2 traces)."""
  buffer = {"hlo_op": "command_buffer_144", "hlo_module": "jit_train_step"}
  step = [(10, 0, 30, "loop_add_fusion_4", buffer), (10, 30, 20, "input_reduce_fusion", buffer),
          (10, 50, 100, "nvjet_sm90_tst_128x160", buffer), (10, 150, 50, "nvjet_sm90_tst_128x160", buffer)]
  trace = {"traceEvents": [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
           + [{"ph": "X", "pid": 1, "tid": t, "ts": ts, "dur": d, "name": n, "args": a}
              for t, ts, d, n, a in step]}
  s = kernel_profile.summarize(trace, HLO, steps=1)
  by_op = {o["op"]: o for o in s["top_ops"]}
  assert list(by_op) == ["nvjet_sm90_tst_128x160", "loop_add_fusion.4", "input_reduce_fusion"]
  assert by_op["nvjet_sm90_tst_128x160"]["ms"] == pytest.approx(0.15)
  assert by_op["nvjet_sm90_tst_128x160"]["category"] == "gemm"
  assert (by_op["loop_add_fusion.4"]["category"], by_op["loop_add_fusion.4"]["phase"]) == ("elementwise", "rest")
  assert by_op["input_reduce_fusion"]["phase"] == "forward"
  assert s["phases"] == pytest.approx({"forward": 0.02, "rest": 0.03, "unknown": 0.15})
  # Without the HLO text nothing tells a buffer from an instruction: the buffer keys them all.
  assert [o["op"] for o in kernel_profile.summarize(trace, None, steps=1)["top_ops"]] == [
      "command_buffer_144"]


def test_summarize_without_hlo_falls_back_to_kernel_names():
  """No HLO text: the misleading names decide, and no op has a phase."""
  s = kernel_profile.summarize(gpu_trace(), None, steps=2)
  cats = {o["op"]: o["category"] for o in s["top_ops"]}
  assert cats["gemm_fusion.1"] == "other"  # "triton_kernel_abc"
  assert cats["transpose_fusion"] == "elementwise"  # "loop_convert_fusion_2"
  assert cats["custom-call.3"] == "attention" and cats["custom-call.6"] == "conv"
  assert s["phases"] == pytest.approx({"unknown": 0.5})
  assert s["total_ms"] == pytest.approx(0.5)


def test_summarize_device_threads_without_names():
  """No thread metadata: every device thread counts (no derived line can be recognised then)."""
  s = kernel_profile.summarize(gpu_trace(thread_names=False), HLO, steps=2)
  assert s["source"] == "device" and s["kernels"] == 11
  assert s["total_ms"] == pytest.approx(0.5)


def test_summarize_device_without_kernels_uses_host_ops():
  """A device process but no kernel on it (no CUPTI): the host's XLA op events, said so."""
  trace = gpu_trace()
  trace["traceEvents"] = [e for e in trace["traceEvents"] if e.get("pid") != 1 or e.get("ph") == "M"]
  s = kernel_profile.summarize(trace, HLO, steps=2)
  assert s["source"] == "host" and s["kernels"] == 1
  assert s["categories"] == {"gemm": {"ms": 0.9, "share": 1.0, "count": 1.0}}


def test_summarize_empty_trace():
  for trace in ({}, {"traceEvents": []}, {"traceEvents": [{}, {"ph": "X"}]}, []):
    s = kernel_profile.summarize(trace, None, steps=3)
    assert (s["source"], s["total_ms"], s["span_ms"], s["top_ops"]) == ("none", 0, 0, [])
  assert kernel_profile.format_summary(kernel_profile.summarize({}, None, 1)).startswith(
      "kernel profile (none, 1 steps, per step): 0.0 kernels, sum 0.0 ms")


def test_compact_and_format_of_compact():
  s = kernel_profile.summarize(gpu_trace(), HLO, steps=2)
  c = kernel_profile.compact(s)
  assert c["categories"] == pytest.approx({"gemm": 0.315, "attention": 0.05, "conv": 0.04,
                                           "elementwise": 0.03, "reduction": 0.02, "copy": 0.01,
                                           "memcpy": 0.03, "other": 0.005})
  assert (c["busy_ms"], c["span_ms"]) == pytest.approx((0.49, 0.805))
  assert "top_ops" not in c
  text = kernel_profile.format_summary(json.loads(json.dumps(c)))
  assert "  gemm             0.315   63.0" in text


def test_cpu_capture_is_host_source(tmp_path):
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda x: jnp.tanh(x @ x).sum(0))
  x = jnp.ones((128, 128))
  compiled = f.lower(x).compile()
  jax.block_until_ready(compiled(x))

  def run():
    y = None
    for _ in range(3):
      y = compiled(x)
    jax.block_until_ready(y)

  path = kernel_profile.capture(run, str(tmp_path))
  assert path.endswith(".trace.json.gz") and Path(path).is_relative_to(tmp_path)
  hlo = compiled.as_text()
  s = kernel_profile.summarize(kernel_profile.load_trace(path), hlo, steps=3)
  assert s["source"] == "host"
  assert s["total_ms"] > 0 and s["span_ms"] > 0
  names = kernel_profile.parse_hlo(hlo)["instructions"]
  assert s["top_ops"] and all(o["op"] in names for o in s["top_ops"])
  assert all(o["hlo"] for o in s["top_ops"])
  assert "no device kernels in the trace" in kernel_profile.format_summary(s)
  # the command line re-reads the trace
  assert kernel_profile.main([path, "--steps", "3"]) == 0

  # The .xplane.pb beside it (all a jax that writes no JSON leaves) gives the same ops and times.
  (xplane,) = Path(path).parent.glob("*.xplane.pb")
  x = kernel_profile.summarize(kernel_profile.load_trace(str(xplane)), hlo, steps=3)
  assert x["source"] == "host"
  assert x["total_ms"] == pytest.approx(s["total_ms"], rel=1e-3)
  assert [(o["op"], o["count"]) for o in x["top_ops"]] == [(o["op"], o["count"]) for o in s["top_ops"]]


def test_doctests():
  for module in (kernel_profile, train_throughput):
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0, module.__name__


def _fake_runs(monkeypatch, argv):
  """main(argv) with the child processes replaced: (label, XLA flags, arch, profile dir, repeat?) of each."""
  calls = []

  def fake(model_key, mode, s, timeout, variant=None, profile_dir=None, check_repeat=False):
    calls.append((train_throughput.run_label(model_key, mode, variant and variant[0]), variant and variant[1],
                  variant and variant[2], profile_dir, check_repeat))
    return dict(framework="ftjax", key=model_key, model=train_throughput.MODELS[model_key][3],
                mode=mode, error="fake", **({"variant": variant[0]} if variant else {}))

  monkeypatch.setattr(train_throughput, "run_isolated", fake)
  assert train_throughput.main(argv) == 0
  return calls


def test_runs_take_xla_variants_and_choose_profiles(monkeypatch, capsys):
  calls = _fake_runs(monkeypatch, [
      "--runs", "vit:full[fl],resnet:full,vit:full[cud]", "--variant", "fl=--xla_a=1",
      "--variant", "other=--xla_b=2", "--arch-variant", 'cud={"attention": "cudnn"}',
      "--profile-runs", "vit:full[fl],resnet:full,vit:forward", "--profile-dir", "/tmp/p",
      "--repeat-runs", "vit:full[cud]"])
  assert calls == [
      ("vit:full[fl]", "--xla_a=1", {}, "/tmp/p", False),
      ("resnet:full", None, None, "/tmp/p", False),
      ("vit:full[cud]", "", {"attention": "cudnn"}, None, True),
      # a --variant not named in --runs still runs on --variant-configs
      ("vit:full[other]", "--xla_b=2", {}, None, False),
      ("resnet:full[other]", "--xla_b=2", {}, None, False)]
  assert "vit:forward is none of the runs" in capsys.readouterr().err


def test_a_name_that_is_both_kinds_of_variant_takes_both(monkeypatch):
  calls = _fake_runs(monkeypatch, ["--runs", "vit:full[x]", "--variant", "x=--xla_a=1",
                                   "--arch-variant", 'x={"remat": true}'])
  assert calls == [("vit:full[x]", "--xla_a=1", {"remat": True}, None, False)]


def test_runs_reject_unknown_variants_and_unplaced_combined_ones(monkeypatch):
  with pytest.raises(SystemExit):
    _fake_runs(monkeypatch, ["--runs", "vit:full[nope]"])
  with pytest.raises(SystemExit):  # outside --runs a combined lever has no place to run
    _fake_runs(monkeypatch, ["--variant", "x=--xla_a=1", "--arch-variant", 'x={"remat": true}'])


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_smoke_run_profiled_end_to_end(tmp_path, capsys):
  """One tiny ViT child: its row carries the profile, the files exist, the table prints."""
  out = tmp_path / "bench.jsonl"
  assert train_throughput.main(["--smoke", "--runs", "vit:full", "--profile-runs", "vit:full",
                                "--profile-dir", str(tmp_path / "prof"), "--out", str(out)]) == 0
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert "error" not in row, row
  p = row["profile"]
  assert p["source"] == "host" and p["steps"] == train_throughput.PROFILE_STEPS
  assert p["total_ms"] > 0 and sum(p["categories"].values()) == pytest.approx(p["total_ms"], rel=1e-3)
  assert p["path"] == str(tmp_path / "prof" / "vit-full.profile.json")
  summary = json.loads(Path(p["path"]).read_text())
  assert summary["top_ops"] and summary["hlo"] is True
  assert (tmp_path / "prof" / "vit-full.hlo.txt.gz").exists()
  printed = capsys.readouterr().out
  assert "kernels of vit-test vit:full (host, 3 steps, per step)" in printed
  assert "top ops" in printed


@pytest.mark.parametrize("outcome", ["crash", "timeout", "ok", "crash_unprofiled"])
def test_run_isolated_keeps_the_timed_row_when_profiling_fails(monkeypatch, outcome):
  """The child prints its timed row before tracing: a crash or hang there loses only the profile."""
  import subprocess

  timed = dict(framework="ftjax", key="vit", model="vit-test", mode="full", step_ms=3.0)
  profiled = dict(timed, profile={"source": "device", "total_ms": 2.0})
  lines = json.dumps(timed) + "\n" + (json.dumps(profiled) + "\n" if outcome == "ok" else "")

  def fake_run(cmd, **kw):
    assert ("--profile-dir" in cmd) == (outcome != "crash_unprofiled")
    if outcome == "timeout":
      raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=lines.encode())
    if outcome == "ok":
      return subprocess.CompletedProcess(cmd, 0, lines, "")
    return subprocess.CompletedProcess(cmd, -11, lines, "warning\nFatal Python error: Segmentation fault")

  monkeypatch.setattr(train_throughput.subprocess, "run", fake_run)
  profile_dir = None if outcome == "crash_unprofiled" else "/tmp/p"
  row = train_throughput.run_isolated("vit", "full", train_throughput.Settings(smoke=True), 60,
                                      ("x", "--xla_a=1", {}), profile_dir)
  expected = {
      "ok": dict(profiled, variant="x"),
      "crash": dict(timed, variant="x", profile={
          "error": "exit -11: Fatal Python error: Segmentation fault (while profiling)"}),
      "timeout": dict(timed, variant="x", profile={"error": "timed out after 60 s (while profiling)"}),
      # without profiling a crash is the run's error, as before
      "crash_unprofiled": dict(framework="ftjax", key="vit", model="vit_base_patch16_224", mode="full",
                               variant="x", error="exit -11: Fatal Python error: Segmentation fault"),
  }[outcome]
  assert row == expected


def test_repeat_check_tells_equal_repeats_from_unequal():
  import jax.numpy as jnp

  state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
  same = lambda st: ({"w": st["w"] * 2.0, "step": st["step"] + 1}, {"loss": st["w"].sum()})
  assert train_throughput.repeat_check(same, state) == {"steps": 2, "bit_identical": True,
                                                        "max_abs_diff": 0.0}
  calls = []

  def drifting(st):  # each call adds a little more: the second repeat ends elsewhere
    calls.append(1)
    return {"w": st["w"] + 1e-3 * len(calls), "step": st["step"] + 1}, {"loss": st["w"].sum()}

  r = train_throughput.repeat_check(drifting, state)
  # the last loss sums w as the second step saw it: +0.001 in the first repeat, +0.003 in the second
  assert not r["bit_identical"] and r["max_abs_diff"] == pytest.approx(4 * 2e-3, rel=1e-3)
  assert state["w"].tolist() == [0.0, 1.0, 2.0, 3.0]  # the caller's state untouched
