"""Ctrl-C for the command lines: a KeyboardInterrupt in the main thread, whatever MindSpore installs.

MindSpore's runtime worker threads each install a process-wide SIGINT handler when they start (its C++
``SignalGuard``) that sends the process SIGTERM: a Ctrl-C once the first operator has run would kill the
script by signal (exit -15, no message, Python's ``finally`` blocks skipped). MindSpore has no setting to turn
this off, and the threads start lazily (graph mode starts another one at the first compiled step), so
reinstalling Python's handler would leave windows open. Instead SIGINT is blocked in the main thread before any
other thread exists (a new thread inherits its creator's mask, so every later thread blocks it too) and one
watcher thread takes it with ``sigwait``: no handler of anyone's runs, and the watcher raises KeyboardInterrupt
in the main thread as Python's own handler would.

A Ctrl-C during a graph compilation waits for it to end (graphs.compiling): MindSpore's compiler runs Python
code, and a KeyboardInterrupt raised there is caught in its C++, logged with a traceback, and raised again. One
while MindSpore is being imported waits for that import to end: a KeyboardInterrupt inside ``import mindspore``
(the scripts' first 1-1.5 s) left it half initialised, and the process then aborted at exit (SIGABRT, a fatal
error from its C++). A second Ctrl-C does not wait.

Only the scripts call this, first thing: importing the package changes nothing in the process. A child made by
Python's fork (multiprocessing) gets SIGINT back unblocked; a program started with exec inherits the blocked
mask (none of the scripts starts one).
"""
import contextlib
import signal
import sys
import threading

__all__ = ["interrupt_after", "record_stop_signals", "route_ctrl_c_to_main_thread"]

_held = 0  # blocks of interrupt_after running


def route_ctrl_c_to_main_thread() -> bool:
    """Deliver SIGINT as a KeyboardInterrupt in the main thread for the rest of the process; True if set up.

    Left alone (False): platforms without ``pthread_sigmask``, calls from another thread, and processes where
    SIGINT is not Python's default (a handler of the caller's). Where it is ignored (a background job of a
    shell script), it is blocked instead, in this thread and so in every thread started later: MindSpore's
    handler would otherwise end the process by SIGTERM on a SIGINT its parent meant it to ignore.
    """
    if not all(hasattr(signal, name) for name in ("pthread_sigmask", "sigwait", "sigtimedwait")):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        return False
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    import _thread
    import os

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    os.register_at_fork(after_in_child=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}))

    def watch():
        while True:
            signal.sigwait({signal.SIGINT})
            while _wait() and signal.sigtimedwait({signal.SIGINT}, 0.02) is None:
                pass  # until the compilation or import ends, or a second Ctrl-C
            _thread.interrupt_main()  # as if SIGINT reached the main thread: KeyboardInterrupt there

    threading.Thread(target=watch, name="ctrl-c", daemon=True).start()
    return True


@contextlib.contextmanager
def interrupt_after():
    """Ctrl-C during the block takes effect when it ends (a second one at once): for a library call that catches
    a KeyboardInterrupt and reports it as a failure of its own (MindSpore's save_checkpoint logs CRITICAL "Failed to
    save the checkpoint file ... permission ... disk space"). In the main thread with Python's own handler, or in a
    script routed by route_ctrl_c_to_main_thread; elsewhere it changes nothing."""
    global _held
    received, previous = [], None

    def note(signo, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signo)

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous = signal.signal(signal.SIGINT, note)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def record_stop_signals():
    """SIGINT and SIGTERM noted in a list (returned) instead of acted on, until other handlers are installed: the
    server's first step (scripts/serve.py), so that a Ctrl-C while it imports MindSpore and FastAPI stops it once
    it can (serving.main) instead of breaking an import halfway (a traceback, exit by SIGINT)."""
    received = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signo, frame: received.append(signo))
    return received


def _wait():
    """Whether a Ctrl-C should wait (see the module's notes). Never raises: a watcher thread that died would lose
    every Ctrl-C after."""
    try:
        return bool(_held or _compiling() or _importing_mindspore())
    except Exception:  # noqa: BLE001 (anything: the Ctrl-C then goes through at once)
        return False


def _compiling():
    graphs = sys.modules.get("mindone_qwen2vl.graphs")  # not imported: nothing compiles
    return graphs is not None and graphs.compiling()


def _importing_mindspore():
    """Whether the main thread runs a MindSpore module's top-level code (imports it). Read from its frames only:
    an attribute of a module object may be a lazy one that imports (the first form of this check, which asked
    each MindSpore module's spec, sometimes lost the Ctrl-C)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and \
                str(frame.f_globals.get("__name__", "")).split(".", 1)[0] == "mindspore":
            return True
        frame = frame.f_back
    return False
