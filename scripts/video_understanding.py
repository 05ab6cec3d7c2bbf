#!/usr/bin/env python
"""Ask Qwen2-VL or Qwen2.5-VL about a video; the answer streams as it is generated, then the timings.

    python scripts/video_understanding.py --video clip.mp4 --prompt "What happens in this video?"
    python scripts/video_understanding.py --config qwen2-vl-7b-instruct --model_name_or_path ./Qwen2-VL-7B-Instruct \\
        --video clip.mp4 --nframes 16 --max_pixels 200704
    python scripts/video_understanding.py --model_name_or_path ./Qwen2-VL-2B-Instruct --batch_file requests.jsonl

Frames: --fps (default 2 per second) or --nframes; size: --min_pixels/--max_pixels per frame and
--total_pixels for the whole video. Without --model_name_or_path a tiny model with random weights runs the
whole pipeline: the answer is meaningless. The model and processor classes follow the checkpoint's
config.json `model_type` (qwen2_vl, qwen2_5_vl; mindone_qwen2vl/models.py). All options: --help (mindone_qwen2vl/cli_args.py).
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
    sys.exit(main("video"))
