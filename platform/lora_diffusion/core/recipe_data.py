"""The data side of a recipe: which rows a run trains and is scored on, and how they are encoded.

`RecipeData` is a base of `Recipe` (recipe.py): the splits (train, validation, test) loaded with
their overlap checked, the response ids of each row (label words, generation responses, a task
mixture's forms), the encoding of a batch on the recipe's device, and the examples of each
training step (a seeded permutation per epoch, optionally grouped by length, each worker taking
its strided share). Everything is a function of (seed, step), so a resumed run sees the batches
an uninterrupted one would have.
"""

from __future__ import annotations

import torch

from . import diffusion, generation, overlap, splits, tasks
from .diffusion import seeded
from .task_specs import TASKS

LENGTH_GROUP = 50  # batches per length-sorted mega-batch (HF Trainer's group_by_length uses 50)


def task_of(example) -> str:
    """An example's task: its id starts with it ("<task>/...", task_specs.Example)."""
    return example.id.split("/", 1)[0]


class RecipeData:
    """Needs `config`, `rank`, `world_size`, `device`, `tokenizer`, `method`, `spec`, `label_ids`
    (set by Recipe.__init__)."""
    def _load(self, split: str, data_file: str | None = None, max_examples: int | None = None,
              task: str | None = None):
        c = self.config
        # evaluation subsets are drawn with the fixed split seed: every seed and trial is scored
        # on the same rows, so seed variance is the model's, not the data's
        seed = c.train.seed if split == "train" else splits.SPLIT_SEED
        return tasks.load_split(task or c.task, split, c.data_dir, data_file=data_file,
                                max_examples=max_examples, seed=seed, allow_hub=c.allow_hub)

    def _load_train(self) -> list:
        """The run's task's training rows, or a router's task mixture (`router.train_tasks`):
        each listed task's rows (up to max_train_examples each), shuffled together by the epoch
        permutation; every row keeps its own task's response form and task id."""
        c = self.config
        self.train_tasks = (c.router.train_tasks if c.method == "router" else []) or [c.task]
        return [e for task in self.train_tasks
                for e in self._load("train", max_examples=c.max_train_examples, task=task)]

    def _check_overlap(self) -> dict[str, float]:
        """Each evaluation set's fraction of rows overlapping this run's training rows; above 1%
        a UserError naming the set, unless allow_overlap."""
        c = self.config
        return overlap.check_overlaps(
            (("validation", f"{c.task} validation split", self.validation_examples),
             ("test", f"test_file {c.test_file}" if c.test_file else f"{c.task} test split",
              self.test_examples)),
            [e.text for e in self.train_examples], c.allow_overlap)

    def response_ids(self, example) -> list[int]:
        task = task_of(example)
        if task != self.config.task and task in self.train_tasks:  # a mixture's row: its task's form
            return self._mixture_response(task, example)
        if self.label_ids is not None:
            return self.label_ids[example.label]
        return generation.response_ids(self.tokenizer, example.response,
                                       self.config.generation.response_tokens)

    def _mixture_response(self, task: str, example) -> list[int]:
        spec = tasks.get_task(task)
        if spec.kind == "classification":
            cache = self.__dict__.setdefault("_mixture_label_ids", {})
            if task not in cache:
                cache[task] = tasks.label_word_token_ids(spec, self.tokenizer)
            return cache[task][example.label]
        return generation.response_ids(self.tokenizer, example.response, spec.response_tokens)

    def encode(self, examples, responses=None) -> diffusion.Batch:
        responses = responses or [self.response_ids(e) for e in examples]
        b = diffusion.encode(self.tokenizer, [e.prompt for e in examples], responses,
                             self.config.max_length,
                             [TASKS.get(task_of(e), self.spec).prompt_tail for e in examples])
        # each row's task id, which conditioned modules read: the run's trajectory.task_id, or
        # for a task the method knows an id of (a router's experts' tasks) that id
        known, default = self.method.task_id_by_task, self.config.trajectory.task_id
        task_ids = torch.tensor([known.get(task_of(e), default) for e in examples], dtype=torch.long)
        return diffusion.Batch(*(x.to(self.device) for x in
                                 (b.input_ids, b.attention_mask, b.response_mask, b.prompt_mask, task_ids)))

    def train_batch(self, step: int):
        """The examples of global step `step` for this worker: a seeded permutation per epoch,
        each worker taking its strided share of the global batch."""
        B, N = self.config.train.batch_size, len(self.train_examples)
        start = step * B
        idx = []
        for pos in range(start, start + B):
            epoch, offset = divmod(pos, N)
            perm = self._perm(epoch)
            idx.append(int(perm[offset]))
        return [self.train_examples[i] for i in idx[self.rank::self.world_size]]

    def _perm(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            gen = seeded(self.config.train.seed, epoch)
            perm = torch.randperm(len(self.train_examples), generator=gen)
            if self.config.train.group_by_length:
                perm = self._grouped(perm, gen)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def _grouped(self, perm: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """HF's `group_by_length`: cut the shuffled epoch into mega-batches of LENGTH_GROUP
        batches, sort each by prompt length, and shuffle the order of its batches. Batches are
        padded to their longest row, so this removes most padding (SST-2: a random batch of 32
        phrases is mostly padding) while every example is still seen once per epoch. Batches
        start at multiples of batch_size from step 0; when the epoch length is not a multiple,
        later epochs' batches straddle two sorted chunks (still correct, less uniform)."""
        if not hasattr(self, "_lengths"):
            prompts = [e.prompt for e in self.train_examples]
            self._lengths = torch.tensor([len(ids) for ids in self.tokenizer(
                prompts, add_special_tokens=False)["input_ids"]])
        B = self.config.train.batch_size
        out = []
        for mega in perm.split(B * LENGTH_GROUP):
            mega = mega[torch.argsort(self._lengths[mega], descending=True, stable=True)]
            batches = list(mega.split(B))
            out += [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return torch.cat(out)

