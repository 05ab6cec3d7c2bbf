"""What a command line prints and writes: the streamed answer, the settings and timings lines, warnings as
one line each, and batch answers written atomically (a failed run never leaves half a file)."""
import json
import os
import stat
import sys
import tempfile
import time


def as_numpy(x):
    import numpy as np

    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


class Clock:
    """A streamer (HF's put/end interface) that notes when each step's tokens arrive and passes them on."""

    def __init__(self, printer=None):
        self.printer = printer
        self.times = []  # times[0]: the prompt; times[k]: the k-th new token(s)

    def put(self, ids):
        self.times.append(time.perf_counter())
        if self.printer is not None:
            self.printer.put(ids)

    def end(self):
        if self.printer is not None:
            self.printer.end()

    def interrupted(self):
        if self.printer is not None:
            self.printer.interrupted()


class TokenPrinter:
    """Prints each generated token's text as soon as it is whole (a streamer for one row).

    HF's TextStreamer holds text back until a space, so a word-less answer would appear only at the end.
    Qwen2-VL's byte-level tokens decode to the concatenation of their bytes: once the text decoded so far ends
    on a whole character it is final, so it is printed and the next tokens are decoded on their own, which keeps
    the work per token constant. A character split across tokens (its bytes decode to U+FFFD) waits for the rest.
    """

    def __init__(self, tokenizer, file=None):
        self.tokenizer = tokenizer
        self.file = file
        self.pending = []
        self.prompt_seen = False
        self.mid_line = False  # text printed since the last newline

    def put(self, ids):
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.pending.extend(int(i) for i in as_numpy(ids).reshape(-1))
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._print(text)
            self.pending = []

    def end(self):
        self._print(self.tokenizer.decode(self.pending, skip_special_tokens=True) + "\n")
        self.pending = []
        self.prompt_seen = False

    def interrupted(self):
        """Generation stopped early: end the answer's line (its pending bytes are dropped)."""
        if self.mid_line:
            self._print("\n")
        self.pending = []
        self.prompt_seen = False

    def _print(self, text):
        if text:
            self.mid_line = not text.endswith("\n")
        print(text, end="", flush=True, file=self.file or sys.stdout)


def format_timings(load, preprocess, start, clock, prompt_tokens, batch, mode):
    """One line: load, preprocess, prefill (vision tower + prompt, to the first token), decode tokens/s."""
    parts = [f"load {load:.2f} s", f"preprocess {preprocess:.2f} s"]
    steps = clock.times[1:]
    compiled = " incl. graph compilation" if mode == "graph" else ""
    if steps:
        tokens = f"{prompt_tokens} prompt tokens" if batch == 1 else f"batch {batch} x {prompt_tokens} padded prompt tokens"
        parts.append(f"prefill {steps[0] - start:.2f} s ({tokens}{compiled})")
    # In graph mode the first decode step compiles the step's graph: reported apart from the steady rate.
    first = 1 if mode == "graph" and len(steps) > 2 else 0
    timed = steps[first:]
    if len(timed) > 1:
        rate = (len(timed) - 1) / max(timed[-1] - timed[0], 1e-9)
        text = f"decode {rate:.2f} tokens/s ({len(steps) - 1} steps"
        if batch > 1:
            text = f"decode {rate:.2f} steps/s = {rate * batch:.2f} tokens/s (batch {batch}, {len(steps) - 1} steps"
        if first:
            text += f"; the first, {steps[1] - steps[0]:.2f} s, compiled the graph and is left out of the rate"
        parts.append(text + ")")
    return "timings: " + " | ".join(parts)


def settings_line(settings, policy, folder, cpu_isa=None):
    """One line: the checkpoint, mode, device and the precision policy's choice for each part of the model."""
    d = policy.describe()
    device = d["device"] + (f" (oneDNN {cpu_isa})" if d["device"] == "CPU" and cpu_isa else "")
    return (f"model {folder} | {settings.mode} mode | device {device} | weights/matmuls {d['linear/embedding']}, "
            f"Conv3d {d['patch_embed Conv3d']}, attention {d['attention']}, norms {d['LayerNorm/RMSNorm']} | "
            f"tensor parallel {settings.tensor_parallel}"
            + (f" | launch nice {settings.launch_nice}" if settings.launch_nice else ""))


def warning_printer(say):
    """A ``warnings.showwarning`` that hands each warning to ``say`` as one line, like every other diagnostic."""
    def show(message, category, filename, lineno, file=None, line=None):
        say(f"warning: {message}")
    return show


def write_answers(requests, answers, output, say):
    """The batch's answers as JSON lines, in the file's order, each with its line number and id: to ``output``
    (atomically) or stdout."""
    lines = []
    for request, answer in zip(requests, answers):
        row = {"line": request["line"]}
        if request["id"] is not None:
            row["id"] = request["id"]
        row["answer"] = answer
        lines.append(json.dumps(row, ensure_ascii=False))
    if output:
        write_atomically(output, lines)
        say(f"wrote {len(lines)} answers to {output}")
    else:
        for line in lines:
            print(line, flush=True)


def output_target(path):
    """(the file ``path`` names, following symlinks; whether it is something other than a regular file that
    exists: a device such as /dev/stdout, a FIFO)."""
    target = os.path.realpath(path)
    try:
        special = not stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        special = False
    return target, special


def write_atomically(path, lines):
    """All lines or nothing at ``path``: a temporary file beside it, renamed over it once complete. A symlink's
    target is written and the link stays. A device or a FIFO is written in place, as a shell's ``>`` would:
    renaming a file over it would replace the device itself (as root, /dev/null or /dev/full). A new file gets
    the mode the umask gives, an existing one keeps its own. An I/O error (a full disk, a folder made read-only
    meanwhile) names ``path``."""
    target, special = output_target(path)
    tmp = None
    try:
        if special:
            with open(target, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
            return
        if os.path.exists(target):
            mode = stat.S_IMODE(os.stat(target).st_mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".tmp",
                                   dir=os.path.dirname(target))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path}: {e.strerror or e}") from e
        raise
