"""Graphs compiled once for inputs of any shape.

In GRAPH_MODE MindSpore compiles a cell again for every new combination of input shapes, and a compilation
costs seconds (a 28-layer decode step 6-7 s, a shared layer step about 1 s, on the 2-core CPU of the
development machine). Cells whose inputs change shape from request to request (the vision tower's steps, the
decoder's prompt steps, the cache writes) declare their inputs with dynamic dimensions (`Cell.set_inputs`
with None), so that one compilation serves every image size, prompt length and batch.

A dynamic-shape graph re-infers its kernels' shapes at every call, and on the CPU backend some kernels are
slower in it: implicitly broadcasting elementwise ops (several times slower than broadcast_to and then the op,
see kernels.broadcast), transposes (about 4x), reshapes computed from a dynamic dimension (host-side shape
arithmetic at every call). The dynamic steps are written without them; then they run as fast as static ones.
The decode step, a thousand small kernels per token, stays static all the same (1.5-2x slower dynamic) and is
compiled per (batch rows, cache length) bucket (generation.py).

The vision tower's block steps remain 10-16 % slower dynamic than static all the same (2b-slice widths, 1024 to
10000 patches). A workload that sends one image size again and again earns that back: `HotLayouts` decides,
by measured time, when a size has cost enough to get static graphs of its own (`Step.static`).
"""
import contextlib
import gc
import time
import warnings

import mindspore as ms
from mindspore import Tensor, nn


@contextlib.contextmanager
def new_objects_collected_only():
    """Within: the garbage collector sees only the objects made since it began.

    MindSpore 2.10 runs a full `gc.collect()` before it compiles each graph (graph/api.py), a walk over every
    object of the process: mindspore's, transformers', numpy's, the model's. After loading at `overhead` that is
    about 460 000 objects, and the 13 collections of a fresh process's first request took 2.6 s of its 6.8 s
    (AMD EPYC development CPU). The objects that exist when a call begins are set aside (`gc.freeze`), so that a
    collection during it walks only the ones made since; they are put back when it ends (`gc.unfreeze`), and the
    collector is then as it was, with every object it tracked. Nothing is set aside when something else has
    frozen objects already (a pre-fork server, say): putting them back would undo that.

    Only for calls that may compile (`_call`): putting the objects back moves the young ones to the
    oldest generation and restarts the young generation's count, so around every call of a decode loop the
    collector would rarely run."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_compiling = 0  # calls that may compile, running now (see compiling)


def compiling():
    """Whether a call that may compile is running. A KeyboardInterrupt raised while MindSpore's graph compiler runs
    Python code is caught there, logged with its traceback, and raised again: cli_interrupt waits for this to
    end before it interrupts the scripts."""
    return _compiling > 0


def _call(call, seen, args):
    """call(*args) for a cell whose graphs are per shape: the first call with these arguments' shapes and dtypes
    (recorded in `seen`) may compile, and runs as `compiling` with only new objects collected; the calls after it
    run the graph it compiled."""
    key = tuple((tuple(a.shape), a.dtype) if isinstance(a, Tensor) else type(a) for a in args)
    if key in seen:
        return call(*args)
    seen.add(key)
    global _compiling
    _compiling += 1
    try:
        with new_objects_collected_only():
            return call(*args)
    finally:
        _compiling -= 1


def dynamic(shape, dtype=ms.float32):
    """An input spec; None in `shape` marks a dimension that changes from call to call."""
    return Tensor(shape=list(shape), dtype=dtype)


def like(tensors):
    """Static specs of the given tensors (weights: their shapes never change)."""
    if any(t is None for t in tensors):
        raise ValueError("every weight of a shared step must be a tensor")
    return [Tensor(shape=list(t.shape), dtype=t.dtype) for t in tensors]


class Step(nn.Cell):
    """A cell run as one graph. Its input specs (`specs()`, see `dynamic`; None: static shapes) are declared at
    its first call, when the weights it is given have their final shapes (after loading and tensor-parallel
    sharding).

    Calls after the first take MindSpore's inference fast path (the "increment" phase of Cell._predict), which
    skips the argument checks and the graph lookup, when one graph serves every call: a step with declared
    specs (one dynamic-shape graph, and the specs fix every input's rank and dtype), or one whose subclass says
    `fixed_shapes` (every call has the same shapes and dtypes). A call of other shapes would run the graph
    compiled for the first ones, so a static step called with several shapes (DecodeOneToken over the engine's
    cache views) takes the usual path. On the development CPU (AMD EPYC) the fast path saved 0.2 ms a call:
    one prompt through the 28 layers of `overhead` took 0.052-0.066 s against 0.083-0.084 at 100 tokens, and
    0.64-0.66 against 0.81-0.83 at 2000; a layer-wise decode token (layerwise.py, 30 calls) 27.5-29.4 ms
    against 34.2."""

    fixed_shapes = False

    def __init__(self):
        super().__init__(auto_prefix=False)  # a step holds cells of the model: it must not rename parameters
        self.declared = False
        self.shapes_seen = set()

    def specs(self):
        return None

    def __call__(self, *args):
        if not self.declared:
            specs = self.specs()
            if specs is not None:
                self.set_inputs(*specs)
            if self.fixed_shapes or specs is not None:
                self.phase = "increment"  # one graph serves every call: the fast path (see above)
            self.declared = True
        elif self.phase == "increment":
            return super().__call__(*args)  # compiled at the first call, never again
        return _call(super().__call__, self.shapes_seen, args)

    def compiled(self):
        """Graphs compiled for this step so far, its static twin's included (0 in PYNATIVE_MODE)."""
        twin = self.__dict__.get("_static")
        return len(self.compile_cache) + (0 if twin is None else len(twin.compile_cache))

    @property
    def static(self):
        """This step compiled for the exact shapes it is called with: one graph per shape."""
        twin = self.__dict__.get("_static")
        if twin is None:
            twin = _StaticTwin(self)
            object.__setattr__(self, "_static", twin)  # not a sub-cell: no parameter of its own
        return twin


class _StaticTwin(nn.Cell):
    def __init__(self, step):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "step", step)
        self.shapes_seen = set()

    def __call__(self, *args):
        return _call(super().__call__, self.shapes_seen, args)  # a new shape compiles

    def construct(self, *args):
        return self.step.construct(*args)


