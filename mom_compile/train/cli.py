"""`python -m mom_compile.train`: the command line. Every failure a user can cause ends in one
`error:` line and a non-zero exit status (2 for bad arguments, 1 otherwise, 130 for Ctrl-C)."""
from __future__ import annotations

import argparse
import os
import sys

from .. import cli_args
from ..graphs.model import CHECKPOINTING_SCOPES
from .options import DEFAULTS

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
PROG = "python -m mom_compile.train"

DESCRIPTION = """\
Train a Mixture-of-Memories (MoM) language model, on one device or data-parallel on several GPUs.

Choose a model (--config, --config-json or --init-from), data (--task mqar or --data FILE...), a
number of --steps and an --out folder, which receives:

  OUT/config.json + OUT/model.safetensors  the final model, in the reference `mom` layout:
                     MomForCausalLM.from_pretrained(OUT), or
                     python -m mom_compile.export --onnx OUT/onnx --checkpoint OUT
  OUT/metrics.jsonl  one JSON line per log step: loss, aux_loss, lr, grad_norm, tokens/s
                     (and MQAR accuracy, with held-out accuracy per pair count at each evaluation)
  OUT/checkpoints/   every --save-every steps and at the end: model, optimizer, schedule, step,
                     random states; --resume OUT continues from the newest, bit for bit
  OUT/loss.png       with --plot (and OUT/accuracy.png for MQAR)

One optimizer step sees the global batch: --batch-size x --grad-accum x processes sequences of
--seq-len tokens. On CUDA (the default device when present) the model runs under bf16 autocast,
on CPU in float32; torch.compile(fullgraph=True) is on unless --no-compile. Under torchrun each
process drives one GPU and the model is sharded with FSDP2; with the same global batch, N GPUs
follow the loss curve of one."""

