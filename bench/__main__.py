"""`python -m bench`: see bench/cli.py or `python -m bench --help`."""
import os
import sys


def _use_interpreter_without_gpu() -> None:
    """Without a CUDA device Triton can only run interpreted, and TRITON_INTERPRET is read
    when triton is first imported: set it before anything imports triton."""
    if os.environ.get("TRITON_INTERPRET"):
        return
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:  # no usable torch: cli reports it
        has_gpu = False
    if not has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"


if __name__ == "__main__":
    _use_interpreter_without_gpu()
    from bench.cli import main

    sys.exit(main())