# What a static graph saves against the dynamic one, as a share of the dynamic time: the vision tower's two block
# steps, static against dynamic, 2b-slice widths on the development CPU (AMD EPYC, 2 cores): 256 patches 0.34
# against 0.37 s, 1024 patches 1.26 against 1.40, 4096 6.9 against 7.7, 10000 27.3 against 32.5.
STATIC_GAIN = 0.1
# Patches of all hot layouts together. Each static graph keeps its own workspace: a 4096-patch layout held about
# 500 MB more than the dynamic steps at the 2B widths, a 10000-patch one about 1.5 GB more.
HOT_PATCHES = 8192
# And at most this many layouts, so that a workload compiles a bounded number of graphs (two a layout, more when a
# big frame's attention is split into query blocks of two lengths).
HOT_LAYOUTS = 4


class HotLayouts:
    """Which input layouts (the vision tower's image grids) run in static graphs (`Step.static`) rather than the
    dynamic ones.

    A layout rents before it buys: it runs dynamic until the time it has spent there, times `gain`, reaches what
    compiling its static graphs costs. Then they are compiled, if the layout's patches fit in what is left of
    `budget` and fewer than `limit` layouts are hot, and kept for the model's life (no eviction, so nothing is
    compiled twice and memory stops growing once the hot set is full). The compile cost is measured at each
    promotion (the first static call against the layout's dynamic calls). Until then the dynamic graphs' own
    compilation stands for it: the first call of all less the next call of its layout (the first call alone
    until that layout comes again). A workload of ever new sizes compiles nothing here; one that repeats a size
    gets the static speed once the repeats have paid for it. budget=0 turns it off.

    Each process decides alone, by its own clock: under tensor parallelism the tower is replicated and runs no
    collective, so ranks that decide differently never wait on each other (and on the CPU backend static and
    dynamic steps gave bit-identical features).
    """

    TRACKED = 4096  # layouts whose dynamic time is remembered (the oldest is forgotten first)

    def __init__(self, budget=HOT_PATCHES, limit=HOT_LAYOUTS, gain=STATIC_GAIN):
        self.budget, self.limit, self.gain = budget, limit, gain
        self.spent = {}  # layout -> [seconds run dynamic, calls]
        self.hot = {}  # layout -> its patches: runs static
        self.compiled = set()  # hot layouts whose static graphs have run
        self.failed = set()  # layouts whose static graphs failed: dynamic for good
        self.compile_s = None  # what compiling a layout's static graphs costs, seconds
        self.first = None  # the layout of the first call of all, until it is seen again

    def used(self):
        """Patches of the hot layouts."""
        return sum(self.hot.values())

    def _promote(self, layout, patches):
        if layout in self.hot:
            return True
        if (self.compile_s is None or layout in self.failed or len(self.hot) >= self.limit
                or self.used() + patches > self.budget):
            return False
        seconds, calls = self.spent.get(layout, (0.0, 0))
        if not calls or self.gain * seconds < self.compile_s:  # a layout is seen run dynamic at least once
            return False
        self.hot[layout] = patches
        return True

    def run(self, layout, patches, fn):
        """fn(static) for a call of `layout` (`patches` patches in all), timed and accounted for."""
        static = self._promote(layout, patches)
        t = time.perf_counter()
        try:
            out = fn(static)
        except Exception as e:
            if not static:
                raise
            # A static graph that fails to build or run (out of device memory, say) must not fail a request the
            # dynamic ones ran before: the layout goes back to them for good. The tower is a pure function, so
            # running it again is safe.
            del self.hot[layout]
            self.failed.add(layout)
            warnings.warn(f"static vision graphs for {layout} failed ({type(e).__name__}: {e}); that layout "
                          "runs the dynamic ones from now on")
            return fn(False)
        elapsed = time.perf_counter() - t
        if static and layout not in self.compiled:
            self.compiled.add(layout)
            seconds, calls = self.spent.pop(layout, (0.0, 0))
            if calls:
                self.compile_s = max(0.0, elapsed - (1 - self.gain) * seconds / calls)
                self.first = None
        elif not static and self.compile_s is None:
            self.compile_s, self.first = elapsed, layout
        elif not static and len(self.hot) < self.limit:
            if self.first == layout:  # the first layout again: its first call less this one is the compilation
                self.compile_s, self.first = max(0.0, self.compile_s - elapsed), None
            record = self.spent.setdefault(layout, [0.0, 0])
            record[0] += elapsed
            record[1] += 1
            if len(self.spent) > self.TRACKED:
                del self.spent[next(iter(self.spent))]
        return out


# MindSpore's persistent compile cache (MS_COMPILER_CACHE_ENABLE) is not used. It stores the N-th graph a process
# compiles as compile_cache_N.mindir and gives that file to the N-th compilation of the next process, whatever
# graph it is; on the MindSpore 2.10 CPU backend a process that compiled the same graphs in another order ran the
# wrong ones (wrong numbers, or a Reshape size error), and giving each graph a cache folder of its own did not
# help: within a process every graph went to the folder of the first. Request shapes decide the compile order
# here, so it cannot be kept the same from one process to the next.
