"""The two sides of the benchmark, each run in its own process by ``worker``.

seqpg: the stages ``seqpg train`` runs for a GRPO step (:mod:`seqpg.training.step`'s sample -> score -> judge,
then ``update``), timed between them; the backward pass is found by a
``TorchFunctionMode`` that sees ``Tensor.backward``.  TRL: ``GRPOTrainer.train()`` itself, with
``_generate``, ``_generate_and_score_completions``, ``compute_loss`` and ``accelerator.backward``
wrapped to record their start and end, and a callback that waits for the parent's go at the start
of each step and reports at its end.

Protocol with the parent: the worker sends ``{"ready": True, "eval": ...}`` once loaded, then
answers "step" with the step's record, "reset_peak" silently, "finish" with its peak memory.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace

import torch

from ...rollout.sampling import uses_chat_template
from .common import (BackwardClock, BenchSetup, held_out_reward, now, peak_gpu_mib, peak_rss_mib, phase_times,
                     quiet, reset_peak_rss, task, weighted_scores)
from .floor import DecodeShape, generation_bytes, sampler_storage

SEQPG_PHASES = {"sampling": ("begin", "sampled"), "scoring": ("sampled", "scored"),
                "logprob_forward": ("scored", "backward_begin"), "backward": ("backward_begin", "backward_end"),
                "optimizer": ("backward_end", "end"), "step": ("begin", "end")}
TRL_PHASES = {"sampling": ("_generate_begin", "_generate_end"),
              "scoring": ("_generate_and_score_completions_begin", "_generate_and_score_completions_end"),
              "logprob_forward": ("compute_loss_begin", "compute_loss_end"),
              "backward": ("backward_begin", "backward_end"), "optimizer": ("backward_end", "step_end"),
              "step": ("step_begin", "step_end")}  # scoring: generate-and-score less its generation


def adamw(params, lr: float) -> torch.optim.AdamW:
    """TRL's default optimizer (``adamw_torch_fused``) with its default betas, eps and weight decay."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)


