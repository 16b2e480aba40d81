"""Training MoM models: `python -m mom_compile.train --help` (one device), or the same command under
`torchrun --nproc-per-node N` (data-parallel with FSDP2).

    cli.py          the command line; options.py its defaults and how --resume fills them in
    trainer.py      the loop: micro-batches, AdamW step, logging, evaluation, checkpoints, final model
    data.py         what the loop asks of a data source; mqar.py and text_data.py (+ tokenizer.py)
    optim.py        AdamW and the warm-up + cosine schedule
    distributed.py  torchrun's process group and FSDP2 sharding
    checkpoint.py   atomic, sharded checkpoints (torch.distributed.checkpoint) and resuming
    metrics.py, plot.py  metrics.jsonl, the progress display, PNG curves

The package sits above the model (mom_compile.graphs); the export package never imports it: a run
hands export its final model folder, written by `save_pretrained`.
"""
from .cli import main
from .mqar import Mqar

__all__ = ["Mqar", "main"]
