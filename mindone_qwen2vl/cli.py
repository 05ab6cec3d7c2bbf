"""The command lines of scripts/test_vqa.py (images) and scripts/video_understanding.py (videos).

One flow for both: flags over a YAML preset -> checked requests -> processor and inputs -> model -> generate.
A single request streams its answer to stdout; a --batch_file is answered as one left-padded batch into JSON
lines. Notices, warnings and timings go to stderr, so stdout holds only answers.

Bad arguments (flags, numbers, combinations, missing files, presets, every line of a batch file, the output folder,
the download limits) are found before MindSpore models, transformers or media are loaded, and exit with 2; anything
failing after that exits with 1; Ctrl-C exits with 130 (the scripts route it past MindSpore's own SIGINT handler,
see cli_interrupt.py). Each prints one line on stderr; --debug shows the traceback instead. Nothing is written
unless the whole run succeeds.

The pieces: cli_args.py (the flags), cli_settings.py (flags over the preset, checked), cli_requests.py (the
conversations and batch files), cli_output.py (streaming, timings, atomic writes); this file runs them.
"""
import os
import sys
import time
import warnings

from .cli_args import UsageError, build_parser
from .cli_output import Clock, TokenPrinter, as_numpy, format_timings, settings_line, warning_printer, write_answers
from .cli_settings import Settings, resolve_settings

__all__ = ["main", "run", "UsageError"]

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def run(settings: Settings, say):
    """Load, preprocess, generate, print. `say(text)` writes a diagnostic line on stderr (rank 0 only)."""
    # transformers' advice that torch is absent is beside the point: only its tokenizer and processors are used.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from .default_model import RANDOM_WEIGHTS_NOTICE, default_checkpoint

    t = time.perf_counter()
    if settings.model is None:
        say(RANDOM_WEIGHTS_NOTICE)
        folder = default_checkpoint()
    else:
        from .loading import resolve_folder

        folder = resolve_folder(settings.model)

    # A bad config.json (or a model_type we do not serve) fails here, named, before anything heavy is loaded.
    config, model_cls, processor_cls = _read_config(folder)
    main_rank = True
    if settings.tensor_parallel > 1:
        from .parallel import check_tensor_parallel, init_tensor_parallel, is_main_rank

        try:
            check_tensor_parallel(config.text_config, settings.tensor_parallel)
            init_tensor_parallel(settings.tensor_parallel)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--tensor_parallel {settings.tensor_parallel}: {e}") from None
        main_rank = is_main_rank()
        if not main_rank:
            say = _silent

    with warnings.catch_warnings():
        warnings.showwarning = warning_printer(say)
        _run_pipeline(settings, folder, main_rank, say, t, model_cls, processor_cls)


def _read_config(folder):
    """(config, model class, processor class) of the checkpoint, the classes chosen by its model_type."""
    from .models import classes_of

    path = os.path.join(folder, "config.json")
    try:
        model_cls, processor_cls = classes_of(folder)
        return model_cls.config_class.from_pretrained(folder), model_cls, processor_cls
    except (ValueError, TypeError) as e:  # TypeError: a key of the wrong type reaching a dataclass
        text = str(e)
        raise ValueError(text if path in text else f"{path}: {text}") from e


def _run_pipeline(settings, folder, main_rank, say, t, model_cls, processor_cls):
    import mindspore as ms

    from .precision import resolve_policy

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")  # the user's oneDNN cap
    policy = resolve_policy(settings.dtype, settings.attn_implementation, settings.conv_dtype)
    say(settings_line(settings, policy, folder, isa))
    processor = processor_cls.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"  # generation continues every row at the same position
    load = time.perf_counter() - t

    # Inputs before the model: a bad image fails in seconds, not after loading 100 GB of weights.
    t = time.perf_counter()
    inputs = _prepare(processor, settings.requests)
    preprocess = time.perf_counter() - t

    t = time.perf_counter()
    ms.set_context(mode=ms.GRAPH_MODE if settings.mode == "graph" else ms.PYNATIVE_MODE)
    model = model_cls.from_pretrained(
        folder, policy=policy, progress=main_rank,
        tensor_parallel_size=settings.tensor_parallel if settings.tensor_parallel > 1 else None)
    load += time.perf_counter() - t
    if settings.launch_nice:
        from .launch_priority import lower_launch_priority

        if not lower_launch_priority(settings.launch_nice):
            say(f"warning: --launch_nice {settings.launch_nice} does nothing on this device (CPU on Linux only)")

    if settings.seed is not None:
        ms.set_seed(settings.seed)
    clock = Clock(TokenPrinter(processor.tokenizer) if not settings.batch and main_rank else None)
    batch, prompt_len = inputs["input_ids"].shape
    start = time.perf_counter()
    try:
        out = model.generate(**inputs, **settings.generation, streamer=clock, progress=settings.batch and main_rank)
    except KeyboardInterrupt:
        clock.interrupted()  # the partial answer's line ends before the "interrupted" line
        raise
    new = as_numpy(out)[:, prompt_len:]

    if settings.batch and main_rank:
        write_answers(settings.requests, processor.batch_decode(new, skip_special_tokens=True), settings.output, say)
    say(format_timings(load, preprocess, start, clock, prompt_len, batch, settings.mode))


def _prepare(processor, requests):
    """The batch's inputs, one left-padded batch. When an image or video of a batch file does not load (its error
    names the file), the error names the batch line too: the conversations are then tried one by one, on this
    failure path only, to find the first that fails."""
    conversations = [r["messages"] for r in requests]
    try:
        return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                             return_dict=True, padding=True)
    except (ValueError, OSError) as error:
        if not requests[0].get("where"):  # the command line's one conversation: the error names its file
            raise
        if len(requests) == 1:
            raise ValueError(f"{requests[0]['where']}: {error}") from error
        for request in requests:
            try:
                processor.apply_chat_template([request["messages"]], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)
            except (ValueError, OSError) as failed:
                raise ValueError(f"{request['where']}: {failed}") from error
        raise


def _silent(_text):
    pass


def _one_line(error):
    text = str(error).strip()
    first = text.splitlines()[0].strip() if text else ""
    # MindSpore's C++ errors continue with a call stack: the first line carries the reason.
    if isinstance(error, (ValueError, OSError, RuntimeError, UsageError)) and first:
        return first
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def main(kind, argv=None):
    """Run one command line; returns the exit code (0 done, 1 failure, 2 bad arguments, 130 interrupted)."""
    parser = build_parser(kind)
    prog = parser.prog
    debug = False

    def say(text):
        # One write with its newline: a Ctrl-C between print's text and its newline left the line open, and the
        # "interrupted" line was then written onto its end.
        sys.stderr.write((f"{prog}: {text}" if text.startswith("warning:") else text) + "\n")
        sys.stderr.flush()

    mode = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        debug = args.debug
        settings = resolve_settings(kind, args)
        import mindspore as ms

        mode = ms.get_context("mode")
        run(settings, say)
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # every failure is one line; --debug shows where it came from
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if mode is not None:  # when called in-process (tests), leave MindSpore's mode as it was
            import mindspore as ms

            ms.set_context(mode=mode)
