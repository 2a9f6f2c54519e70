"""Convert a Hugging Face Qwen3-MoE checkpoint into one .m file, from a checkout (see dmoe/convert.py; an
install has `dmoe convert`).

    python converter/convert_hf.py --arch qwen3_moe HF_DIR --type q40 -o model.m
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmoe.convert import convert, main  # noqa: E402

__all__ = ["convert", "main"]

if __name__ == "__main__":
    sys.exit(main())