EPILOG = """\
examples:
  python -m mom_compile.train --config tiny --task mqar --steps 200 --out runs/mqar
      the synthetic recall task on the tiny model (a few minutes on a CPU; --seq-len 64 for less)
  python -m mom_compile.train --config 340m --data corpus.jsonl --tokenizer my-tokenizer/ \\
        --seq-len 2048 --batch-size 8 --grad-accum 4 --lr 3e-4 --steps 20000 --out runs/340m --plot
      language modelling on local files with a Hugging Face tokenizer folder
  torchrun --nproc-per-node 8 -m mom_compile.train --config 340m --data corpus.jsonl ... --out runs/340m
      the same on 8 GPUs of one machine: global batch = batch size x accumulation x 8
  python -m mom_compile.train --resume runs/340m
      continue an interrupted run from its newest checkpoint (other arguments as before, or left out)
  python -m mom_compile.train --config-json my_config.json --task mqar --mqar-pairs 16,32,64 \\
        --seq-len 256 --mqar-vocab 8192 --steps 2000 --out runs/recall
      any MomConfig (a config.json), MQAR mixing 16, 32 and 64 key-value pairs per sequence"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _beta(text: str) -> float:
    value = _non_negative_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _pair_counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive pair counts, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None here: options.settle fills in DEFAULTS, or on --resume the
    resumed run's settings, so that a value given on the command line is always told apart."""
    d = DEFAULTS
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model (one of; default --config tiny)").add_mutually_exclusive_group()
    model.add_argument("--config", choices=("tiny", "340m", "1.3b"),
                       help="a built-in size with fresh weights: tiny (tests, CPU), 340m, 1.3b (the paper's)")
    model.add_argument("--config-json", metavar="FILE",
                       help="a config.json with any MomConfig fields, fresh weights")
    model.add_argument("--init-from", metavar="DIR",
                       help="start from a model folder in the reference `mom` layout (fine-tuning)")

    data = p.add_argument_group("data (one of)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--task", choices=("mqar",),
                        help="mqar: multi-query associative recall (Zoology), generated on the device; "
                             "loss and accuracy on the asked keys' values only")
    source.add_argument("--data", nargs="+", metavar="FILE",
                        help="local text files (one document each) or .jsonl files (one document per "
                             "line), tokenized at start and packed into rows of --seq-len tokens")
    data.add_argument("--tokenizer", metavar="DIR",
                      help="with --data: a Hugging Face tokenizer folder, read offline (needs "
                           "`transformers` or `tokenizers`); default: UTF-8 bytes, ids 0-255")
    data.add_argument("--text-field", metavar="NAME",
                      help=f"with .jsonl data: the field holding the text (default: {d['text_field']})")
    data.add_argument("--mqar-pairs", type=_pair_counts, metavar="N[,N...]",
                      help="with --task mqar: key-value pairs per sequence, one count drawn per "
                           "sequence (default: seq-len / 8); needs seq-len >= 4 x pairs")
    data.add_argument("--mqar-vocab", type=cli_args.int_at_least(4), metavar="N",
                      help="with --task mqar: ids used (keys from the lower half, values from the "
                           "upper; default: the model's vocab_size)")
    data.add_argument("--seq-len", type=cli_args.int_at_least(2), metavar="T",
                      help=f"tokens per sequence (default {d['seq_len']})")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--steps", type=cli_args.int_at_least(1), help=f"optimizer steps (default {d['steps']})")
    opt.add_argument("--batch-size", type=cli_args.int_at_least(1), metavar="B",
                     help=f"sequences per forward pass on each device (default {d['batch_size']})")
    opt.add_argument("--grad-accum", type=cli_args.int_at_least(1), metavar="A",
                     help=f"forward passes per optimizer step (default {d['grad_accum']})")
    opt.add_argument("--lr", type=_non_negative_float,
                     help=f"peak learning rate of AdamW (default {d['lr']:g}; ~3e-4 suits 340m and 1.3b)")
    opt.add_argument("--warmup-steps", type=cli_args.int_at_least(0), metavar="N",
                     help="linear warm-up steps, then cosine decay (default: 5%% of --steps)")
    opt.add_argument("--min-lr-ratio", type=_non_negative_float, metavar="R",
                     help=f"the learning rate at the last step, as a fraction of --lr "
                          f"(default {d['min_lr_ratio']})")
    opt.add_argument("--weight-decay", type=_non_negative_float,
                     help=f"AdamW weight decay of the weight matrices (default {d['weight_decay']})")
    opt.add_argument("--betas", type=_beta, nargs=2, metavar=("B1", "B2"),
                     help="AdamW betas (default {} {})".format(*d["betas"]))
    opt.add_argument("--grad-clip", type=_non_negative_float, metavar="NORM",
                     help=f"clip the gradients' global norm to NORM, 0 = off (default {d['grad_clip']})")

    run = p.add_argument_group("run")
    run.add_argument("--out", type=cli_args.path, metavar="DIR",
                     help="run folder (required, except with --resume)")
    run.add_argument("--resume", type=cli_args.path, metavar="DIR",
                     help="continue from a checkpoint: a run folder (its newest) or a checkpoint "
                          "folder; options left out are the resumed run's; --out defaults to its folder")
    run.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available); under "
                                      "torchrun, cuda means each process's own GPU")
    run.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                     help="bf16: autocast to bfloat16 (weights and optimizer state stay float32); "
                          "auto (default): bf16 on CUDA, fp32 on CPU")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile(fullgraph=True) the model (the default); --no-compile runs "
                          "eagerly (no warm-up, slower steps)")
    run.add_argument("--grad-checkpointing", nargs="?", const="blocks", default=None, metavar="SCOPE",
                     choices=(*CHECKPOINTING_SCOPES, "off"),
                     help="blocks (the default SCOPE): recompute each block in the backward instead of "
                          "keeping its activations, far less memory for about one more forward per step; "
                          "scan_states: recompute only the scans' chunk states, one more sequential pass "
                          "per layer; off (the default without the option): keep everything")
    run.add_argument("--seed", type=cli_args.seed,
                     help=f"seed of the weights and the data (default {d['seed']})")
    run.add_argument("--save-every", type=cli_args.int_at_least(0), metavar="N",
                     help=f"write a checkpoint every N steps and at the end, 0 = never "
                          f"(default {d['save_every']})")
    run.add_argument("--keep-checkpoints", type=cli_args.int_at_least(0), metavar="K",
                     help=f"keep the newest K checkpoints, 0 = all (default {d['keep_checkpoints']})")
    run.add_argument("--log-every", type=cli_args.int_at_least(1), metavar="N",
                     help=f"report and record metrics every N steps and at each checkpoint "
                          f"(default {d['log_every']})")
    run.add_argument("--eval-every", type=cli_args.int_at_least(0), metavar="N",
                     help="with --task mqar: held-out accuracy every N steps, 0 = at the end only (default)")
    run.add_argument("--eval-samples", type=cli_args.int_at_least(1), metavar="N",
                     help=f"with --task mqar: held-out sequences per pair count "
                          f"(default {d['eval_samples']})")
    run.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                     help="write PNG curves into OUT (needs matplotlib; default: no)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and args.resume is None:
        parser.error("--out is required (the run folder), unless --resume names one")
    from .errors import Interrupted, TrainError
    from .trainer import run

    try:
        run(args)
    except TrainError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from process 0 only
            print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"\ninterrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
