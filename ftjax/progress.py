"""Training progress for people: a tqdm bar on a terminal, plain log lines otherwise.

Rates are measured between log steps only.  The caller turns the loss into a
python float on those steps (the one device sync a log step needs); on other
steps :meth:`Progress.update` only counts, so it never stalls the device queue.
Time spent in :meth:`Progress.paused` (evaluation, checkpoint writes, compiling
the next unfreezing phase) is left out of images/s and MFU, which measure
training steps.  The ETA is wall-clock time at the run's rate so far: the
evaluations and writes, which recur, are in it; a pause marked ``one_off``
(compiling a phase's step) is not, since the steps left will not repeat it.

>>> import io
>>> clock = iter([0.0, 5.0, 15.0]).__next__  # seconds at construction, step 1, step 50
>>> p = Progress(100, batch_size=8, log_every=50, stream=io.StringIO(), clock=clock)
>>> p.update(1)  # the first step's time (compilation) is not counted
>>> rates = p.update(50, loss=0.5, lr=0.001)  # 49 steps in 10 s
>>> p.stream.getvalue()
'step 50/100 loss 0.5000 img/s 39.2 eta 0:00:10 lr 0.001\\n'
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO

import jax

from ftjax.metrics import mfu


def format_eta(seconds: float) -> str:
  """``h:mm:ss`` (with days when longer).

  >>> format_eta(62.4), format_eta(90061)
  ('0:01:02', '1 day, 1:01:01')
  """
  return str(datetime.timedelta(seconds=round(seconds)))


def _check_host_value(name: str, value) -> None:
  # Formatting a device array would block until the step finishes: a hidden sync every step.
  if isinstance(value, jax.Array):
    raise TypeError(f"Progress.update({name}=...) got a jax.Array; pass float({name}) on log "
                    "steps only, so that other steps do not wait for the device")


class Progress:
  """Reports step, loss, images/s, ETA and MFU.

  Args:
    total_steps: the step the run ends at.
    start_step: the step the run starts from (a resumed run's checkpoint step).
    batch_size: images per step over all devices.
    log_every: a plain line (or the bar's rates) every this many steps, and at the end.
    flops_per_step: FLOPs of one step over all devices (``metrics.step_flops``).
    peak_flops: one device's peak FLOP/s (``metrics.device_peak_flops``); MFU is
      shown only when both are known.
    num_devices: devices the step runs on.
    stream: where to write; a terminal gets a tqdm bar.
    clock: seconds, monotonic (``time.perf_counter``; tests pass a fake).

  Rates run from construction, so build it after compiling the step, and call
  :meth:`start` after the first step (its one-off costs are left out); or call
  :meth:`update` every step, and the first call (the compiling step) is left out.
  The loss shown is the log step's batch's, as big_vision logs it.
  """

  def __init__(self, total_steps: int, *, start_step: int = 0, batch_size: int, log_every: int,
               flops_per_step: float | None = None, peak_flops: float | None = None,
               num_devices: int = 1, stream: IO[str] = sys.stderr,
               clock: Callable[[], float] = time.perf_counter):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.log_every = max(1, log_every)
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.num_devices = num_devices
    self.stream = stream
    self._clock = clock
    self._bar = None
    if getattr(stream, "isatty", lambda: False)():
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, file=stream, unit="step",
                       dynamic_ncols=True)
    self._step = start_step
    self._restart(start_step, clock())
    self._first = True
    self._last_line: int | None = None  # the step of the last line shown

  def _restart(self, step: int, now: float) -> None:
    """Rates and the ETA measured from ``(step, now)`` on."""
    self._mark = (step, now)  # (step, time) the next rates are measured from
    self._origin = self._mark  # (step, time) the ETA's wall-clock rate is measured from
    self._paused = 0.0  # seconds paused since the mark
    self._one_off = 0.0  # seconds of one-off pauses since the origin: out of the ETA
    self._window_flops = 0.0  # FLOPs of the window's steps before flops_per_step took effect
    self._flops_from = step  # the step flops_per_step counts from

  def start(self, step: int, wait_for=None) -> None:
    """The run's first step (``step``) is done: rates and the ETA start from here.

    The first call of a compiled step carries one-off costs (loading the program,
    first allocations; on a GPU, loading its kernels) that no later step repeats.
    ``wait_for`` (the train state) is waited for: one sync, at this step only.
    """
    if wait_for is not None:
      jax.block_until_ready(wait_for)
    if self._bar is not None:
      self._bar.update(step - self._step)
    self._step = step
    self._first = False
    self._restart(step, self._clock())

  def set_flops_per_step(self, step: int, flops_per_step: float | None) -> None:
    """Steps after ``step`` cost ``flops_per_step`` (a new unfreezing phase's step);
    those up to it keep the count they ran with, in this window's MFU too.

    >>> import io
    >>> clock = iter([0.0, 10.0]).__next__
    >>> p = Progress(10, batch_size=1, log_every=10, flops_per_step=4.0, peak_flops=10.0,
    ...              stream=io.StringIO(), clock=clock)
    >>> p.set_flops_per_step(4, 9.0)  # 4 steps of 4 FLOPs, 6 of 9: 70 FLOPs in 10 s
    >>> p.update(10)["mfu"]
    0.7
    """
    start = max(self._flops_from, self._mark[0])
    if self._window_flops is not None and self.flops_per_step is not None:
      self._window_flops += (step - start) * self.flops_per_step
    elif step > start:
      self._window_flops = None  # a part of the window of unknown cost
    self.flops_per_step = flops_per_step
    self._flops_from = step

  def _is_log_step(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total_steps

  def update(self, step: int, loss: float | None = None, **extra: float) -> dict | None:
    """Notes that ``step`` is done; on log steps prints and returns the rates.

    ``loss`` and ``extra`` (shown as ``key value``) must be host numbers.
    Returns ``{"img_per_sec", "steps_per_sec"[, "mfu"]}`` on log steps, else None.
    """
    _check_host_value("loss", loss)
    for k, v in extra.items():
      _check_host_value(k, v)
    now = self._clock()
    if self._bar is not None:
      self._bar.update(step - self._step)
    self._step = step
    first, self._first = self._first, False
    if not self._is_log_step(step):
      if first:
        # Called every step, the first call closes the step that compiled: rates start here.
        self._restart(step, now)
      return None
    if step <= self._mark[0]:
      # No time to measure: the first step, after start(), shows its loss only; the
      # same step again shows nothing.
      if step != self._last_line and (loss is not None or extra):
        self._report(step, loss, None, extra, None)
      return None
    rates = self._rates(step, now)
    eta = self._eta(step, now)
    self._mark = (step, now)
    self._paused = 0.0
    self._window_flops, self._flops_from = 0.0, step
    self._report(step, loss, rates, extra, eta)
    return rates

  @contextlib.contextmanager
  def paused(self, wait_for=None, one_off: bool = False) -> Iterator[None]:
    """Leaves the time inside out of images/s and MFU (out of the ETA too when ``one_off``:
    work the steps left will not repeat, such as compiling a phase's step).

    ``wait_for`` (the train state) is waited for first: the steps still queued on
    the device are training time, not the pause's.

    >>> import io
    >>> clock = iter([0.0, 10.0, 40.0, 50.0]).__next__  # start; pause from 10 s to 40 s; step 20
    >>> p = Progress(40, batch_size=1, log_every=20, stream=io.StringIO(), clock=clock)
    >>> with p.paused():  # an evaluation
    ...   pass
    >>> p.update(20)  # 20 steps in 20 s of training, 50 s of wall-clock time
    {'img_per_sec': 1.0, 'steps_per_sec': 1.0}
    >>> p.stream.getvalue()
    'step 20/40 img/s 1.0 eta 0:00:50\\n'
    """
    if wait_for is not None:
      jax.block_until_ready(wait_for)
    start = self._clock()
    try:
      yield
    finally:
      spent = self._clock() - start
      self._paused += spent
      if one_off:
        self._one_off += spent

  def _rates(self, step: int, now: float) -> dict:
    mark_step, mark_time = self._mark
    steps_per_sec = (step - mark_step) / max(now - mark_time - self._paused, 1e-9)
    rates = {"img_per_sec": steps_per_sec * self.batch_size, "steps_per_sec": steps_per_sec}
    flops = None  # the window's mean FLOPs per step: a phase may have begun inside it
    if self._window_flops is not None and self.flops_per_step is not None:
      start = max(self._flops_from, mark_step)
      flops = (self._window_flops + (step - start) * self.flops_per_step) / (step - mark_step)
    util = mfu(flops, steps_per_sec, self.num_devices, self.peak_flops)
    if util is not None:
      rates["mfu"] = util
    return rates

  def _eta(self, step: int, now: float) -> float:
    """Seconds left at the wall-clock rate of the run so far: evaluations and saves in,
    one-off pauses (a phase's compilation) out.

    >>> import io
    >>> clock = iter([0.0, 10.0, 70.0, 80.0]).__next__  # start; compile 10 s to 70 s; step 20
    >>> p = Progress(40, batch_size=1, log_every=20, stream=io.StringIO(), clock=clock)
    >>> with p.paused(one_off=True):
    ...   pass
    >>> _ = p.update(20)  # 20 steps in 20 s: 20 left take 20 s, not 80
    >>> p.stream.getvalue()
    'step 20/40 img/s 1.0 eta 0:00:20\\n'
    """
    origin_step, origin_time = self._origin
    return ((self.total_steps - step) * max(now - origin_time - self._one_off, 0.0)
            / max(step - origin_step, 1))

  def _report(self, step: int, loss: float | None, rates: dict | None, extra: dict,
              eta: float | None) -> None:
    self._last_line = step
    parts = [] if loss is None else [f"loss {loss:.4f}"]
    if rates is not None:
      parts.append(f"img/s {rates['img_per_sec']:.1f}")
    if self._bar is None and eta is not None:  # a bar shows its own ETA
      parts.append(f"eta {format_eta(eta)}")
    if rates is not None and "mfu" in rates:
      parts.append(f"mfu {100 * rates['mfu']:.1f}%")
    parts += [f"{k} {v:.4g}" for k, v in extra.items()]
    if self._bar is not None:
      self._bar.set_postfix_str(" ".join(parts), refresh=False)
      return
    self.stream.write(f"step {step}/{self.total_steps} " + " ".join(parts) + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
