#!/usr/bin/env python
"""Ask Qwen2-VL or Qwen2.5-VL about one or more images; the answer streams as it is generated, then the timings.

    python scripts/test_vqa.py --image demo.jpg --prompt "What is in this picture?"
    python scripts/test_vqa.py --config qwen2-vl-7b-instruct --model_name_or_path ./Qwen2-VL-7B-Instruct \\
        --image a.jpg --image b.jpg --prompt "What differs between these two images?"
    python scripts/test_vqa.py --model_name_or_path ./Qwen2-VL-2B-Instruct --batch_file requests.jsonl --output answers.jsonl

Without --model_name_or_path a tiny model with random weights (built once under ~/.cache/mindone_qwen2vl)
runs the whole pipeline: the answer is meaningless. The model and processor classes follow the
checkpoint's config.json `model_type` (qwen2_vl, qwen2_5_vl; mindone_qwen2vl/models.py). All options: --help (mindone_qwen2vl/cli_args.py).
Exit codes: 0 done, 1 failure, 2 bad arguments, 130 interrupted (Ctrl-C; nothing is written).
"""
import os
import sys

# Run from a clone without installing: the package next to this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Before any import that starts threads (numpy's BLAS, MindSpore): see cli_interrupt.py.
from mindone_qwen2vl.cli_interrupt import route_ctrl_c_to_main_thread  # noqa: E402

route_ctrl_c_to_main_thread()

from mindone_qwen2vl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("image"))
