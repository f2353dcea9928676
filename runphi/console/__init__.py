"""Console streaming for partitioned containers: guest UART <-> containerd stdio.

Two layers, matching the process model (DESIGN §2, §8):

* synchronous and lean, used by ``runphi create`` before the cell starts:
  :mod:`runphi.console.uart` (open the cell's console UART with pyserial,
  exclusive, raw, non-blocking) and :mod:`runphi.console.terminal` (pty pair,
  window size, raw slave, sending the master over ``--console-socket``);
* asynchronous (trio), used by the per-container monitor:
  :mod:`runphi.console.pump` (UART -> sink with a bounded buffer that drops the
  oldest bytes when the sink stalls, stdin -> UART, drain on cell stop) and
  :mod:`runphi.console.session` (both pumps plus the console log and drop
  reports, as one object with ``run``/``drain``);
* lean readers for verbs: :mod:`runphi.console.ringlog` (the last N KiB of
  console output kept in the container's state directory, read by
  ``runphi logs``) and :mod:`runphi.console.stats` (the counters the monitor
  publishes for ``runphi events``).

Only :mod:`runphi.console.pump` and :mod:`runphi.console.session` import trio,
and only the monitor imports them; pyserial is imported inside
:func:`runphi.console.uart.open_uart`; nothing here imports structlog.
"""

from __future__ import annotations

from runphi.errors import RunphiError


class ConsoleError(RunphiError):
    """An expected console failure, already worded as the one error line the user sees.

    The message says what failed, for which container, why, and what to do; the
    CLI logs it as-is and exits 1, without a traceback.
    """
