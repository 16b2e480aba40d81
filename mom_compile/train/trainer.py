"""The training loop: a MomForCausalLM, its data, AdamW, checkpoints and metrics, on one device or
data-parallel under torchrun (FSDP2).

Step s (0-based) reads global batch s of the data source; process r takes its rows
[r * B * A, (r + 1) * B * A), in A micro-batches of B rows. Each micro-batch's loss (the model's
cross-entropy plus aux_loss_scale times the load-balancing loss) is divided by A before backward and
FSDP averages the gradients over the processes, so the update is the mean over all micro-batches:
the same for any split of one global batch into processes and accumulation steps of B rows.
"""
from __future__ import annotations

import math
import os
import time

import torch

from mom_compile import MomConfig, MomForCausalLM
from mom_compile.graphs.checkpoint import SAFETENSORS_NAME
from mom_compile.graphs.config import CONFIG_NAME
from mom_compile.interrupts import caused_by_interrupt, sigterm_as_interrupt

from .checkpoint import (
    FOLDER,
    LATEST,
    damaged,
    load_checkpoint,
    read_trainer_state,
    remove_partial,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import IGNORE_INDEX, Source, next_token_accuracy
from .distributed import World, close_world, default_device, full_parameters, init_world, shard_model
from .errors import Interrupted, TrainError
from .metrics import MetricsFile, Progress, Throughput, format_count
from .mqar import Mqar, check_mqar
from .optim import apply_settings, build_optimizer, build_scheduler
from .options import saved_settings, settle
from .plot import plot_metrics, require_matplotlib
from .text_data import PackedText
from .tokenizer import end_of_document, load_tokenizer

METRICS_NAME = "metrics.jsonl"


def run(args) -> None:
    """Train as `args` (the command line's namespace) say; raises TrainError or Interrupted."""
    device = args.device or default_device()
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise TrainError(f"--device: expected cuda, cuda:N or cpu, got {device!r} ({e})") from None
    if kind not in ("cuda", "cpu"):
        raise TrainError(f"--device: expected cuda, cuda:N or cpu, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device: {device!r} asked for, but this torch sees no CUDA device")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= (count := torch.cuda.device_count()):
        raise TrainError(f"--device: {device!r} asked for, but this machine has {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    world = init_world(device)
    trainer = None
    try:
        with sigterm_as_interrupt():
            resume = resolve_checkpoint(args.resume) if args.resume else None
            saved = read_trainer_state(resume) if resume else None
            args = _settle(args, saved)
            trainer = Trainer(args, world, resume, saved)
            trainer.fit()
    except torch.OutOfMemoryError:
        raise TrainError(_out_of_memory(args, trainer, world)) from None
    except RuntimeError as e:
        if caused_by_interrupt(e):  # Ctrl-C while torch.compile compiles: inside its own error
            raise Interrupted(_where_to_resume(trainer)) from None
        if "can't allocate memory" not in str(e):  # what the CPU allocator says when it runs out
            raise
        raise TrainError(_out_of_memory(args, trainer, world)) from None
    except KeyboardInterrupt:
        raise Interrupted(_where_to_resume(trainer)) from None
    finally:
        close_world(world)


def _settle(args, saved: dict | None):
    given = {name for name, value in vars(args).items() if value is not None}  # before defaults fill in
    args, conflicts = settle(args, saved["args"] if saved else None)
    if conflicts:
        name = conflicts[0]
        raise TrainError(f"--{name.replace('_', '-')}: the resumed run used {saved['args'][name]!r}, "
                         f"got {getattr(args, name)!r} (a resumed run keeps its data)")
    if args.task is None and given & {"eval_every", "eval_samples"}:
        raise TrainError("--eval-every/--eval-samples: only with --task mqar (held-out accuracy of the task)")
    if args.task is not None and "text_field" in given:
        raise TrainError(f"--text-field: only with --data (--task {args.task} makes its own tokens)")
    return args


def _out_of_memory(args, trainer, world: World) -> str:
    size = ""
    if trainer is not None:
        size = f"{trainer.num_parameters / 1e6:.0f}M parameters, "
    return (f"out of memory on {world.device} ({size}--batch-size {args.batch_size} x --seq-len "
            f"{args.seq_len}): lower --batch-size (raising --grad-accum keeps the global batch), add "
            "--grad-checkpointing, lower --seq-len, or spread the model over more GPUs with torchrun")


def _where_to_resume(trainer) -> str:
    if trainer is None:
        return "before training started"
    pointer = os.path.join(trainer.out, FOLDER, LATEST)
    if not os.path.isfile(pointer):
        return f"at step {trainer.step}; no checkpoint was written yet (see --save-every)"
    with open(pointer) as f:
        name = f.read().strip()
    return (f"at step {trainer.step}; the newest checkpoint is {os.path.join(trainer.out, FOLDER, name)}: "
            f"continue with `python -m mom_compile.train --resume {trainer.out}`")


class Trainer:
    """`args`: the settled options; `resume`, `saved`: the checkpoint folder to continue from and
    its trainer_state.json (None for a fresh run)."""

    def __init__(self, args, world: World, resume: str | None, saved: dict | None) -> None:
        self.world = world
        self.args = args
        self.out = args.out or _run_folder(resume)
        self._check_args()
        self.config = self._model_config(resume)
        self.global_batch = args.batch_size * args.grad_accum * world.size
        if saved and saved["global_batch"] != self.global_batch:
            raise TrainError(f"--batch-size/--grad-accum: the resumed run's global batch was "
                             f"{saved['global_batch']} sequences, this one's is {args.batch_size} x "
                             f"{args.grad_accum} x {world.size} processes = {self.global_batch}")
        # a run stopped between its last checkpoint and its final model resumes to write the model
        done = saved and args.steps == saved["step"] and _has_final_model(self.out)
        if saved and (args.steps < saved["step"] or done):
            raise TrainError(f"--steps: expected more than {saved['step']}, the resumed checkpoint's step, "
                             f"got {args.steps} (nothing would be trained)")
        self.source: Source = self._build_source()
        self._prepare_out(resume)

        torch.manual_seed(args.seed)  # the same initial weights in every process
        self.model = self._build_model().to(world.device).train()
        if args.grad_checkpointing:
            self.model.gradient_checkpointing_enable(args.grad_checkpointing)
        if world.distributed:
            shard_model(self.model, compile_blocks=args.compile)
            self.forward = self.model
        else:
            self.forward = torch.compile(self.model, fullgraph=True, dynamic=False) if args.compile \
                else self.model
        self.optimizer = build_optimizer(self.model, args.lr, args.weight_decay, tuple(args.betas))
        warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 20
        self.scheduler = build_scheduler(self.optimizer, warmup, args.steps, args.min_lr_ratio)
        self.step = 0
        if resume:
            load_checkpoint(resume, self.model, self.optimizer, world)
            self.scheduler.load_state_dict(saved["scheduler"])
            apply_settings(self.optimizer, self.scheduler, args.lr, args.weight_decay, tuple(args.betas))
            self.step = saved["step"]
        self.resumed_from = resume
        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and world.device.type == "cuda")
        metrics = os.path.join(self.out, METRICS_NAME)
        self.metrics = MetricsFile(metrics, self.step if resume else None, final=self.step == args.steps) \
            if world.main else None
        self.progress = Progress(self.step, args.steps, enabled=world.main)

    # -- setup ---------------------------------------------------------------------------------
    def _check_args(self) -> None:
        a = self.args
        if a.task is None and a.data is None:
            raise TrainError("no data: choose --task mqar or --data FILE...")
        if a.task is not None and a.tokenizer is not None:
            raise TrainError(f"--tokenizer: only with --data (--task {a.task} makes its own tokens)")
        if a.task is None and (a.mqar_pairs is not None or a.mqar_vocab is not None):
            raise TrainError("--mqar-pairs/--mqar-vocab: only with --task mqar")
        if a.warmup_steps is not None and a.warmup_steps > a.steps:
            raise TrainError(f"--warmup-steps: expected at most --steps={a.steps}, got {a.warmup_steps}")
        if a.min_lr_ratio > 1:
            raise TrainError(f"--min-lr-ratio: expected a fraction in [0, 1], got {a.min_lr_ratio}")
        if a.plot:
            require_matplotlib()

    def _model_config(self, resume: str | None) -> MomConfig:
        a = self.args
        given = None
        try:
            if a.config is not None:
                given = MomConfig.preset(a.config)
            elif a.config_json is not None:
                if not os.path.isfile(a.config_json):
                    raise TrainError(f"--config-json: no such file {a.config_json!r}")
                given = MomConfig.from_pretrained(a.config_json)
            elif a.init_from is not None:
                if not os.path.isdir(a.init_from):
                    raise TrainError(f"--init-from: {a.init_from!r} is not a folder")
                given = MomConfig.from_pretrained(a.init_from)
        except (OSError, ValueError, TypeError) as e:
            flag = "--config-json" if a.config_json is not None else "--init-from"
            raise TrainError(f"{flag}: {e}") from None
        if resume is None:
            return given or MomConfig.preset("tiny")
        try:
            config = MomConfig.from_pretrained(resume)
        except (OSError, ValueError, TypeError) as e:
            raise damaged(resume, "config.json", e) from None
        if given is not None and given.to_dict() != config.to_dict():
            raise TrainError("--config/--config-json/--init-from: the model differs from the resumed "
                             "run's (leave the option out to take the checkpoint's)")
        return config

    def _build_source(self):
        a, config = self.args, self.config
        if a.task == "mqar":
            vocab = a.mqar_vocab or config.vocab_size
            if vocab > config.vocab_size:
                raise TrainError(f"--mqar-vocab: expected at most the model's vocab_size "
                                 f"{config.vocab_size}, got {vocab}")
            pairs = a.mqar_pairs or [max(1, a.seq_len // 8)]
            problem = check_mqar(vocab, a.seq_len, pairs)
            if problem:
                raise TrainError(f"--mqar-pairs/--seq-len/--mqar-vocab: {problem}")
            return Mqar(vocab, a.seq_len, pairs, self.global_batch, a.seed)
        tokenizer = load_tokenizer(a.tokenizer)
        if tokenizer.vocab_size > config.vocab_size:
            raise TrainError(f"--tokenizer: {tokenizer.name} has {tokenizer.vocab_size} ids, more than "
                             f"the model's vocab_size {config.vocab_size}")
        eos = end_of_document(tokenizer, config.eos_token_id)
        report = (lambda message: print(message, flush=True)) if self.world.main else None
        if eos is None and report:
            report(f"note: {tokenizer.name} has no end-of-document token; documents are joined without one")
        return PackedText(a.data, tokenizer, a.text_field, a.seq_len, self.global_batch, a.seed,
                          config.vocab_size, eos, report)

    def _prepare_out(self, resume: str | None) -> None:
        out = self.out
        if os.path.exists(out) and not os.path.isdir(out):
            raise TrainError(f"--out: {out!r} exists and is not a folder")
        has_run = any(os.path.exists(os.path.join(out, n)) for n in (METRICS_NAME, FOLDER))
        owner = resume and _owner(resume)
        if has_run and resume and not (owner and os.path.realpath(owner) == os.path.realpath(out)):
            raise TrainError(f"--out: {out!r} holds another run than the one resumed ({resume!r}); "
                             "continuing there would mix the two: choose an empty folder")
        if has_run and not resume:
            if not os.path.isfile(os.path.join(out, FOLDER, LATEST)):
                raise TrainError(f"--out: {out!r} holds a run that saved no checkpoint to continue from; "
                                 "remove it or choose another folder")
            raise TrainError(f"--out: {out!r} already holds a run; continue it with --resume {out}, "
                             "or choose another folder")
        self.world.barrier()  # every process has looked before process 0 writes
        if self.world.main:
            try:
                os.makedirs(out, exist_ok=True)
                probe = os.path.join(out, ".probe")
                open(probe, "w").close()
                os.remove(probe)
            except OSError as e:
                raise TrainError(f"--out: cannot write to {out!r} ({e.strerror or e})") from None
        remove_partial(out, self.world)

    def _build_model(self) -> MomForCausalLM:
        a = self.args
        if a.init_from is None or a.resume is not None:  # a resumed run loads its checkpoint
            return MomForCausalLM(self.config)
        try:
            return MomForCausalLM.from_pretrained(a.init_from, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as e:
            raise TrainError(f"--init-from: cannot load {a.init_from!r}: {e}") from None

    # -- training ------------------------------------------------------------------------------
    def fit(self) -> None:
        a, world = self.args, self.world
        tokens_per_step = self.global_batch * a.seq_len
        self._announce(tokens_per_step)
        throughput = Throughput(self.step)
        started = time.perf_counter()
        window, window_steps = torch.zeros(4, dtype=torch.float64, device=world.device), 0
        first = True  # this process's first step: torch.compile compiles in it
        while self.step < a.steps:
            lr = self.optimizer.param_groups[0]["lr"]
            stats, grad_norm = self._train_step(self.step)
            window += stats
            window_steps += 1
            self.step += 1
            saving = a.save_every and (self.step % a.save_every == 0 or self.step == a.steps)
            # a checkpoint closes the log window too: a run resumed from it logs what this one does
            if self.step % a.log_every == 0 or self.step == a.steps or saving:
                self._log(window, window_steps, lr, grad_norm, throughput, tokens_per_step, started)
                window.zero_()
                window_steps = 0
            paused = False
            if self.is_mqar and a.eval_every and self.step % a.eval_every == 0 and self.step < a.steps:
                self._evaluate()
                paused = True
            if saving:
                self._save()
                paused = True
            # tokens/s counts training time only, and not the first step's compilation (unless that
            # step was logged alone)
            if paused or (first and window_steps):
                throughput = Throughput(self.step)
            first = False
        if self.is_mqar:
            self._evaluate()
        self._save_final()
        self.progress.close()

    @property
    def is_mqar(self) -> bool:
        return isinstance(self.source, Mqar)

    def _autocast(self):
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns [loss sum, aux sum, correct, scored] over this process's
        micro-batches, and the gradients' norm before clipping (device tensors, no host sync)."""
        a, world = self.args, self.world
        rows = a.batch_size * a.grad_accum
        ids, labels = self.source.rows(step, world.rank * rows, (world.rank + 1) * rows, world.device)
        stats = torch.zeros(4, dtype=torch.float64, device=world.device)
        for micro_ids, micro_labels in zip(ids.split(a.batch_size), labels.split(a.batch_size)):
            with self._autocast():
                out = self.forward(micro_ids, labels=micro_labels)
            (out.loss / a.grad_accum).backward()
            stats[0] += out.loss.detach()
            stats[1] += out.aux_loss.detach()
            if self.is_mqar:
                stats[2:] += next_token_accuracy(out.logits.detach(), micro_labels)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm

    def _log(self, window, steps: int, lr: float, grad_norm, throughput: Throughput, tokens_per_step: int,
             started: float) -> None:
        a = self.args
        loss_sum, aux_sum, correct, scored = self.world.sum(window).tolist()
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        micro_batches = steps * a.grad_accum * self.world.size
        loss = loss_sum / micro_batches
        if not math.isfinite(loss):
            raise TrainError(f"the loss is {loss} at step {self.step}: training diverged; lower --lr "
                             f"(now {a.lr:g}) or raise --warmup-steps")
        tokens_per_s, seconds_per_step = throughput.measure(self.step, tokens_per_step)
        record = {"step": self.step, "loss": loss, "aux_loss": aux_sum / micro_batches, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens": self.step * tokens_per_step,
                  "tokens_per_s": tokens_per_s, "elapsed_s": time.perf_counter() - started}
        if self.is_mqar:
            record["accuracy"] = correct / max(scored, 1)
        if self.metrics is not None:
            self.metrics.write(record)
        self.progress.update(self.step, loss, tokens_per_s, seconds_per_step, record.get("accuracy"))

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Held-out MQAR accuracy for each pair count over eval_samples sequences, split across the
        processes in batches of at most batch_size. Every process runs the same number of forward
        passes (FSDP gathers weights collectively); one with no rows left scores a dummy row."""
        a, world = self.args, self.world
        batches = math.ceil(math.ceil(a.eval_samples / world.size) / a.batch_size)
        totals, by_pairs = torch.zeros(2, dtype=torch.int64, device=world.device), {}
        for pairs in self.source.pairs:
            all_ids, all_labels = self.source.eval_set(pairs, a.eval_samples, world.device)
            mine = [t.tensor_split(world.size)[world.rank] for t in (all_ids, all_labels)]
            counts = torch.zeros(2, dtype=torch.int64, device=world.device)
            for index in range(batches):
                ids, labels = (t[index * a.batch_size:(index + 1) * a.batch_size] for t in mine)
                if ids.shape[0] == 0:
                    ids, labels = all_ids[:1], torch.full_like(all_labels[:1], IGNORE_INDEX)
                with self._autocast():
                    logits = self.model(ids).logits
                counts += next_token_accuracy(logits, labels)
            counts = world.sum(counts)
            totals += counts
            by_pairs[str(pairs)] = counts[0].item() / counts[1].item()
        accuracy = totals[0].item() / totals[1].item()
        if self.metrics is not None:
            self.metrics.write({"step": self.step, "eval_accuracy": accuracy,
                                "eval_accuracy_by_pairs": by_pairs})
        shown = ", ".join(f"{p} pairs {acc:.3f}" for p, acc in by_pairs.items())
        self.progress.write(f"step {self.step}: held-out accuracy {accuracy:.3f} ({shown})")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())  # a sharded DTensor counts all of it

    # -- output --------------------------------------------------------------------------------
    def _announce(self, tokens_per_step: int) -> None:
        a, world = self.args, self.world
        params = self.num_parameters
        data = (f"mqar, {','.join(map(str, self.source.pairs))} pairs, vocab {self.source.vocab_size}"
                if self.is_mqar else f"{len(a.data)} file(s), {format_count(self.source.num_tokens)} tokens "
                                     f"in {self.source.num_rows} rows")
        processes = f" x {world.size} processes (FSDP2)" if world.distributed else ""
        lines = [f"model: {params / 1e6:.2f}M parameters, {self.config.num_hidden_layers} layers, "
                 f"d={self.config.hidden_size}, {self.config.num_memories} memories (top-{self.config.topk})"
                 f"{', shared' if self.config.shared_mem else ''}",
                 f"data: {data}, sequences of {a.seq_len} tokens",
                 f"device: {world.device}{processes}, {'bf16 autocast' if self.bf16 else 'float32'}, "
                 f"{'torch.compile' if a.compile else 'eager'}",
                 f"batch: {a.batch_size} x {a.grad_accum} accumulation x {world.size} = "
                 f"{self.global_batch} sequences ({format_count(tokens_per_step)} tokens) per step, "
                 f"{a.steps} steps, lr {a.lr:g}"]
        if self.resumed_from:
            lines.append(f"resumed from {self.resumed_from} at step {self.step}")
        for line in lines:
            self.progress.write(line)

    def _save(self) -> None:
        # the data position: the next global batch is number `step` of the source
        sequences = self.step * self.global_batch
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(),
                 "args": saved_settings(self.args), "global_batch": self.global_batch,
                 "world_size": self.world.size, "sequences_seen": sequences,
                 "tokens_seen": sequences * self.args.seq_len}
        try:
            path = save_checkpoint(self.out, self.step, self.model, self.optimizer, state,
                                   self.config.to_dict(), self.world, self.args.keep_checkpoints)
        except OSError as e:
            raise TrainError(f"cannot write the checkpoint of step {self.step} into {self.out!r} "
                             f"({e.strerror or e}); the previous checkpoint is intact") from None
        self.progress.write(f"step {self.step}: saved {path}")

    def _save_final(self) -> None:
        """The trained model in the reference layout in OUT (process 0 writes; save_pretrained
        moves each file into place whole)."""
        full = full_parameters(self.model, self.world) if self.world.distributed else None
        if self.world.main:
            model = self.model if full is None else _cpu_model(self.config, full)
            try:
                model.save_pretrained(self.out)
            except (OSError, ValueError) as e:  # save_pretrained reports OSErrors as ValueErrors
                raise TrainError(f"cannot write the final model into {self.out!r} ({e})") from None
            if self.args.plot:
                for path in plot_metrics(os.path.join(self.out, METRICS_NAME), self.out):
                    self.progress.write(f"wrote {path}")
            onnx = os.path.join(self.out, "onnx")
            self.progress.write(f"final model: {self.out} (MomForCausalLM.from_pretrained, or python -m "
                                f"mom_compile.export --onnx {onnx} --checkpoint {self.out})")
        self.world.barrier()


def _has_final_model(out: str) -> bool:
    return all(os.path.isfile(os.path.join(out, name)) for name in (CONFIG_NAME, SAFETENSORS_NAME))


def _owner(checkpoint: str) -> str | None:
    """The run folder a checkpoint folder lies in (OUT/checkpoints/step-N), None outside one."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == FOLDER else None


def _run_folder(checkpoint: str) -> str:
    owner = _owner(checkpoint)
    if owner is None:
        raise TrainError(f"--out: required when --resume names a checkpoint outside a run folder "
                         f"({checkpoint!r})")
    return owner


def _cpu_model(config: MomConfig, parameters: dict[str, torch.Tensor]) -> MomForCausalLM:
    """A plain MomForCausalLM on the CPU holding the given parameters (by module name)."""
    with torch.device("meta"):
        model = MomForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(parameters[name])
    model.tie_weights()
    return model