class SeqpgRunner:
    """seqpg's GRPO, step by step, on the configuration's task."""

    def __init__(self, s: BenchSetup) -> None:
        from ...training.memory import keep_freed_memory
        from ...model.loading import load_model_and_tokenizer, resolve_model
        from ...training.step import StepSettings

        self.s, self.cfg = s, s.train_config()
        if self.cfg.keep_freed_memory:  # as `seqpg train` does (seqpg.training.memory)
            keep_freed_memory()
        self.train_prompts, self.held_out, self.scorers = task(self.cfg)
        self.policy, self.tok = load_model_and_tokenizer(resolve_model(self.cfg.model.name), dtype=torch.float32)
        self.policy.to(s.device).train()
        # what its decode reads: the weights in the products' dtype (bf16 under the bf16 run's autocast)
        self.decode = DecodeShape.of(self.policy), sampler_storage(self.policy, torch.bfloat16 if s.dtype == "bf16"
                                                                   else None)
        self.optimizer = adamw([p for p in self.policy.parameters() if p.requires_grad], self.cfg.optim.lr)
        # GRPO as TRL runs it (no KL, clip at norm 1, one backward: no gradient-noise measurement, which TRL
        # does not make), with the run's sampling settings; decided once, as
        # `seqpg train` decides them (seqpg.training.step.StepSettings), precision included
        grpo = replace(self.cfg, bf16=s.dtype == "bf16", algo=replace(self.cfg.algo, name="grpo", advantage=None,
                                                                     loss=None, agg=None, kl_coef=0.0, whiten=False),
                       optim=replace(self.cfg.optim, max_grad_norm=1.0, micro_batch_size=0, grad_noise=False))
        self.settings = StepSettings.from_config(grpo)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def evaluate(self) -> dict:
        return held_out_reward(self.policy, self.tok, self.cfg, self.held_out, self.scorers)

    def step(self, k: int) -> dict:
        from ...model.flops import ModelShape, shared_prompt_counts, train_flops
        from ...model.policy import shared_prompt_groups
        from ...rollout.seeding import reset_seeds
        from ...training.step import judge, score
        from ...training.update import update

        sp = self.cfg.sampling
        prompts = self.train_prompts[k * sp.prompts_per_step:(k + 1) * sp.prompts_per_step]
        marks = {"begin": now()}
        st = self.settings
        with st.autocast(self.s.device):
            rollout = st.rollouts.sample(self.policy, self.tok, prompts, n=sp.samples_per_prompt,
                                         seeds=reset_seeds(st.seed, k, 0, len(prompts)), generator=self.generator)
        marks["sampled"] = now()
        scored = score(self.policy, self.tok, rollout, prompts, self.scorers, st)  # the training step's stages
        batch = judge(rollout, scored, st, kl_coef=0.0, policy=self.policy).train_batch(rollout, st)
        marks["scored"] = now()
        clock = BackwardClock()
        with clock:
            update(self.policy, self.optimizer, batch, st.update, max_len=sp.max_new_tokens)
        marks["end"] = now()
        marks["backward_begin"], marks["backward_end"] = clock.spans[0][0], clock.spans[-1][1]
        g = shared_prompt_groups(rollout)
        lengths_B, prompt_len_B = rollout.span_lengths_B, rollout.prompt_mask_BP.sum(1)  # the tokens run
        counts = shared_prompt_counts(prompt_len_B[g.first_row_G].tolist(),
                                      [lengths_B[g.group_B == i].tolist() for i in range(g.num_groups)])
        times = phase_times(marks, SEQPG_PHASES)
        rec = {**times["wall"], "cpu": times["cpu"], "completion_tokens": int(lengths_B.sum()),
               "train_flops": train_flops(ModelShape.of(self.policy), counts),
               "sampling_bytes": generation_bytes(*self.decode, prompt_len_B.tolist(),
                                                  rollout.completion_lengths_B.tolist()),
               "reward": float(scored.batch.rewards_B.mean()), "threads": torch.get_num_threads()}
        if self.s.eval_every and (k + 1) % self.s.eval_every == 0:  # after the clock stopped
            rec["eval"] = self.evaluate()
        return rec


