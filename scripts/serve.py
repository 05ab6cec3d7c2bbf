"""An OpenAI-compatible server for Qwen2-VL and Qwen2.5-VL on MindSpore (chat completions with images and
videos, streaming).

    python scripts/serve.py --model_name_or_path ./Qwen2-VL-2B-Instruct --port 8000 --max_batch 8

The model and processor classes follow the checkpoint's config.json `model_type` (mindone_qwen2vl/models.py).
Without --model_name_or_path a tiny model with random weights answers (meaningless text). All options:
`python scripts/serve.py --help`; the API: README.md, "Serving".
"""
import sys

# First: a Ctrl-C while MindSpore and FastAPI are imported stops the server once it can (cli_interrupt.py).
from mindone_qwen2vl.cli_interrupt import record_stop_signals

received = record_stop_signals()

import mindspore  # noqa: E402,F401  (before anything that may import decord: the other order aborts the process)

from mindone_qwen2vl.serving import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(received=received))
