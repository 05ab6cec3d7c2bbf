"""The CPU launcher thread (cpu_tuning): in graph mode on the CPU backend the model's entry points run on one
thread at nice 19 so that MindSpore's busy-waiting kernel caller does not take CPU time from its pool threads."""
import json
import os
import subprocess
import sys

import mindspore as ms
import pytest

pytestmark = pytest.mark.skipif(
    ms.get_context("device_target") != "CPU" or sys.platform != "linux",
    reason="the launcher thread is for the CPU backend on Linux",
)

_SCRIPT = r"""
import json, os, sys, threading
import numpy as np, mindspore as ms
ms.set_context(mode=ms.GRAPH_MODE)
from mindone_qwen2vl import Qwen2VLForConditionalGeneration, cpu_tuning

def nice(tid):
    with open(f"/proc/self/task/{tid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[16])  # field 19 of proc(5)

def comm(tid):
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()

class Threads:  # a streamer that notes the thread generate runs on
    def __init__(self):
        self.ids = set()
    def put(self, ids):
        self.ids.add(threading.get_native_id())
    def end(self):
        pass

model = Qwen2VLForConditionalGeneration.from_pretrained(sys.argv[1], progress=False)
ids = np.array([[5, 9, 2, 7, 3, 11, 4]])
out = {"main": threading.get_native_id()}
logits, tokens, ran_on = {}, {}, {}
for setting in ("1", "0", "1"):
    os.environ[cpu_tuning.LAUNCHER_VARIABLE] = setting
    streamer = Threads()
    tokens[setting] = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, streamer=streamer).tolist()
    logits[setting] = model(ids).logits.asnumpy()
    ran_on[setting] = sorted(streamer.ids)
out["launcher"] = cpu_tuning._LAUNCHER.thread.native_id
out["ran_on"] = ran_on
out["same_logits"] = bool(np.array_equal(logits["1"], logits["0"]))
out["same_tokens"] = tokens["1"] == tokens["0"]
# generate called from a thread of the user's (HF's TextIteratorStreamer pattern) goes to the launcher too
user = {}
def from_user_thread():
    streamer = Threads()
    user["tokens"] = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, streamer=streamer).tolist()
    user["ran_on"] = sorted(streamer.ids)
worker = threading.Thread(target=from_user_thread)
worker.start()
worker.join()
out["user_thread"] = user["tokens"] == tokens["0"] and user["ran_on"] == ran_on["1"]
try:
    model(ids, logits_to_keep=-1)
except ValueError as error:
    out["error"] = str(error)
out["threads"] = [[t, comm(t), nice(t)] for t in map(int, os.listdir("/proc/self/task"))]
ms.set_context(mode=ms.PYNATIVE_MODE)
out["pynative_launcher"] = cpu_tuning.launcher_in_use()
print("RESULT=" + json.dumps(out))
"""


def test_graph_mode_runs_on_a_low_priority_launcher_thread(tiny_hf):
    env = dict(os.environ)
    env.pop("MINDONE_QWEN2VL_CPU_LAUNCHER", None)
    run = subprocess.run([sys.executable, "-c", _SCRIPT, tiny_hf[1]], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT=", 1)[1])
    main, launcher = out["main"], out["launcher"]
    # generate (and the streamer it calls) ran on the launcher; with the switch at 0, on the caller's thread
    assert out["ran_on"] == {"1": [launcher], "0": [main]}
    assert launcher != main
    assert out["same_logits"] and out["same_tokens"]
    assert out["user_thread"]
    # a bad argument raised on the launcher reaches the caller as itself
    assert "logits_to_keep must be an int >= 0" in out["error"]
    nice = {tid: value for tid, _, value in out["threads"]}
    assert nice[launcher] == 19
    # MindSpore's pool threads, which do the work, keep the caller's priority: they were started before the
    # launcher lowered its own (a new thread inherits its creator's)
    pool = [value for _, name, value in out["threads"] if name in ("ActorThread_0", "KernelThread_0")]
    assert pool == [nice[main]] * 2, out["threads"]
    assert not out["pynative_launcher"]  # pynative: no launcher
