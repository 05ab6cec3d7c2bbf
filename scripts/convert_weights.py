#!/usr/bin/env python
"""Convert a Hugging Face Qwen2-VL or Qwen2.5-VL checkpoint (torch .bin or safetensors) into a MindSpore one.

    python scripts/convert_weights.py --src Qwen2-VL-7B-Instruct --dst Qwen2-VL-7B-Instruct-ms --dtype bf16

DST keeps config.json's model_type and loads with the classes it names (mindone_qwen2vl.models.classes_of),
e.g. `Qwen2_5_VLForConditionalGeneration.from_pretrained(DST)` and `Qwen2_5_VLProcessor.from_pretrained(DST)`.
Exit codes: 0 done, 1 conversion failed (one line on stderr naming the file and the problem; nothing is left at
DST), 2 bad arguments (among them a missing SRC, or a DST that exists without --overwrite), 130 interrupted
(nothing is left at DST).
"""
import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="HF checkpoint folder (config.json, *.safetensors or *.bin, tokenizer)")
    p.add_argument("--dst", required=True, help="folder to create (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="cast the weights (default: keep the checkpoint's own dtype)")
    p.add_argument("--format", dest="fmt", choices=["safetensors", "ckpt"], default="safetensors",
                   help="MindSpore safetensors (default; written tensor by tensor) or MindSpore .ckpt "
                        "(ms.save_checkpoint, which holds a whole shard in memory)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once the new one is done)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading DST back and comparing every tensor with the source")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    args = p.parse_args(argv)
    if os.path.realpath(args.src) == os.path.realpath(args.dst):
        p.error("--src and --dst are the same folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    convert = None
    try:
        # Imported after parsing: --help and argparse's errors should not wait for MindSpore to load.
        import mindone_qwen2vl.convert as convert

        summary = convert.convert_checkpoint(args.src, args.dst, dtype=args.dtype, fmt=args.fmt,
                                             overwrite=args.overwrite, verify=args.verify, progress=args.progress)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("convert_weights: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # every failure becomes one line; --debug shows where it came from
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"convert_weights: error: {message}", file=sys.stderr)
        # A bad argument (missing SRC, existing DST, ...) is found before anything is read or written.
        return 2 if convert is not None and isinstance(e, convert.ArgumentError) else 1
    print(summary)
    return 0


if __name__ == "__main__":
    # Run from a clone without installing, and Ctrl-C past MindSpore's own SIGINT handler (cli_interrupt.py).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mindone_qwen2vl.cli_interrupt import route_ctrl_c_to_main_thread

    route_ctrl_c_to_main_thread()
    sys.exit(main())