class TrlRunner:
    """TRL's ``GRPOTrainer`` configured like seqpg's GRPO on the same task, its phases timed."""

    def __init__(self, s: BenchSetup, conn) -> None:
        import datasets
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from ...model.loading import load_model_and_tokenizer, resolve_model

        self.s, self.conn, self.cfg = s, conn, s.train_config()
        self.train_prompts, self.held_out, self.scorers = task(self.cfg)
        policy, tok = load_model_and_tokenizer(resolve_model(self.cfg.model.name), dtype=torch.float32)
        self.decode = DecodeShape.of(policy), sampler_storage(policy, None)  # TRL samples in float32, bf16 or not
        sp = self.cfg.sampling
        rows = [{"prompt": self._trl_prompt(tok, p.text), "idx": i}
                for i, p in enumerate(self.train_prompts[:s.total_steps * sp.prompts_per_step])]
        self.rewards: list[float] = []
        self.initial_eval = (held_out_reward(policy, tok, self.cfg, self.held_out, self.scorers)
                             if s.eval_every else None)

        def seqpg_scorers(prompts, completions, idx, **_kwargs):  # TRL's reward-function signature
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            scores = weighted_scores(self.scorers, [self.train_prompts[i] for i in idx], texts)
            self.rewards.append(sum(scores) / len(scores))
            return scores

        args = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="seqpg-bench-trl-"), use_cpu=s.device == "cpu", bf16=s.dtype == "bf16",
            seed=self.cfg.seed, per_device_train_batch_size=sp.prompts_per_step * sp.samples_per_prompt,
            num_generations=sp.samples_per_prompt, max_completion_length=sp.max_new_tokens,
            temperature=sp.temperature, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2,
            loss_type="grpo", scale_rewards="group", learning_rate=self.cfg.optim.lr, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
            gradient_checkpointing=False, max_steps=s.total_steps, shuffle_dataset=False, logging_strategy="no",
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            log_completions=False)
        runner = self

        class Pace(TrainerCallback):
            def on_step_begin(self, *_args, **_kwargs):
                runner._wait_for_step()
                runner.marks = {"step_begin": now()}

            def on_step_end(self, *_args, **_kwargs):
                runner.marks["step_end"] = now()
                runner._report()

        self.trainer = GRPOTrainer(model=policy, reward_funcs=seqpg_scorers, args=args,
                                   train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                                   callbacks=[Pace()])
        self.marks: dict = {}
        for obj, name in ((self.trainer, "_generate"), (self.trainer, "_generate_and_score_completions"),
                          (self.trainer, "compute_loss"), (self.trainer.accelerator, "backward")):
            self._time(obj, name)

    def _trl_prompt(self, tok, text: str):
        """The prompt as TRL takes it: chat messages (TRL applies the chat template) or raw text."""
        sp = self.cfg.sampling
        if not uses_chat_template(tok, sp.chat_template):
            return text
        system = [{"role": "system", "content": sp.system_prompt}] if sp.system_prompt is not None else []
        return system + [{"role": "user", "content": text}]

    def _time(self, obj, name: str) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            self.marks[name + "_begin"] = now()
            out = original(*args, **kwargs)
            self.marks[name + "_end"] = now()
            if name == "_generate":  # (prompt_ids, completion_ids, ...): token id lists per sample
                self.marks["prompt_lengths"] = [len(p) for p in out[0]]
                self.marks["completion_lengths"] = [len(c) for c in out[1]]
            return out
        setattr(obj, name, timed)

    def _wait_for_step(self) -> None:
        torch.set_num_threads(self.s.threads)
        while (msg := self.conn.recv()) != "step":
            if msg == "reset_peak":
                reset_peak_rss()

    def _report(self) -> None:
        from ...model.flops import ModelShape, per_sample_counts, train_flops

        m = self.marks
        times = phase_times(m, TRL_PHASES)
        for clock in ("wall", "cpu"):
            times[clock]["scoring"] -= times[clock]["sampling"]
        counts = per_sample_counts(m["prompt_lengths"], m["completion_lengths"])
        rec = {**times["wall"], "cpu": times["cpu"], "completion_tokens": sum(m["completion_lengths"]),
               "train_flops": train_flops(ModelShape.of(self.trainer.model), counts), "reward": self.rewards[-1],
               "sampling_bytes": generation_bytes(*self.decode, m["prompt_lengths"], m["completion_lengths"]),
               "threads": torch.get_num_threads()}
        if self.s.eval_every and self.trainer.state.global_step % self.s.eval_every == 0:  # after the clock stopped
            rec["eval"] = held_out_reward(self.trainer.model, self.trainer.processing_class, self.cfg, self.held_out,
                                          self.scorers)
        self.conn.send(rec)


def worker(name: str, conn, s: BenchSetup) -> None:
    """Process entry point: load one side, then step when the parent says so."""
    quiet()
    torch.set_num_threads(s.threads)
    if name == "seqpg":
        runner = SeqpgRunner(s)
        conn.send({"ready": True, "eval": runner.evaluate() if s.eval_every else None})
        k = 0
        while (msg := conn.recv()) != "finish":
            if msg == "reset_peak":
                reset_peak_rss()
            elif msg == "step":
                conn.send(runner.step(k))
                k += 1
    elif name == "trl":
        trl = TrlRunner(s, conn)
        conn.send({"ready": True, "eval": trl.initial_eval})
        trl.trainer.train()  # the callback paces it, step by step
        while (msg := conn.recv()) != "finish":
            if msg == "reset_peak":
                reset_peak_rss()
    else:
        raise ValueError(f"unknown benchmark side {name!r}; valid: seqpg, trl")
    conn.send({"peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": peak_gpu_mib()})
